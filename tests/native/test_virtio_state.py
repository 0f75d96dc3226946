"""Saved virtio-blk state is the same dict in C and in Python, and either model restores the
other's: after a save, loading into fresh devices (of the other kind or the same) and
continuing with the same accesses gives identical observables on both; edited states are
refused by both or accepted by both, never a crash."""
import json

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kvmpy.devices.irq import RecordingTrigger
from kvmpy.devices.virtio import mmio as R
from kvmpy.devices.virtio.blk import VirtioBlk

from .test_virtio_differential import AVAIL, DESC, DISK, OPS, RAM, USED, Side, comparable

CONTENT = st.binary(min_size=16, max_size=64).map(lambda b: (b * (DISK // len(b) + 1))[:DISK])
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def restore(side: Side, path, native: bool, state: dict) -> None:
    """Replace side's device by a fresh one of the given kind over the same RAM and file, then
    load ``state`` into it (ValueError propagates; the side then has the fresh, unloaded device)."""
    (side.blk if hasattr(side, "blk") else side.dev).close()
    if native:
        from kvmpy.vmm.native import NativeVirtioBlk
        if hasattr(side, "blk"):
            del side.blk
        side.dev = NativeVirtioBlk(path, side.mem)
    else:
        side.blk = VirtioBlk(path)
        side.trig = RecordingTrigger()
        side.dev = R.VirtioMmioTransport(side.blk, side.mem, side.trig)
    side.level = lambda: side.dev.irq_level
    side.dev.load_state(state)
    if native:
        assert side.dev.raw_state().irq_changes == 0        # the line was not driven
    else:
        assert side.trig.levels == []


def run_both(a: Side, b: Side, ops) -> None:
    """Apply ops to both sides, demanding identical observables after each, dirty pages included."""
    for op in ops:
        assert a.apply(op) == b.apply(op), op
        assert comparable(a.dev.state()) == comparable(b.dev.state()), op
        assert a.level() == b.level(), op
        assert a.mem.read(0, RAM) == b.mem.read(0, RAM), op
        assert a.mem.regions[0].take_dirty() == b.mem.regions[0].take_dirty(), op


@SETTINGS
@given(ops=OPS, more=OPS.map(lambda ops: ops[1:]), content=CONTENT,
       kinds=st.tuples(st.booleans(), st.booleans()))
def test_saved_state_is_identical_and_restores_across_models(tmp_path_factory, ops, more, content, kinds):
    """Python and C save the same JSON dict; fresh devices of any kind loaded from it behave alike."""
    d = tmp_path_factory.mktemp("s")
    paths = [d / "a.img", d / "b.img"]
    for p in paths:
        p.write_bytes(content)
    a, b = Side(paths[0], native=False), Side(paths[1], native=True)
    try:
        run_both(a, b, ops)
        sa, sb = a.dev.save_state(), b.dev.save_state()
        assert sa == sb
        assert json.loads(json.dumps(sa)) == sa
        restore(a, paths[0], kinds[0], sb)             # each loads the other's saved dict
        restore(b, paths[1], kinds[1], sa)
        assert a.dev.save_state() == sa and b.dev.save_state() == sb
        run_both(a, b, more)
    finally:
        a.close()
        b.close()
    assert paths[0].read_bytes() == paths[1].read_bytes()


U = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 8, 16, 255, 256, 0xFFFF, 0x10000, 0xFFFFFFFF, 1 << 32,
                               2**64 - 1, 1 << 64, -1, DESC, AVAIL, USED, DESC + 8, RAM - 0x80, RAM - 8,
                               1 << 32 | 1 << 0 | 1 << 9, 1 << 32 | 1 << 5]),
              st.integers(0, 2**64 - 1))
JUNK = st.one_of(U, st.booleans(), st.none(), st.text(max_size=2), st.lists(st.integers(0, 3), max_size=2))
STATE_KEYS = sorted(R.STATE_FIELDS)
QUEUE_KEYS = sorted(R.QUEUE_STATE_FIELDS)
MUTATIONS = st.lists(st.one_of(
    st.tuples(st.just("set"), st.sampled_from(STATE_KEYS), st.one_of(U, JUNK)),
    st.tuples(st.just("qset"), st.sampled_from(QUEUE_KEYS), st.one_of(U, st.booleans(), JUNK)),
    st.tuples(st.just("drop"), st.sampled_from(STATE_KEYS + ["q." + k for k in QUEUE_KEYS])),
    st.tuples(st.just("add"), st.sampled_from(["extra", "q.extra"])),
    st.tuples(st.just("queues"), st.sampled_from([0, 2])),
), min_size=1, max_size=4)


