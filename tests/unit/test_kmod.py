"""kvmpy.images.kmod: a kernel module's .modinfo read from its ELF sections, the load order of a
set of modules, and the modules.dep written for a guest's modprobe. Hostile files give
ModuleError, never another exception."""
import struct

import pytest
from hypothesis import given, settings, strategies as st

from kvmpy.images import kmod
from kvmpy.images.kmod import ModuleError, ModuleInfo, load_order, module_name, modules_dep, read_modinfo


def make_ko(modinfo: bytes, *, machine: int = kmod.EM_X86_64, e_type: int = kmod.ET_REL) -> bytes:
    """A minimal ELF64 relocatable file: sections NULL, .shstrtab, .modinfo (and a .text)."""
    names = b"\0.shstrtab\0.modinfo\0.text\0"
    text = b"\xc3"
    body = names + modinfo + text
    shoff = 64 + len(body)
    shoff += -shoff % 8
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    ehdr = kmod.ELF64_HEADER.pack(ident, e_type, machine, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 4, 1)
    sh = [bytes(64),
          kmod.ELF64_SHDR.pack(1, 3, 0, 0, 64, len(names), 0, 0, 1, 0),
          kmod.ELF64_SHDR.pack(11, 1, 2, 0, 64 + len(names), len(modinfo), 0, 0, 8, 0),
          kmod.ELF64_SHDR.pack(20, 1, 6, 0, 64 + len(names) + len(modinfo), 1, 0, 0, 16, 0)]
    out = ehdr + body
    return out + bytes(shoff - len(out)) + b"".join(sh)


def modinfo(**fields) -> bytes:
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in fields.items())


def test_name_and_depends_come_from_modinfo():
    info = read_modinfo(make_ko(modinfo(license="GPL", depends="virtio,virtio_ring", name="virtio_blk",
                                        vermagic="6.1.0 SMP")), "virtio_blk.ko")
    assert info.name == "virtio_blk" and info.depends == ("virtio", "virtio_ring")
    assert info.get("license") == ["GPL"] and info.get("alias") == []


def test_empty_depends_and_a_missing_name_use_the_file_name():
    info = read_modinfo(make_ko(modinfo(depends="") + b"\0\0\0"), "virtio-rng.ko")
    assert info == ModuleInfo("virtio_rng", (), (("depends", ""),))
    assert module_name("kernel/drivers/char/hw_random/virtio-rng.ko") == "virtio_rng"


@pytest.mark.parametrize("data, message", [
    (b"", "too short"),
    (b"\x7fELX" + bytes(60), "not an ELF file"),
    (make_ko(b"x=1\0")[:4] + b"\x01" + make_ko(b"x=1\0")[5:], "not a little-endian ELF64"),
    (make_ko(b"x=1\0", machine=3), "not an x86-64 kernel module"),
    (make_ko(b"x=1\0", e_type=2), "not an x86-64 kernel module"),
    (make_ko(b"x=1\0")[:-10], "run past the end"),
    (make_ko(b"no-equals-sign\0"), "has no '='"),
])
def test_bad_files_are_refused_by_name(data, message):
    with pytest.raises(ModuleError, match=message) as e:
        read_modinfo(data, "bad.ko")
    assert str(e.value).startswith("bad.ko: ")


def test_a_file_without_modinfo_is_not_a_module():
    ko = make_ko(b"x=1\0").replace(b".modinfo", b".notinfo")
    with pytest.raises(ModuleError, match="no .modinfo section"):
        read_modinfo(ko, "m.ko")


def test_a_section_past_the_end_is_refused():
    ko = bytearray(make_ko(modinfo(name="m")))
    shoff = struct.unpack_from("<Q", ko, 0x28)[0]
    struct.pack_into("<Q", ko, shoff + 2 * 64 + 0x20, 1 << 40)     # .modinfo's size
    with pytest.raises(ModuleError, match="runs past the end of the file"):
        read_modinfo(bytes(ko), "m.ko")


keys = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e, blacklist_characters="="), min_size=1,
               max_size=12)
values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=20)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(keys, values, max_size=8), st.lists(keys.filter(lambda k: "," not in k), max_size=4))
def test_modinfo_round_trips(fields, deps):
    fields = {k: v for k, v in fields.items() if k not in ("name", "depends")}
    info = read_modinfo(make_ko(modinfo(**fields, depends=",".join(deps), name="mod_x")), "f.ko")
    assert info.name == "mod_x" and info.depends == tuple(deps)
    for k, v in fields.items():
        assert info.get(k) == [v]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_damaged_modules_give_module_error_only(data):
    ko = bytearray(make_ko(modinfo(name="m", depends="a,b")))
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, len(ko) - 1))
        ko[at] = data.draw(st.integers(0, 255))
    ko = ko[:data.draw(st.integers(0, len(ko)))]
    try:
        info = read_modinfo(bytes(ko), "m.ko")
    except ModuleError:
        return
    assert isinstance(info, ModuleInfo)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_give_module_error_only(blob):
    try:
        read_modinfo(b"\x7fELF\x02\x01" + blob, "x.ko")
    except ModuleError:
        pass


def infos(graph: dict[str, list[str]]) -> dict[str, ModuleInfo]:
    return {name: ModuleInfo(name, tuple(deps)) for name, deps in graph.items()}


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_load_order_puts_every_dependency_first_and_loads_only_what_is_needed(data):
    n = data.draw(st.integers(1, 10))
    names = [f"m{i}" for i in range(n)]
    graph = {name: data.draw(st.lists(st.sampled_from(names[:i]), unique=True, max_size=3)) if i else []
             for i, name in enumerate(names)}                      # edges point to lower numbers: a DAG
    wanted = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=4))
    order = load_order(infos(graph), wanted)
    assert len(order) == len(set(order))
    for name in order:
        assert all(order.index(d) < order.index(name) for d in graph[name])
    needed, todo = set(), list(wanted)
    while todo:
        m = todo.pop()
        if m not in needed:
            needed.add(m)
            todo += graph[m]
    assert set(order) == needed


def test_a_cycle_and_a_missing_dependency_are_named():
    with pytest.raises(ModuleError, match="cycle: a -> b -> a"):
        load_order(infos({"a": ["b"], "b": ["a"]}), ["a"])
    with pytest.raises(ModuleError, match=r"no module c \(needed by b\)"):
        load_order(infos({"a": ["b"], "b": ["c"]}), ["a"])


def test_modules_dep_lists_dependencies_last_loaded_first():
    graph = infos({"virtio": [], "virtio_ring": [], "failover": [], "net_failover": ["failover"],
                   "virtio_net": ["virtio_ring", "virtio", "net_failover"]})
    files = {n: f"{n}.ko" for n in graph}
    text = modules_dep(graph, files)
    assert "virtio_net.ko: net_failover.ko failover.ko virtio.ko virtio_ring.ko\n" in text
    assert "virtio.ko:\n" in text and len(text.splitlines()) == 5
