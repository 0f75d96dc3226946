"""AFL++'s fork-server protocol, spoken by a kvmpy harness (``kvmpy fuzz run``, docs/fuzzing.md).

afl-fuzz starts its target with a control pipe on fd 198 (afl-fuzz -> target) and a
status pipe on fd 199 (target -> afl-fuzz), and the coverage map in a SysV shared-memory
segment named by ``$__AFL_SHM_ID``. The protocol of the AFL++ this project matches
(Debian's ``afl++`` 4.04c), all words 4 bytes, host order:

1. hello: the target writes one word to 199. With ``FS_OPT_ENABLED`` set it carries
   options; we send ``FS_OPT_MAPSIZE`` and our map size, so afl-fuzz checks it against
   its own (``AFL_MAP_SIZE``, default 65536) and stops with a message when it is smaller.
   When afl-fuzz offers shared-memory test cases (``$__AFL_SHM_FUZZ_ID``) the hello also
   says ``FS_OPT_SHDMEM_FUZZ``, and afl-fuzz answers one word on 198 to agree.
2. per case: afl-fuzz writes a word to 198 (1 if it killed the last child on a timeout),
   the target answers a child pid on 199, then, when the case is over, its wait status.

No process is forked per case (persistent in kvmpy's way: the harness resets the guest
in place). The pid we answer belongs to a *decoy*, a child process that only waits: on a
timeout afl-fuzz kills the pid it was given, so it must be a process of ours, and its
death tells us afl-fuzz gave up on the case. A crash is answered as the status of a
process killed by a signal (SIGSEGV for #PF/#GP..., SIGILL for #UD, SIGABRT for a
report), which afl-fuzz counts as a crash; a timeout as the status of its kill signal
after its own timer fired, which it counts as a timeout.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import signal
import struct
import sys
import time

CTL_FD, ST_FD = 198, 199
FS_OPT_ENABLED = 0x80000001
FS_OPT_MAPSIZE = 0x40000000
FS_OPT_SHDMEM_FUZZ = 0x01000000
SHMEM_FUZZ_HDR_SIZE = 4                 # a shared-memory test case: its length (u32), then its bytes
FS_OPT_MAX_MAPSIZE = (0x00FFFFFE >> 1) + 1
MAX_INPUT = 1 << 20                     # afl-fuzz's MAX_FILE: a longer file is not one of its cases

#: The signal a crash of each kind is reported as (others: SIGSEGV).
CRASH_SIGNALS = {"#UD": signal.SIGILL, "#DE": signal.SIGFPE, "#MF": signal.SIGFPE, "#XM": signal.SIGFPE,
                 "#BP": signal.SIGTRAP, "#DB": signal.SIGTRAP}


def fs_opt_set_mapsize(size: int) -> int:
    if size <= 1 or size > FS_OPT_MAX_MAPSIZE:
        raise ValueError(f"a map of {size} bytes cannot be announced to AFL++")
    return (size - 1) << 1


def fs_opt_get_mapsize(word: int) -> int:
    return ((word & 0x00FFFFFE) >> 1) + 1


def wait_status(outcome, *, kill_signal: int = signal.SIGKILL) -> int:
    """The wait status afl-fuzz is told for ``outcome`` (os.WIFSIGNALED etc. read it back)."""
    if not outcome.crashed:
        return 0                                        # exited 0
    if outcome.kind == "timeout":
        return kill_signal
    if outcome.kind in CRASH_SIGNALS:
        return int(CRASH_SIGNALS[outcome.kind])
    if outcome.stop == "exit":                          # a report value (reports={...})
        return int(signal.SIGABRT)
    return int(signal.SIGSEGV)


class AflError(Exception):
    pass


def shm_size(shm_id: int) -> int:
    """The size of SysV segment ``shm_id`` (shmctl IPC_STAT: never trust a size we are told)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.shmctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    ds = ctypes.create_string_buffer(256)               # struct shmid_ds (112 bytes on x86-64)
    if libc.shmctl(shm_id, 2, ds) != 0:                 # IPC_STAT
        raise AflError(f"shmctl({shm_id}, IPC_STAT): {os.strerror(ctypes.get_errno())}")
    return struct.unpack_from("<Q", ds, 48)[0]          # shm_segsz, after the 48-byte ipc_perm


