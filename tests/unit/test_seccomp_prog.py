"""The kept seccomp program (kvmpy/vmm/seccomp_prog.py): a file in the cache is used only if
it checks out, whatever is in it, and a kept program comes back byte for byte."""
import hashlib
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.vmm import seccomp_prog as S

PROG = bytes(range(8)) * 40            # 40 instructions (the kernel judges them; read() does not)


def test_a_stored_program_reads_back_the_same(tmp_path):
    path = tmp_path / "seccomp" / "k.bpf"
    S.store(path, PROG)
    assert S.read(path) == PROG
    assert os.listdir(path.parent) == ["k.bpf"]        # no temporary file is left


def test_a_missing_or_unwritable_cache_is_no_error(tmp_path):
    assert S.read(tmp_path / "none.bpf") is None
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o500)
    S.store(tmp_path / "ro" / "sub" / "k.bpf", PROG)   # root may still write: either way, no error
    (tmp_path / "file").touch()
    S.store(tmp_path / "file" / "k.bpf", PROG)          # a file where the directory should be


def _kept(prog: bytes, n: int | None = None, digest: bytes | None = None) -> bytes:
    n = len(prog) // 8 if n is None else n
    return S.MAGIC + n.to_bytes(4, "little") + (digest or hashlib.sha256(prog).digest()) + prog


@settings(max_examples=300)
@given(data=st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=64).map(lambda b: S.MAGIC + b),
    st.tuples(st.binary(max_size=100), st.integers(0, 2**32 - 1)).map(lambda t: _kept(t[0], t[1])),
    st.tuples(st.binary(min_size=8, max_size=100), st.binary(min_size=32, max_size=32))
      .map(lambda t: _kept(t[0], None, t[1]))))
def test_no_file_is_taken_unless_its_header_and_hash_agree(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("c") / "k.bpf"
    path.write_bytes(data)
    prog = S.read(path)
    if prog is not None:
        assert data == _kept(prog) and len(prog) % 8 == 0 and 0 < len(prog) // 8 <= 4096


def test_one_flipped_byte_makes_a_kept_program_unusable(tmp_path):
    path = tmp_path / "k.bpf"
    S.store(path, PROG)
    data = bytearray(path.read_bytes())
    for i in (0, len(S.MAGIC), len(S.MAGIC) + 4, len(data) - 1):
        bad = bytearray(data)
        bad[i] ^= 1
        path.write_bytes(bytes(bad))
        assert S.read(path) is None, i
