"""``kvmpy fuzz run`` (docs/fuzzing.md, "AFL++"): one input on its own, and AFL++'s fork-server
protocol, spoken to a fake afl-fuzz here (pipes on fds 198/199, a SysV shm segment) and,
when afl-fuzz is installed, to the real one for a short campaign.
"""
import ctypes
import ctypes.util
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpy.fuzz import afl

from . import lab

BENIGN = b"FZ\x01S\x02ab"
PAGE_FAULT = b"FZ\x01K\x04kvm!"
UD = b"FZ\x01U\x02\xff\xee"
ASSERT = b"FZ\x01A\x03\x05\x02\x02"      # 5 != 2 + 2
GOOD_CHECKSUM = b"FZ\x01A\x03\x04\x02\x02"  # 4 == 2 + 2: no crash, one byte away from one
SPIN = b"FZ\x01H\x01\x77"
MAP = 1 << 16
ARGS = ["fuzz", "run", "--report", "0x43=assert"]

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
libc.shmctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
IPC_PRIVATE, IPC_CREAT, IPC_RMID = 0, 0o1000, 0


def kvmpy(*args, **kw):
    env = dict(os.environ, PYTHONPATH=lab.CHILD_ENV["PYTHONPATH"])
    return subprocess.run([sys.executable, "-m", "kvmpy", *args], capture_output=True, env=env,
                          timeout=60, cwd="/", **kw)


def test_one_input_from_a_file_and_from_stdin(tmp_path):
    f = tmp_path / "case"
    f.write_bytes(BENIGN)
    r = kvmpy(*ARGS, str(f))
    assert r.returncode == 0 and r.stdout.startswith(b"ok: exit 0x44"), r
    r = kvmpy(*ARGS, input=PAGE_FAULT)
    assert r.returncode == 1 and b"crash: #PF" in r.stdout and b"address=0x7f0000000000" in r.stdout, r
    r = kvmpy(*ARGS, input=bytes(1 << 16))
    assert r.returncode == 2 and b"longer than" in r.stderr, r
    r = kvmpy(*ARGS, "--end-at", "fuzz_check_key", input=PAGE_FAULT)    # ends before the bug
    assert r.returncode == 0 and r.stdout.startswith(b"ok: reached 0x") and b"stop: address" in r.stdout, r


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


class FakeAfl:
    """afl-fuzz's side of the protocol: the pipes on the target's 198/199, the map in shm."""

    def __init__(self, tmp_path, *extra, timeout="1", cases_in_shm=False):
        self.shm_id = libc.shmget(IPC_PRIVATE, MAP, IPC_CREAT | 0o600)
        assert self.shm_id >= 0
        self.map = afl.SharedMap(self.shm_id, MAP)
        self.fuzz_id = self.cases = None
        if cases_in_shm:
            self.fuzz_id = libc.shmget(IPC_PRIVATE, afl.MAX_INPUT + 4, IPC_CREAT | 0o600)
            assert self.fuzz_id >= 0
            self.cases = afl.SharedMap(self.fuzz_id, afl.MAX_INPUT + 4)
        self.case = tmp_path / "cur_input"
        ctl_r, self.ctl = os.pipe()
        self.st, st_w = os.pipe()

        # the pipes where afl-fuzz puts them, for the child only (pytest is single-threaded)
        for fd in (afl.CTL_FD, afl.ST_FD):
            assert not _open(fd)
        os.dup2(ctl_r, afl.CTL_FD)
        os.dup2(st_w, afl.ST_FD)
        env = dict(os.environ, PYTHONPATH=lab.CHILD_ENV["PYTHONPATH"], __AFL_SHM_ID=str(self.shm_id))
        if self.fuzz_id is not None:
            env["__AFL_SHM_FUZZ_ID"] = str(self.fuzz_id)
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "kvmpy", *ARGS, "--timeout", timeout, *extra,
                                          str(self.case)], env=env, pass_fds=(afl.CTL_FD, afl.ST_FD),
                                         stderr=subprocess.PIPE, cwd="/")
        finally:
            for fd in (afl.CTL_FD, afl.ST_FD, ctl_r, st_w):
                os.close(fd)

    def word(self, timeout=30.0):
        ready, _, _ = select.select([self.st], [], [], timeout)
        if not ready:
            return None
        data = os.read(self.st, 4)
        assert len(data) == 4, data
        return struct.unpack("<i", data)[0]

    def run(self, data: bytes, timed_out=0):
        if self.cases is not None:
            self.cases.write(struct.pack("<I", len(data)) + data)
        else:
            self.case.write_bytes(data)
        self.map.write(bytes(MAP))
        os.write(self.ctl, struct.pack("<I", timed_out))
        pid = self.word()
        assert pid and pid > 0
        return pid

    def close(self):
        os.close(self.ctl)
        rc = self.proc.wait(timeout=30)
        os.close(self.st)
        self.map.close()
        libc.shmctl(self.shm_id, IPC_RMID, None)
        if self.cases is not None:
            self.cases.close()
            libc.shmctl(self.fuzz_id, IPC_RMID, None)
        return rc


def ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_fork_server_protocol_with_a_fake_afl(tmp_path):
    a = FakeAfl(tmp_path, timeout="0.3")
    try:
        hello = a.word() & 0xFFFFFFFF
        assert hello & afl.FS_OPT_ENABLED == afl.FS_OPT_ENABLED
        assert hello & afl.FS_OPT_MAPSIZE and afl.fs_opt_get_mapsize(hello) == MAP

        pid = a.run(BENIGN)
        assert ppid(pid) == a.proc.pid              # a decoy of the target's, never a stranger
        status = a.word()
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        benign_map = a.map.read(0, MAP)
        assert sum(1 for b in benign_map if b) > 0   # coverage landed in afl-fuzz's map

        assert a.run(PAGE_FAULT) == pid             # no fork per case: the same decoy
        status = a.word()
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV
        assert a.map.read(0, MAP) != benign_map
        for data, sig in ((UD, signal.SIGILL), (ASSERT, signal.SIGABRT)):
            a.run(data)
            status = a.word()
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == sig, data

        # a timeout: the status waits for afl-fuzz's own timer (it kills the pid it got)
        pid = a.run(SPIN)
        assert a.word(timeout=1.0) is None
        os.kill(pid, signal.SIGKILL)
        status = a.word()
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        # ... and the next case gets a new, live decoy, and is itself again
        pid2 = a.run(BENIGN, timed_out=1)
        assert pid2 != pid and ppid(pid2) == a.proc.pid
        assert a.word() == 0 and a.map.read(0, MAP) == benign_map

        # hostile cases: empty, too long for the guest's buffer (afl-fuzz's mutations grow them)
        for data in (b"", os.urandom(1 << 17)):
            a.run(data)
            assert a.word() is not None
    finally:
        rc = a.close()
    assert rc == 0, a.proc.stderr.read()


def test_afl_s_smaller_map_gets_the_guest_s_folded_onto_it(tmp_path):
    """AFL_MAP_SIZE smaller than the guest's map: the map is folded and the size announced."""
    os.environ["AFL_MAP_SIZE"] = "4096"
    try:
        a = FakeAfl(tmp_path)
    finally:
        del os.environ["AFL_MAP_SIZE"]
    try:
        assert afl.fs_opt_get_mapsize(a.word() & 0xFFFFFFFF) == 4096
        a.run(BENIGN)
        assert a.word() == 0
        assert any(a.map.read(0, 4096)) and not any(a.map.read(4096, MAP - 4096))
    finally:
        assert a.close() == 0


def test_test_cases_in_shared_memory(tmp_path):
    a = FakeAfl(tmp_path, cases_in_shm=True)
    try:
        hello = a.word() & 0xFFFFFFFF
        assert hello & afl.FS_OPT_SHDMEM_FUZZ
        os.write(a.ctl, struct.pack("<I", afl.FS_OPT_ENABLED | afl.FS_OPT_SHDMEM_FUZZ))
        a.run(BENIGN)
        assert a.word() == 0
        a.run(PAGE_FAULT)
        status = a.word()
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV
        assert not a.case.exists()                  # the cases came through the segment
        a.cases.write(struct.pack("<I", 0xFFFFFFFF))  # a length past the segment: cut, not read beyond
        os.write(a.ctl, struct.pack("<I", 0))
        assert a.word() > 0 and a.word() is not None
    finally:
        assert a.close() == 0


@pytest.mark.skipif(shutil.which("afl-fuzz") is None, reason="afl-fuzz is not installed (apt-get install afl++)")
def test_a_short_afl_fuzz_campaign_finds_the_shallow_bug(tmp_path):
    """A 10-second campaign (the README's recipe) finds the 'A'-checksum report: a crash in
    out/default/crashes, SIGABRT (sig:06). The second seed helps without holding the bug: an
    'A' record whose checksum is right, so one changed payload byte is the bug."""
    seeds, out = tmp_path / "seeds", tmp_path / "out"
    seeds.mkdir()
    (seeds / "benign").write_bytes(BENIGN)
    (seeds / "checksum").write_bytes(GOOD_CHECKSUM)
    r = kvmpy(*ARGS, str(seeds / "checksum"))
    assert r.returncode == 0 and r.stdout.startswith(b"ok: exit 0x44"), r      # the seed is no crash
    target = tmp_path / "kvmpy"
    target.write_text(f"#!/bin/sh\nexec {sys.executable} -m kvmpy \"$@\"\n")
    target.chmod(0o755)
    env = dict(os.environ, PYTHONPATH=lab.CHILD_ENV["PYTHONPATH"], AFL_SKIP_CPUFREQ="1", AFL_NO_UI="1",
               AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES="1", AFL_SKIP_BIN_CHECK="1", AFL_NO_AFFINITY="1")
    r = subprocess.run(["afl-fuzz", "-V", "10", "-t", "2000", "-i", str(seeds), "-o", str(out), "--",
                        str(target), *ARGS, "--timeout", "1", "@@"],
                       env=env, capture_output=True, timeout=120, stdin=subprocess.DEVNULL, cwd="/")
    stats = dict(line.split(":", 1) for line in (out / "default" / "fuzzer_stats").read_text().splitlines())
    stats = {k.strip(): v.strip() for k, v in stats.items()}
    assert r.returncode == 0, r.stdout[-2000:]
    assert int(stats["execs_done"]) > 100
    assert int(stats["corpus_count"]) > 2            # our coverage told it something
    crashes = [p.name for p in (out / "default" / "crashes").glob("id:*")]
    assert any(",sig:06," in name for name in crashes), (crashes, stats)     # the report, as SIGABRT
