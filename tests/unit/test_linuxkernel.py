"""The kernel-fetching helper: payloads of every stdlib format (and LZ4) inflate to the vmlinux,
damaged ones raise LoaderError, .deb members are found, apt's answers are parsed, the cache is used."""
import bz2
import gzip
import io
import lzma
import shutil
import struct
import tarfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy import linuxkernel as lk
from kvmpy.errors import LoaderError

VMLINUX = b"\x7fELF" + bytes(range(256)) * 64


def bzimage_with(payload: bytes) -> bytes:
    """A minimal valid bzImage whose protected-mode code is just ``payload`` at offset 0."""
    setup = bytearray(5 * 512)
    setup[0x1F1] = 4
    kernel = payload + b"\0" * (-len(payload) % 16)
    struct.pack_into("<I", setup, 0x1F4, len(kernel) // 16)
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x200], setup[0x201] = 0xEB, 0x6A
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x020F)
    setup[0x211] = 1
    struct.pack_into("<I", setup, 0x230, 0x200000)
    setup[0x234] = 1
    struct.pack_into("<I", setup, 0x238, 0x7FF)
    struct.pack_into("<II", setup, 0x248, 0, len(payload))
    struct.pack_into("<Q", setup, 0x258, 0x1000000)
    struct.pack_into("<I", setup, 0x260, 0x100000)
    return bytes(setup) + kernel


def size_append(blob: bytes, n: int = len(VMLINUX)) -> bytes:
    """What the kernel build appends after every payload but gzip: the inflated size."""
    return blob + struct.pack("<I", n)


def lz4_legacy(data: bytes) -> bytes:
    lz4_block = pytest.importorskip("lz4.block")
    out = struct.pack("<I", lk.LZ4_LEGACY_MAGIC)
    for i in range(0, len(data), 4096):
        blk = lz4_block.compress(data[i:i + 4096], store_size=False)
        out += struct.pack("<I", len(blk)) + blk
    return out


def zstd(data: bytes) -> bytes:
    try:
        import zstandard
    except ImportError:
        if shutil.which("zstd") is None:
            pytest.skip("neither the zstandard package nor the zstd command")
        import subprocess
        return subprocess.run(["zstd", "-q", "-c"], input=data, stdout=subprocess.PIPE, check=True).stdout
    return zstandard.ZstdCompressor().compress(data)


PAYLOADS = {
    "gzip": lambda: gzip.compress(VMLINUX),
    "bzip2": lambda: size_append(bz2.compress(VMLINUX)),
    "lzma": lambda: size_append(lzma.compress(VMLINUX, format=lzma.FORMAT_ALONE)),
    "xz": lambda: size_append(lzma.compress(VMLINUX, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)),
    "lz4": lambda: size_append(lz4_legacy(VMLINUX)),
    "zstd": lambda: size_append(zstd(VMLINUX)),
}


@pytest.mark.parametrize("fmt", sorted(PAYLOADS))
def test_extract_vmlinux_inflates_each_format(fmt):
    """Every payload format the kernel build can use (stdlib ones, and LZ4 as Debian uses) inflates."""
    assert lk.extract_vmlinux(bzimage_with(PAYLOADS[fmt]())) == VMLINUX


def test_zstd_command_is_the_fallback(monkeypatch):
    """Without the zstandard package, the zstd command decompresses the payload."""
    if shutil.which("zstd") is None:
        pytest.skip("no zstd command")
    image = bzimage_with(PAYLOADS["zstd"]())
    monkeypatch.setitem(__import__("sys").modules, "zstandard", None)
    assert lk.extract_vmlinux(image) == VMLINUX


def test_lz4_command_is_the_fallback(monkeypatch):
    """Without the lz4 Python package, the lz4 command decompresses the legacy frame."""
    if shutil.which("lz4") is None:
        pytest.skip("no lz4 command")
    image = bzimage_with(PAYLOADS["lz4"]())
    monkeypatch.setattr(lk, "_lz4_block_decoder", lambda: None)
    assert lk.extract_vmlinux(image) == VMLINUX