class SharedMap:
    """A SysV shared-memory segment attached through libc's shmat (the coverage map, or
    the test cases of ``__AFL_SHM_FUZZ_ID``)."""

    def __init__(self, shm_id: int, size: int):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.shmat.restype = ctypes.c_void_p
        libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
        libc.shmdt.argtypes = [ctypes.c_void_p]
        self._libc = libc
        addr = libc.shmat(shm_id, None, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            err = ctypes.get_errno()
            raise AflError(f"shmat({shm_id}): {os.strerror(err)}")
        self.addr, self.size = addr, size
        self._buf = (ctypes.c_char * size).from_address(addr)

    def write(self, data: bytes) -> None:
        ctypes.memmove(self.addr, data, min(len(data), self.size))

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        return ctypes.string_at(self.addr + offset, length)

    def close(self) -> None:
        if self.addr is not None:
            self._libc.shmdt(self.addr)
            self.addr = None


def _read_exact(fd: int, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        try:
            chunk = os.read(fd, n - len(buf))
        except InterruptedError:
            continue
        if not chunk:
            return None
        buf += chunk
    return buf


def _fold(coverage: bytes, size: int) -> bytes:
    """A guest map folded onto AFL++'s smaller one (index modulo ``size``, saturating)."""
    if len(coverage) <= size:
        return coverage
    out = bytearray(coverage[:size])
    for base in range(size, len(coverage), size):
        for i, v in enumerate(coverage[base:base + size]):
            if v:
                out[i] = min(255, out[i] + v)
    return bytes(out)


class Decoy:
    """A child process that only waits: the pid afl-fuzz is given, and may kill."""

    def __init__(self):
        self.pid = None
        self.spawn()

    def spawn(self) -> None:
        pid = os.fork()
        if pid == 0:                                    # the child: wait to be killed
            try:
                os.closerange(3, 1 << 16)
                while True:
                    signal.pause()
            finally:
                os._exit(0)
        self.pid = pid

    def alive(self) -> bool:
        try:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return False
        return pid == 0

    def wait_killed(self) -> None:
        """Until afl-fuzz kills the decoy, or closes its control pipe (it is gone: nothing
        will kill the decoy, and it writes nothing on 198 while it waits for a status)."""
        while self.alive():
            readable, _, _ = select.select([CTL_FD], [], [], 0.05)
            if readable:
                return

    def ensure(self) -> int:
        if not self.alive():
            self.spawn()
        return self.pid

    def close(self) -> None:
        if self.pid and self.alive():
            os.kill(self.pid, signal.SIGKILL)
            self.wait_killed()


def in_afl() -> bool:
    """Were we started by afl-fuzz (its two pipes open, its map named)?"""
    if "__AFL_SHM_ID" not in os.environ:
        return False
    try:
        os.fstat(CTL_FD)
        os.fstat(ST_FD)
    except OSError:
        return False
    return True


def serve(harness, *, input_path: str | None, log=None) -> int:
    """Be afl-fuzz's fork server until it closes the control pipe; the number of cases run.
    ``input_path``: the file afl-fuzz writes each case to (``@@``), None for stdin."""
    try:
        shm_id = int(os.environ["__AFL_SHM_ID"])
    except (KeyError, ValueError):
        raise AflError("__AFL_SHM_ID is missing or not a number")
    map_size = _map_size(harness.coverage_size, shm_id)
    kill_signal = signal.SIGKILL
    if os.environ.get("AFL_KILL_SIGNAL", "").isdigit():
        kill_signal = int(os.environ["AFL_KILL_SIGNAL"]) or signal.SIGKILL
    shm = SharedMap(shm_id, map_size)
    cases_shm = None
    hello = FS_OPT_ENABLED | FS_OPT_MAPSIZE | fs_opt_set_mapsize(map_size)
    if os.environ.get("__AFL_SHM_FUZZ_ID", "").isdigit():
        fuzz_id = int(os.environ["__AFL_SHM_FUZZ_ID"])
        size = shm_size(fuzz_id)
        if size > SHMEM_FUZZ_HDR_SIZE:
            cases_shm = SharedMap(fuzz_id, size)
            hello |= FS_OPT_SHDMEM_FUZZ
    decoy = Decoy()
    cases = 0
    try:
        os.write(ST_FD, struct.pack("<I", hello))
        if cases_shm is not None and not _agreed():   # afl-fuzz agrees, or we read the file
            cases_shm.close()
            cases_shm = None
        while True:
            req = _read_exact(CTL_FD, 4)
            if req is None:                             # afl-fuzz is done (or gone)
                return cases
            if cases_shm is not None:
                n = struct.unpack("<I", cases_shm.read(0, 4))[0]
                data = cases_shm.read(SHMEM_FUZZ_HDR_SIZE, min(n, harness.input_size))
            else:
                data = _case(input_path, harness.input_size)
            os.write(ST_FD, struct.pack("<i", decoy.ensure()))
            outcome = harness.run(data)
            shm.write(_fold(outcome.coverage, map_size))
            status = wait_status(outcome, kill_signal=kill_signal)
            if outcome.kind == "timeout":
                # afl-fuzz counts a timeout only when its own timer fired and it killed the
                # pid: wait for that, so it does not count our budget's end as a crash
                decoy.wait_killed()
            os.write(ST_FD, struct.pack("<i", status))
            cases += 1
            if log is not None and outcome.crashed:
                print(f"kvmpy fuzz: case {cases}: {outcome.kind}", file=log)
    except BrokenPipeError:
        return cases
    finally:
        decoy.close()
        shm.close()
        if cases_shm is not None:
            cases_shm.close()


def _map_size(guest_size: int, shm_id: int) -> int:
    """The map size to announce: the guest's, AFL_MAP_SIZE's, the segment's, the smallest."""
    try:
        afl_size = int(os.environ.get("AFL_MAP_SIZE", "65536"), 0)
    except ValueError:
        raise AflError("AFL_MAP_SIZE is not a number")
    if not 1 < afl_size <= FS_OPT_MAX_MAPSIZE:
        raise AflError(f"AFL_MAP_SIZE {afl_size} out of range")
    size = min(guest_size, afl_size, shm_size(shm_id))
    if size < 2:
        raise AflError(f"the shared map {shm_id} is too small")
    return size


def _agreed() -> bool:
    """afl-fuzz's answer to FS_OPT_SHDMEM_FUZZ in our hello: does it send cases that way?"""
    reply = _read_exact(CTL_FD, 4)
    if reply is None:
        raise BrokenPipeError("afl-fuzz closed its control pipe")
    both = FS_OPT_ENABLED | FS_OPT_SHDMEM_FUZZ
    return struct.unpack("<I", reply)[0] & both == both


def _case(input_path: str | None, limit: int) -> bytes:
    """This case's bytes, cut to the guest's buffer (afl-fuzz's mutations may grow a case
    past it; the guest sees the prefix that fits)."""
    if input_path is None:
        os.lseek(0, 0, os.SEEK_SET)                     # afl-fuzz rewrites the same stdin file
        data = b""
        while len(data) < limit:
            chunk = os.read(0, limit - len(data))
            if not chunk:
                break
            data += chunk
        return data
    try:
        with open(input_path, "rb") as f:
            return f.read(limit)
    except OSError:
        return b""
