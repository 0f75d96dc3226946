"""The split virtqueue, device side: chain walking, used ring, and every hostile-guest check."""
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kvmpy.devices.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VirtQueue, VirtqueueError,
    avail_ring_size, desc_table_size, used_ring_size,
)
from kvmpy.kvm.memory import GuestMemory

RAM = 0x10000
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000


class Rings:
    """The driver's half of one split virtqueue, written straight into guest RAM."""

    def __init__(self, mem, size=8, desc=DESC, avail=AVAIL, used=USED):
        self.mem, self.size, self.desc, self.avail, self.used = mem, size, desc, avail, used
        self.idx = 0

    def set_desc(self, i, addr, length, flags=0, nxt=0):
        self.mem.write(self.desc + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def chain(self, bufs, first=0):
        """Descriptors first, first+1, ... for (addr, len, writable) buffers; returns the head."""
        for k, (addr, length, writable) in enumerate(bufs):
            last = k == len(bufs) - 1
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.set_desc(first + k, addr, length, flags, 0 if last else first + k + 1)
        return first

    def offer(self, *heads):
        for h in heads:
            self.mem.write(self.avail + 4 + 2 * (self.idx % self.size), struct.pack("<H", h))
            self.idx = (self.idx + 1) & 0xFFFF
        self.mem.write(self.avail + 2, struct.pack("<H", self.idx))

    def set_avail_flags(self, flags):
        self.mem.write(self.avail, struct.pack("<H", flags))

    def used_idx(self):
        return struct.unpack("<H", self.mem.read(self.used + 2, 2))[0]

    def used_elem(self, slot):
        return struct.unpack("<II", self.mem.read(self.used + 4 + 8 * (slot % self.size), 8))


def make(size=8, ram=RAM):
    mem = GuestMemory.anonymous(ram)
    return mem, Rings(mem, size), VirtQueue(mem, size, DESC, AVAIL, USED)


def test_ring_sizes_follow_the_spec_table():
    """Descriptor table 16*n, available ring 6+2*n, used ring 6+8*n bytes."""
    assert (desc_table_size(256), avail_ring_size(256), used_ring_size(256)) == (4096, 518, 2054)


def test_pop_returns_none_when_nothing_is_available():
    """With avail.idx equal to the last seen index there is no work."""
    _, _, vq = make()
    assert vq.pop() is None and vq.last_avail_idx == 0


def test_pop_walks_a_chain_into_readable_then_writable_buffers():
    """A three-descriptor chain comes back as its buffers, split by direction."""
    _, rings, vq = make()
    rings.offer(rings.chain([(0x4000, 16, False), (0x5000, 512, True), (0x6000, 1, True)], first=2))
    chain = vq.pop()
    assert chain.head == 2
    assert chain.readable == [(0x4000, 16)]
    assert chain.writable == [(0x5000, 512), (0x6000, 1)]
    assert (chain.readable_len, chain.writable_len) == (16, 513)
    assert vq.last_avail_idx == 1 and vq.pop() is None


def test_zero_length_descriptors_are_skipped_whatever_their_address():
    """len == 0 buffers are dropped without checking addr (but still chain on)."""
    _, rings, vq = make()
    rings.offer(rings.chain([(0x4000, 16, False), (1 << 63, 0, True), (0xFFFF_FFFF_FFFF, 0, False),
                             (0x6000, 1, True)]))
    chain = vq.pop()
    assert chain.readable == [(0x4000, 16)] and chain.writable == [(0x6000, 1)]


def test_push_used_writes_the_element_then_the_index():
    """push_used fills used.ring[used_idx % size] with (id, len) and bumps used.idx."""
    _, rings, vq = make()
    vq.push_used(5, 513)
    vq.push_used(1, 1)
    assert rings.used_idx() == 2 and vq.used_count == 2
    assert rings.used_elem(0) == (5, 513) and rings.used_elem(1) == (1, 1)


def test_indices_wrap_at_65536():
    """The free-running avail and used indices wrap naturally at 2**16."""
    mem, rings, vq = make(size=4)
    rings.idx = vq.last_avail_idx = 0xFFFE
    vq.used_idx = 0xFFFF
    for i in range(3):
        rings.set_desc(i, 0x4000 + 0x100 * i, 1, VIRTQ_DESC_F_WRITE)
    rings.offer(0, 1, 2)
    assert [vq.pop().head for _ in range(3)] == [0, 1, 2]
    assert vq.last_avail_idx == 1 and vq.pop() is None
    vq.push_used(0, 1)
    vq.push_used(1, 1)
    assert rings.used_idx() == 1 and rings.used_elem(3) == (0, 1) and rings.used_elem(0) == (1, 1)


def test_interrupt_suppression_reads_bit_0_of_avail_flags():
    """VIRTQ_AVAIL_F_NO_INTERRUPT is bit 0; other bits are ignored."""
    _, rings, vq = make()
    assert not vq.interrupts_suppressed()
    rings.set_avail_flags(1)
    assert vq.interrupts_suppressed()
    rings.set_avail_flags(0xFFFE)
    assert not vq.interrupts_suppressed()


def test_unknown_descriptor_flag_bits_are_ignored():
    """Flag bits other than NEXT/WRITE/INDIRECT do not change how a chain is read."""
    _, rings, vq = make()
    rings.set_desc(0, 0x4000, 8, 0xFFF8 | VIRTQ_DESC_F_NEXT, 1)
    rings.set_desc(1, 0x5000, 1, 0xFFF8 | VIRTQ_DESC_F_WRITE)
    rings.offer(0)
    chain = vq.pop()
    assert chain.readable == [(0x4000, 8)] and chain.writable == [(0x5000, 1)]


@pytest.mark.parametrize("size", [0, 3, 6, 100, 65536, 1 << 20])
def test_queue_size_must_be_a_power_of_two_up_to_32768(size):
    """Sizes that are zero, not powers of two, or above 32768 are refused."""
    with pytest.raises(VirtqueueError, match="power of two"):
        VirtQueue(GuestMemory.anonymous(RAM), size, DESC, AVAIL, USED)


def test_queue_size_32768_is_accepted_when_the_rings_fit():
    """The largest legal queue works if its 512 KiB descriptor table is in RAM."""
    vq = VirtQueue(GuestMemory.anonymous(0x100000), 32768, 0, 0x80000, 0x90000)
    assert vq.size == 32768


@pytest.mark.parametrize("desc,avail,used,what", [
    (DESC + 8, AVAIL, USED, "descriptor table .* aligned"),
    (DESC, AVAIL + 1, USED, "available ring .* aligned"),
    (DESC, AVAIL, USED + 2, "used ring .* aligned"),
    (RAM - 16 * 8 + 16, AVAIL, USED, "descriptor table .* outside"),
    (DESC, RAM - 6 - 2 * 8 + 2, USED, "available ring .* outside"),
    (DESC, AVAIL, RAM - 68, "used ring .* outside"),
    (DESC, AVAIL, (1 << 64) - 4, "used ring .* outside"),
])
def test_ring_addresses_must_be_aligned_and_in_ram(desc, avail, used, what):
    """Each ring part must be aligned (16/2/4) and lie wholly inside guest RAM."""
    with pytest.raises(VirtqueueError, match=what):
        VirtQueue(GuestMemory.anonymous(RAM), 8, desc, avail, used)


def test_rings_ending_exactly_at_the_end_of_ram_are_accepted():
    """The bounds include RAM's last byte: rings flush against the end of RAM are fine."""
    mem = GuestMemory.anonymous(RAM)
    VirtQueue(mem, 8, RAM - 128, AVAIL, USED)
    VirtQueue(mem, 8, DESC, RAM - 22, USED)
    VirtQueue(mem, 8, DESC, AVAIL, RAM - 72)    # 6+8n is never a multiple of 4


def expect_error(vq, match):
    before = vq.last_avail_idx
    with pytest.raises(VirtqueueError, match=match):
        vq.pop()
    assert vq.last_avail_idx == before


def test_head_index_out_of_range_is_an_error():
    """A head >= queue size in the available ring is refused."""
    _, rings, vq = make()
    rings.offer(8)
    expect_error(vq, "index 8 >= queue size")


def test_next_index_out_of_range_is_an_error():
    """A next link >= queue size is refused."""
    _, rings, vq = make()
    rings.set_desc(0, 0x4000, 16, VIRTQ_DESC_F_NEXT, 0xFFFF)
    rings.offer(0)
    expect_error(vq, "index 65535 >= queue size")


@pytest.mark.parametrize("links", [[0], [1, 0], [1, 2, 3, 4, 5, 6, 7, 7]])
def test_descriptor_loops_are_caught_by_the_length_limit(links):
    """A chain that revisits a descriptor exceeds the queue size and is refused."""
    _, rings, vq = make()
    for i, nxt in enumerate(links):
        rings.set_desc(i, 0x4000, 1, VIRTQ_DESC_F_NEXT, nxt)
    rings.offer(0)
    expect_error(vq, "longer than the queue size")


def test_a_chain_using_every_descriptor_once_is_fine():
    """Exactly size descriptors is the longest legal chain."""
    _, rings, vq = make()
    rings.offer(rings.chain([(0x4000 + i, 1, i == 7) for i in range(8)]))
    chain = vq.pop()
    assert len(chain.readable) == 7 and len(chain.writable) == 1


def test_indirect_descriptors_are_refused():
    """VIRTIO_F_INDIRECT_DESC is never offered, so an INDIRECT descriptor is a driver error."""
    _, rings, vq = make()
    rings.set_desc(0, 0x4000, 16, VIRTQ_DESC_F_INDIRECT)
    rings.offer(0)
    expect_error(vq, "indirect")


def test_readable_after_writable_is_refused():
    """Device-writable buffers must come after all device-readable ones."""
    _, rings, vq = make()
    rings.offer(rings.chain([(0x4000, 1, True), (0x5000, 16, False)]))
    expect_error(vq, "follows")


@pytest.mark.parametrize("addr,length", [
    (RAM, 1), (RAM - 1, 2), (0xFFFF_FFFF_FFFF_0000, 0x1000), ((1 << 64) - 1, 0xFFFF_FFFF),
    (0, 0xFFFF_FFFF),
])
def test_buffers_outside_ram_are_refused(addr, length):
    """A buffer not wholly inside guest RAM is refused, including ones that wrap 2**64."""
    _, rings, vq = make()
    rings.offer(rings.chain([(addr, length, True)]))
    expect_error(vq, "overflows|outside")


def test_chains_longer_than_4gib_are_refused():
    """The running byte total may not exceed 2**32 (each buffer fitting in RAM is not enough)."""
    try:
        mem = GuestMemory.anonymous(1 << 30)
    except (OSError, ValueError) as e:       # pragma: no cover - tiny hosts only
        pytest.skip(f"cannot map 1 GiB: {e}")
    rings = Rings(mem)
    vq = VirtQueue(mem, 8, DESC, AVAIL, USED)
    rings.offer(rings.chain([(0, 1 << 30, False)] * 4 + [(0, 1, True)]))
    expect_error(vq, "2\\*\\*32")


def test_avail_idx_more_than_size_ahead_is_an_error():
    """The driver cannot have more than size chains outstanding."""
    _, rings, vq = make()
    rings.mem.write(AVAIL + 2, struct.pack("<H", 9))
    expect_error(vq, "ahead")


def test_avail_idx_exactly_size_ahead_is_fine():
    """size outstanding chains is a full ring, not an error."""
    _, rings, vq = make()
    for i in range(8):
        rings.set_desc(i, 0x4000, 1, VIRTQ_DESC_F_WRITE)
    rings.offer(*range(8))
    assert [vq.pop().head for _ in range(8)] == list(range(8))


def test_push_used_rejects_programming_errors():
    """A head outside the table or a length beyond le32 is a host bug: ValueError."""
    _, _, vq = make()
    with pytest.raises(ValueError):
        vq.push_used(8, 0)
    with pytest.raises(ValueError):
        vq.push_used(0, 1 << 32)


# --- hypothesis: garbage rings -------------------------------------------------------------

addrs = st.one_of(st.integers(0, RAM + 64), st.integers(0, (1 << 64) - 1),
                  st.sampled_from([0x4000, 0x8000, RAM - 1, (1 << 64) - 1]))
lengths = st.one_of(st.integers(0, 600), st.integers(0, 0xFFFF_FFFF), st.sampled_from([0, 1, 16]))
descs = st.tuples(addrs, lengths, st.integers(0, 0xFFFF), st.one_of(st.integers(0, 9),
                                                                    st.integers(0, 0xFFFF)))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=st.lists(descs, min_size=8, max_size=8),
       ring=st.lists(st.integers(0, 0xFFFF), min_size=8, max_size=8),
       avail_idx=st.integers(0, 0xFFFF), start=st.integers(0, 0xFFFF))
def test_garbage_rings_give_valid_chains_or_virtqueue_errors(table, ring, avail_idx, start):
    """Whatever the rings hold, pop() gives checked chains or VirtqueueError and never writes RAM."""
    mem, rings, vq = make()
    for i, d in enumerate(table):
        rings.set_desc(i, *d)
    mem.write(AVAIL + 4, struct.pack("<8H", *ring))
    mem.write(AVAIL + 2, struct.pack("<H", avail_idx))
    vq.last_avail_idx = start
    before = mem.read(0, RAM)
    popped = 0
    try:
        while (chain := vq.pop()) is not None:
            popped += 1
            assert popped <= 8
            assert 0 <= chain.head < 8
            for addr, n in chain.readable + chain.writable:
                assert n > 0 and mem.contains(addr, n)
            assert len(chain.readable) + len(chain.writable) <= 8
    except VirtqueueError:
        pass
    assert mem.read(0, RAM) == before
    assert vq.last_avail_idx == (start + popped) & 0xFFFF