def mutate(state: dict, muts) -> dict:
    s = json.loads(json.dumps(state))
    q = s["queues"][0]
    for m in muts:
        if m[0] == "set":
            s[m[1]] = m[2]
        elif m[0] == "qset" and isinstance(s.get("queues"), list) and s["queues"]:
            q[m[1]] = m[2]
        elif m[0] == "drop":
            (q if m[1].startswith("q.") else s).pop(m[1].removeprefix("q."), None)
        elif m[0] == "add":
            (q if m[1].startswith("q.") else s)[m[1].removeprefix("q.")] = 0
        elif m[0] == "queues":
            s["queues"] = [q] * m[1]
    return s


def same_verdict(d, ops, make_state, content, more) -> bool:
    """Drive both models with ops, load make_state(saved) into fresh devices of each kind and
    demand the same verdict; if accepted, the same state back and the same behaviour after.
    Returns whether the state was accepted."""
    paths = [d / "a.img", d / "b.img"]
    for p in paths:
        p.write_bytes(content)
    a, b = Side(paths[0], native=False), Side(paths[1], native=True)
    try:
        run_both(a, b, ops)
        bad = make_state(a.dev.save_state())
        outcome = []
        for side, path, native in ((a, paths[0], False), (b, paths[1], True)):
            try:
                restore(side, path, native, bad)
                outcome.append(None)
            except ValueError as e:
                outcome.append(str(e))
        assert (outcome[0] is None) == (outcome[1] is None), (bad, outcome)
        if outcome[0] is not None:
            assert a.dev.save_state() == b.dev.save_state()     # both still at power-on
            return False
        assert a.dev.save_state() == b.dev.save_state() == bad
        if bad["queues"][0]["ready"]:      # the driver carries on from where the device is
            a.avail_idx = b.avail_idx = bad["queues"][0]["last_avail_idx"]
        run_both(a, b, more)
        return True
    finally:
        a.close()
        b.close()


@SETTINGS
@given(ops=OPS, muts=MUTATIONS, content=CONTENT, more=OPS.map(lambda ops: ops[1:5]))
def test_edited_states_are_refused_or_accepted_by_both(tmp_path_factory, ops, muts, content, more):
    """A hostile edit of a saved state: both models raise ValueError, or both load it and then
    save it back unchanged and keep behaving identically."""
    same_verdict(tmp_path_factory.mktemp("m"), ops, lambda s: mutate(s, muts), content, more)


RING = st.sampled_from([DESC, AVAIL, USED, 0, 2, 4, 16, RAM - 0x1000, RAM - 0x80, RAM - 6, RAM, 2**64 - 16])


@st.composite
def near_valid_states(draw):
    """Mostly-consistent states (so many are accepted), each field occasionally off."""
    irq = draw(st.sampled_from([0, 0, 1, 2, 3, 4]))
    ready = draw(st.booleans())
    used = draw(st.sampled_from([0, 1, 5, 0xFFFF]))
    return {
        "status": draw(st.sampled_from([0x0F, 0x0F, 0x0F, 0x0B, 0x4F, 0x07, 0x47, 0x8F, 0])),
        "device_features_sel": draw(st.integers(0, 3)), "driver_features_sel": draw(st.integers(0, 3)),
        "driver_features": draw(st.sampled_from([1 << 32 | 1 << 9] * 4 + [1 << 32, 1 << 32 | 1 << 5, 0, 1 << 9])),
        "queue_sel": draw(st.integers(0, 2)), "interrupt_status": irq,
        "irq_level": draw(st.sampled_from([irq != 0] * 5 + [irq == 0])),
        "queues": [{
            "num": draw(st.sampled_from([16, 16, 8, 1, 0, 3, 512])), "ready": ready,
            **({"desc": DESC, "driver": AVAIL, "device": USED} if draw(st.integers(0, 3)) else
               {"desc": draw(RING), "driver": draw(RING), "device": draw(RING)}),
            "last_avail_idx": (used + draw(st.sampled_from([0, 0, 0, 1, 2]))) & 0xFFFF if ready else 0,
            "used_idx": used if ready else draw(st.sampled_from([0] * 9 + [1])),
        }],
    }


@SETTINGS
@given(state=near_valid_states(), content=CONTENT, more=OPS.map(lambda ops: ops[1:8]))
def test_random_states_are_refused_or_accepted_by_both(tmp_path_factory, state, content, more):
    """States built from near-valid values (so many are accepted): same verdict in C and Python,
    and accepted ones then behave identically (requests served at the restored ring position)."""
    accepted = same_verdict(tmp_path_factory.mktemp("r"), [("init", True)], lambda _: state, content, more)
    event(f"accepted={accepted} ready={state['queues'][0]['ready']}")
