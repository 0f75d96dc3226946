"""newc cpio: the writer produces the bytes Linux's unpacker expects, the reader reads them back,
garbage raises ValueError, and the busybox initramfs holds what /init needs."""
import shutil
import stat
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.images.initramfs import (DEFAULT_INIT, INIT_READY_MARKER, CpioEntry, build_busybox_initramfs,
                             newc_archive, read_newc)


def test_one_file_archive_is_byte_exact():
    """Header fields are 8 upper-case hex digits; name and data are padded to 4 bytes; trailer ends it."""
    got = newc_archive([CpioEntry("init", stat.S_IFREG | 0o755, b"hi\n")])
    head = (b"070701" + b"00000001" + b"000081ED" + b"00000000" * 2 + b"00000001" + b"00000000"
            + b"00000003" + b"00000000" * 4 + b"00000005" + b"00000000")
    trailer = (b"070701" + b"00000000" * 4 + b"00000001" + b"00000000" * 6 + b"0000000B" + b"00000000")
    assert got == head + b"init\0" + b"\0" + b"hi\n\0" + trailer + b"TRAILER!!!\0" + b"\0" * 3
    assert len(got) % 4 == 0


names = st.lists(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters="/."),
                         min_size=1, max_size=12), min_size=1, max_size=3).map("/".join) | st.just("TRAILER!!!")
entries = st.lists(st.builds(lambda n, kind, data, uid, rdev: CpioEntry(
    n, kind | 0o644, data if kind in (stat.S_IFREG, stat.S_IFLNK) else b"", uid=uid,
    rdevmajor=rdev if kind == stat.S_IFCHR else 0),
    names, st.sampled_from([stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR]),
    st.binary(max_size=40), st.integers(0, 2**32 - 1), st.integers(0, 255)),
    max_size=8, unique_by=lambda e: e.name)


@settings(max_examples=1000)
@given(entries)
def test_round_trip(es):
    """What newc_archive writes, read_newc reads back unchanged, every header 4-byte aligned;
    a member named like the trailer is refused (it would end the archive early)."""
    if any(e.name == "TRAILER!!!" for e in es):
        with pytest.raises(ValueError, match="end of the archive"):
            newc_archive(es)
        return
    blob = newc_archive(es)
    assert read_newc(blob) == es
    assert len(blob) % 4 == 0


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_reader_rejects_garbage_with_value_error(blob):
    """Random bytes (or a valid prefix followed by them) give entries or ValueError, never more."""
    for data in (blob, b"070701" + blob, newc_archive([CpioEntry("a", stat.S_IFREG | 0o644, b"x")])[:-20] + blob):
        try:
            read_newc(data)
        except ValueError:
            pass


@pytest.mark.parametrize("entry, message", [
    (CpioEntry("../etc/passwd", stat.S_IFREG), r"\.\."),
    (CpioEntry("a\0b", stat.S_IFREG), "NUL"),
    (CpioEntry("big", stat.S_IFREG, uid=1 << 32), "32 bits"),
    (CpioEntry("dir", stat.S_IFDIR | 0o755, b"data"), "carry data"),
    (CpioEntry("TRAILER!!!", stat.S_IFREG | 0o644, b"x"), "TRAILER!!!"),
    (CpioEntry("/./TRAILER!!!/", stat.S_IFDIR | 0o755), "TRAILER!!!"),
])
def test_writer_refuses_what_the_kernel_would_unpack_badly(entry, message):
    """Escaping names, NULs, oversized fields and data on directories are ValueErrors."""
    with pytest.raises(ValueError, match=message):
        newc_archive([entry])


def test_a_member_named_like_the_trailer_is_refused_not_written():
    """Found by hypothesis: a member named TRAILER!!! ended the archive, silently dropping every
    later member (the kernel's unpacker and GNU cpio stop there too). Such a name is refused."""
    later = CpioEntry("init", stat.S_IFREG | 0o755, b"#!/bin/sh\n")
    with pytest.raises(ValueError, match="end of the archive"):
        newc_archive([CpioEntry("TRAILER!!!", stat.S_IFREG | 0o644), later])
    # A name that only contains it, or differs from it, is an ordinary member.
    for name in ("dir/TRAILER!!!", "TRAILER!!", "trailer!!!"):
        assert read_newc(newc_archive([CpioEntry(name, stat.S_IFREG | 0o644), later]))[1] == later