def test_size_mismatch_and_non_elf_payloads_are_loader_errors():
    """The trailer must match the inflated size, and the result must be an ELF file."""
    with pytest.raises(LoaderError, match="the image says"):
        lk.extract_vmlinux(bzimage_with(size_append(lzma.compress(VMLINUX, format=lzma.FORMAT_XZ), 5)))
    with pytest.raises(LoaderError, match="not an ELF"):
        lk.extract_vmlinux(bzimage_with(gzip.compress(b"MZ" + bytes(100))))


def test_truncated_lz4_payload_is_a_loader_error():
    """An LZ4 block cut short (not just the 4-byte trailer) is refused."""
    blob = PAYLOADS["lz4"]()
    with pytest.raises(LoaderError, match="lz4|decompress"):
        lk.extract_vmlinux(bzimage_with(blob[:len(blob) // 2]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(PAYLOADS)), st.integers(0, 400), st.binary(min_size=1, max_size=8))
def test_corrupted_payloads_raise_only_loader_errors(fmt, at, junk):
    """Overwriting payload bytes gives the vmlinux back or a LoaderError, nothing else."""
    blob = bytearray(PAYLOADS[fmt]())
    at = min(at, len(blob) - 1)
    blob[at:at + len(junk)] = junk
    try:
        lk.extract_vmlinux(bzimage_with(bytes(blob)))
    except LoaderError:
        pass


def make_deb(files: dict[str, bytes], compression: str = "xz") -> bytes:
    """A .deb: ar archive with debian-binary, control.tar.xz and data.tar.<compression>."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compression}") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", b"x" * 3), (f"data.tar.{compression}", buf.getvalue())]
    out = b"!<arch>\n"
    for name, body in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode() + body + b"\n" * (len(body) & 1)
    return out


@pytest.mark.parametrize("compression", ["xz", "gz"])
def test_deb_members_reads_the_data_archive(compression):
    """Files are found in data.tar.* by path without the leading './'."""
    deb = make_deb({"boot/vmlinuz-6.1.0-1-cloud-amd64": b"kernel", "bin/busybox": b"bb"}, compression)
    assert lk.deb_members(deb, lambda p: p.startswith("boot/")) == {"boot/vmlinuz-6.1.0-1-cloud-amd64": b"kernel"}


@pytest.mark.parametrize("blob", [b"", b"!<arch>\n", b"PK\x03\x04", b"!<arch>\n" + b"x" * 60])
def test_deb_members_rejects_non_packages(blob):
    """Not an ar archive, or one without data.tar: FetchError."""
    with pytest.raises(lk.FetchError):
        lk.deb_members(blob, lambda p: True)


APT_SHOW = """Package: linux-image-cloud-amd64
Source: linux-signed-amd64 (6.1.192+2)
Version: 6.1.192-2
Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)
Description: Linux for x86-64 cloud (meta-package)

Package: busybox-static
Version: 1:1.35.0-4+deb12u1+b1
Description: Standalone rescue shell with tons of builtin utilities

"""


def test_resolve_follows_the_metapackage(monkeypatch):
    """One apt-cache call names the concrete kernel package, its version and busybox's."""
    calls = []
    monkeypatch.setattr(lk, "_run", lambda argv, cwd=None: calls.append(argv) or APT_SHOW)
    assert lk.resolve() == (("linux-image-6.1.0-56-cloud-amd64", "6.1.192-2"),
                            ("busybox-static", "1:1.35.0-4+deb12u1+b1"))
    assert len(calls) == 1 and calls[0][:3] == ["apt-cache", "show", "--no-all-versions"]


def test_resolve_without_package_lists_says_to_run_apt_get_update(monkeypatch):
    """apt knowing neither package is reported with the fix."""
    monkeypatch.setattr(lk, "_run", lambda argv, cwd=None: "")
    with pytest.raises(lk.FetchError, match="apt-get update"):
        lk.resolve()


def fill_cache(root):
    k = root / "debian" / "linux-image-6.1.0-56-cloud-amd64_6.1.192-2"
    b = root / "debian" / "busybox-static_1%3a1.35.0-4"
    for d, names in ((k, ("vmlinuz", "vmlinux")), (b, ("busybox",))):
        d.mkdir(parents=True)
        for n in names:
            (d / n).write_bytes(b"x")
    return k, b


def test_offline_fetch_uses_the_cache_and_fails_clearly_without_one(tmp_path, monkeypatch):
    """offline=True never runs apt; an empty cache is a FetchError saying what to run."""
    monkeypatch.setattr(lk, "_run", lambda *a, **k: pytest.fail("apt was run"))
    with pytest.raises(lk.FetchError, match="python -m kvmpy.images.linuxkernel"):
        lk.fetch(tmp_path, offline=True)
    k, b = fill_cache(tmp_path)
    got = lk.fetch(tmp_path, offline=True)
    assert (got.vmlinuz, got.vmlinux, got.busybox) == (k / "vmlinuz", k / "vmlinux", b / "busybox")


def test_fetch_with_current_versions_cached_downloads_nothing(tmp_path, monkeypatch):
    """When apt's current versions are in the cache, only apt-cache runs."""
    k, b = fill_cache(tmp_path)
    b.rename(tmp_path / "debian" / "busybox-static_1%3a1.35.0-4+deb12u1+b1")
    old = tmp_path / "debian" / "linux-image-6.1.0-50-cloud-amd64_6.1.176-1"
    old.mkdir()
    calls = []
    monkeypatch.setattr(lk, "_run", lambda argv, cwd=None: calls.append(argv[0]) or APT_SHOW)
    got = lk.fetch(tmp_path)
    assert calls == ["apt-cache"] and got.vmlinux == k / "vmlinux"
    assert not old.exists()                     # an older kernel is pruned


def test_fetch_falls_back_to_the_cache_when_apt_cannot_answer(tmp_path, monkeypatch):
    """No apt (or no lists) but a cached kernel: use it."""
    k, _ = fill_cache(tmp_path)

    def no_apt(argv, cwd=None):
        raise lk.FetchError("apt-cache not found")
    monkeypatch.setattr(lk, "_run", no_apt)
    assert lk.fetch(tmp_path).vmlinux == k / "vmlinux"
    with pytest.raises(lk.FetchError):
        lk.fetch(tmp_path / "empty")


def test_cache_dir_honours_kvmpy_cache(monkeypatch, tmp_path):
    """$KVMPY_CACHE wins over ~/.cache/kvmpy."""
    monkeypatch.setenv("KVMPY_CACHE", str(tmp_path))
    assert lk.cache_dir() == tmp_path
    monkeypatch.delenv("KVMPY_CACHE")
    assert lk.cache_dir().parts[-2:] == (".cache", "kvmpy")


def test_acpica_tools_are_fetched_once_and_then_come_from_the_cache(tmp_path, monkeypatch):
    """kvmpy.images.acpica: apt-cache names the version, apt-get download brings the .deb,
    iasl and acpiexec land executable in its cache slot; later calls download nothing and,
    without apt, use the slot."""
    from kvmpy.images import acpica
    deb = make_deb({"usr/bin/iasl": b"\x7fELF iasl", "usr/bin/acpiexec": b"\x7fELF acpiexec",
                    "usr/share/man/man1/iasl.1.gz": b"man"})
    calls = []

    def apt(argv, cwd=None):
        calls.append(argv[0])
        if argv[0] == "apt-cache":
            return "Package: acpica-tools\nVersion: 20200925-8\n\n"
        assert argv[0] == "apt-get" and argv[-1] == "acpica-tools=20200925-8"
        (tmp_path / cwd / "acpica-tools_20200925-8_amd64.deb").write_bytes(deb)
        return ""
    monkeypatch.setattr(lk, "_run", apt)
    tools = acpica.fetch(tmp_path)
    assert tools.iasl == tmp_path / "debian" / "acpica-tools_20200925-8" / "iasl"
    assert tools.iasl.read_bytes() == b"\x7fELF iasl" and tools.acpiexec.stat().st_mode & 0o111
    assert sorted(p.name for p in tools.iasl.parent.iterdir()) == ["acpiexec", "iasl"]
    assert calls == ["apt-cache", "apt-get"]
    assert acpica.fetch(tmp_path) == tools and calls[2:] == ["apt-cache"]

    def no_apt(argv, cwd=None):
        raise lk.FetchError("apt-cache not found")
    monkeypatch.setattr(lk, "_run", no_apt)
    assert acpica.fetch(tmp_path) == tools
    with pytest.raises(lk.FetchError):
        acpica.fetch(tmp_path / "empty")
