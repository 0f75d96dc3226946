"""Linux kernel modules as files: what a ``.ko`` says about itself, and the order to load a set.

A loadable module is an ELF64 relocatable object. Its ``.modinfo`` section is a run of
NUL-terminated ``key=value`` strings (``name=virtio_blk``, ``depends=virtio,virtio_ring``,
``vermagic=...``, one ``alias=`` per device it drives); ``modinfo`` and ``depmod`` read
them from there. Distributions ship no ``modules.dep`` in the kernel package (``depmod``
writes it when the package is installed), so kvmpy reads ``depends=`` itself to know
which modules a guest must ``insmod`` first, and writes a ``modules.dep`` for the guest's
``modprobe`` (format: ``FILE: DEPENDENCY-FILE ...``, one line per module, paths relative
to ``/lib/modules/RELEASE``).

The ELF layout (System V ABI, chapter 4): the header's ``e_shoff``, ``e_shentsize``,
``e_shnum`` and ``e_shstrndx`` locate the 64-byte section headers and the table of their
names. Every offset and size read from a file is checked against its length: a damaged or
hostile module gives :class:`ModuleError`, never an IndexError.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ..errors import KvmpyError

ELF64_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")   # e_ident .. e_shstrndx (64 bytes)
ELF64_SHDR = struct.Struct("<IIQQQQIIQQ")            # sh_name .. sh_entsize (64 bytes)
ET_REL = 1
EM_X86_64 = 62
SHT_NOBITS = 8
MAX_SECTIONS = 1 << 16


class ModuleError(KvmpyError):
    """A kernel module file that cannot be read, or a set of modules that cannot be loaded."""


@dataclass(frozen=True)
class ModuleInfo:
    """What a module's ``.modinfo`` says: its name, the modules it needs, the rest as pairs."""

    name: str
    depends: tuple[str, ...]
    fields: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    def get(self, key: str) -> list[str]:
        return [v for k, v in self.fields if k == key]


def module_name(filename: str) -> str:
    """The name the kernel gives the module in file ``filename``: ``virtio-rng.ko`` -> ``virtio_rng``."""
    base = filename.rsplit("/", 1)[-1]
    if base.endswith(".ko"):
        base = base[:-3]
    return base.replace("-", "_")


def _section(data: memoryview, want: bytes) -> memoryview | None:
    """The contents of the ELF64 section named ``want``, or None if there is none."""
    if len(data) < ELF64_HEADER.size:
        raise ModuleError(f"file too short for an ELF header ({len(data)} bytes)")
    (ident, e_type, e_machine, _, _, _, e_shoff, _, _, _, _, e_shentsize, e_shnum,
     e_shstrndx) = ELF64_HEADER.unpack_from(data)
    if ident[:4] != b"\x7fELF":
        raise ModuleError(f"not an ELF file (starts {bytes(ident[:4]).hex()})")
    if ident[4] != 2 or ident[5] != 1:
        raise ModuleError(f"not a little-endian ELF64 file (class {ident[4]}, data {ident[5]})")
    if e_type != ET_REL or e_machine != EM_X86_64:
        raise ModuleError(f"not an x86-64 kernel module (e_type {e_type}, e_machine {e_machine})")
    if e_shentsize != ELF64_SHDR.size or not 0 < e_shnum <= MAX_SECTIONS or e_shstrndx >= e_shnum:
        raise ModuleError(f"bad section header table (entsize {e_shentsize}, {e_shnum} entries, "
                          f"names in {e_shstrndx})")
    if e_shoff + e_shnum * e_shentsize > len(data):
        raise ModuleError(f"section headers at {e_shoff:#x} run past the end of the file ({len(data):#x} bytes)")

    def header(i: int):
        return ELF64_SHDR.unpack_from(data, e_shoff + i * e_shentsize)

    def contents(i: int) -> memoryview:
        sh = header(i)
        offset, size = sh[4], sh[5]
        if sh[1] == SHT_NOBITS:
            return data[0:0]
        if offset + size > len(data):
            raise ModuleError(f"section {i} ({offset:#x}+{size:#x}) runs past the end of the file")
        return data[offset:offset + size]

    names = contents(e_shstrndx)
    for i in range(e_shnum):
        at = header(i)[0]
        if at >= len(names):
            raise ModuleError(f"section {i}'s name at {at:#x} is outside the name table")
        end = bytes(names[at:at + len(want) + 1])
        if end == want + b"\0":
            return contents(i)
    return None


def read_modinfo(data, filename: str = "module") -> ModuleInfo:
    """The ``.modinfo`` of module file contents ``data`` (bytes); ModuleError if unreadable."""
    try:
        section = _section(memoryview(data).cast("B"), b".modinfo")
    except struct.error as e:                     # cannot happen after the checks; never let it out
        raise ModuleError(f"{filename}: truncated ELF structure: {e}") from None
    except ModuleError as e:
        raise ModuleError(f"{filename}: {e}") from None
    if section is None:
        raise ModuleError(f"{filename}: no .modinfo section (not a kernel module)")
    fields = []
    for raw in bytes(section).split(b"\0"):
        if not raw:
            continue                              # alignment padding between the strings
        key, sep, value = raw.partition(b"=")
        if not sep:
            raise ModuleError(f"{filename}: .modinfo entry {raw[:40]!r} has no '='")
        fields.append((key.decode("utf-8", "replace"), value.decode("utf-8", "replace")))
    info = dict(fields)
    name = info.get("name") or module_name(filename)
    depends = tuple(d for d in info.get("depends", "").split(",") if d)
    return ModuleInfo(name=name, depends=depends, fields=tuple(fields))


def load_order(infos: dict[str, ModuleInfo], wanted) -> list[str]:
    """The modules (names) to ``insmod`` for ``wanted``, each after what it depends on.

    ``infos`` maps every available module's name to its info. A dependency that is not
    there, or a cycle, is a ModuleError naming the chain.
    """
    order: list[str] = []
    state: dict[str, str] = {}                    # name -> "visiting" | "done"

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise ModuleError(f"modules depend on each other in a cycle: {' -> '.join(chain + (name,))}")
        if name not in infos:
            needed_by = f" (needed by {chain[-1]})" if chain else ""
            raise ModuleError(f"no module {name}{needed_by} among {', '.join(sorted(infos)) or 'none'}")
        state[name] = "visiting"
        for dep in infos[name].depends:
            visit(dep, chain + (name,))
        state[name] = "done"
        order.append(name)

    for name in wanted:
        visit(name, ())
    return order


def modules_dep(infos: dict[str, ModuleInfo], files: dict[str, str]) -> str:
    """A ``modules.dep`` for busybox's ``modprobe``: each module's file, then the files of all
    the modules it needs, the ones to load last first (as depmod writes them)."""
    lines = []
    for name in sorted(infos):
        needs = load_order(infos, [name])[:-1]
        lines.append(f"{files[name]}:" + "".join(f" {files[d]}" for d in reversed(needs)))
    return "\n".join(lines) + "\n"