def test_duplicate_and_absolute_names():
    """Leading slashes are dropped; the same path twice is an error."""
    assert read_newc(newc_archive([CpioEntry("/bin/sh", stat.S_IFLNK | 0o777, b"busybox")]))[0].name == "bin/sh"
    with pytest.raises(ValueError, match="duplicate"):
        newc_archive([CpioEntry("/a", stat.S_IFDIR), CpioEntry("a/", stat.S_IFDIR)])


def fake_busybox(tmp_path):
    path = tmp_path / "busybox"
    path.write_bytes(b"\x7fELF" + b"\x02" * 100)
    return path


def test_busybox_initramfs_has_init_busybox_and_console(tmp_path):
    """/init is executable, /bin/sh links to busybox, /dev/console is char 5:1."""
    got = {e.name: e for e in read_newc(build_busybox_initramfs(fake_busybox(tmp_path)))}
    assert got["init"].data.decode() == DEFAULT_INIT and got["init"].mode == stat.S_IFREG | 0o755
    assert INIT_READY_MARKER in DEFAULT_INIT and DEFAULT_INIT.startswith("#!/bin/sh\n")
    assert got["bin/busybox"].data.startswith(b"\x7fELF") and got["bin/busybox"].mode & 0o111
    assert stat.S_ISLNK(got["bin/sh"].mode) and got["bin/sh"].data == b"busybox"
    console = got["dev/console"]
    assert stat.S_ISCHR(console.mode) and (console.rdevmajor, console.rdevminor) == (5, 1)
    for d in ("proc", "sys", "dev", "tmp"):
        assert stat.S_ISDIR(got[d].mode)


def test_custom_init_and_reproducible_output(tmp_path):
    """A caller's script becomes /init; the same inputs give the same bytes (all times 0)."""
    bb = fake_busybox(tmp_path)
    a = build_busybox_initramfs(bb, "#!/bin/sh\necho hi\n")
    assert a == build_busybox_initramfs(bb, "#!/bin/sh\necho hi\n")
    assert {e.name: e.data for e in read_newc(a)}["init"] == b"#!/bin/sh\necho hi\n"


def test_extra_files_come_with_their_directories(tmp_path):
    """files= adds regular files (kernel modules for /init to insmod) and the directories above them."""
    blob = build_busybox_initramfs(fake_busybox(tmp_path), files={"lib/modules/virtio.ko": b"\x7fELF mod",
                                                                 "/etc/motd": b"hi\n"})
    entries = read_newc(blob)
    got = {e.name: e for e in entries}
    assert got["lib/modules/virtio.ko"].data == b"\x7fELF mod" and got["lib/modules/virtio.ko"].mode == stat.S_IFREG | 0o644
    assert stat.S_ISDIR(got["lib"].mode) and stat.S_ISDIR(got["lib/modules"].mode)
    assert got["etc/motd"].data == b"hi\n" and [e.name for e in entries].count("etc") == 1
    names = [e.name for e in entries]
    assert names.index("lib") < names.index("lib/modules") < names.index("lib/modules/virtio.ko")
    with pytest.raises(ValueError, match="already"):
        build_busybox_initramfs(fake_busybox(tmp_path), files={"init": b"x"})


def test_busybox_must_be_an_elf_file(tmp_path):
    """A non-ELF 'busybox' is refused: the kernel could not run it."""
    path = tmp_path / "busybox"
    path.write_text("#!/bin/sh\n")
    with pytest.raises(ValueError, match="ELF"):
        build_busybox_initramfs(path)


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio is not installed")
def test_gnu_cpio_lists_and_extracts_the_archive(tmp_path):
    """An independent reader agrees: GNU cpio extracts the files, links and modes."""
    blob = build_busybox_initramfs(fake_busybox(tmp_path))
    out = tmp_path / "root"
    out.mkdir()
    subprocess.run(["cpio", "-id", "--quiet", "--no-absolute-filenames"], input=blob, cwd=out, check=True)
    assert (out / "init").read_text() == DEFAULT_INIT and (out / "init").stat().st_mode & 0o111
    assert (out / "bin" / "sh").is_symlink() and (out / "bin" / "sh").readlink().name == "busybox"
