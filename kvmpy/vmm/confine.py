"""Confining the VMM process once its machine is built: resource limits, an unprivileged
user, ``no_new_privs`` and a seccomp filter (docs/security.md, "Confining the VMM process").

A guest that finds a bug in a device model runs code as this process. What it can then
do is what the process may do: ``confine()`` narrows that to what a running VM needs.

* **Resource limits** (``setrlimit``): no core files (a core would hold guest RAM) and
  no more open files than the machine has now plus headroom for ``--control``.
* **An unprivileged user** (``run_as="USER[:GROUP]"``): ``setgroups([])``, then the
  group, then the user, all three ids (real, effective, saved), so it cannot be undone.
  Every fd the machine needs (``/dev/kvm``, the VM, the vCPUs, the disks, the serial
  streams) is open already and keeps working.
* **no_new_privs** (``prctl(PR_SET_NO_NEW_PRIVS)``): nothing this process runs can gain
  privileges (setuid binaries, file capabilities); seccomp requires it from non-root.
* **A seccomp filter** built with libseccomp (seccomp(2), seccomp_rule_add(3)), loaded
  into every thread at once (``SECCOMP_FILTER_FLAG_TSYNC``; the compiled program is kept
  in the cache and reused, seccomp_prog.py): the system calls in ``BASE``
  (plus ``CONTROL`` with a control socket or a gdb stub) are allowed; every other one
  fails with an errno that names it: ``REFUSED + its number`` (glibc takes any value up
  to 4095 as an errno). So the Python code that made the call raises ``OSError`` there,
  the run ends with that error, and ``refused_call(error)`` names the call. Nothing is
  killed silently. A call the filter allows only with some arguments (``ioctl``, ``clone``)
  fails with ``REFUSED_ARGS`` when the arguments are not those.

libseccomp is called through ctypes (the Python bindings, Debian's python3-seccomp, serve
only the system Python): the runtime library (Debian's ``libseccomp2``, on every system
with systemd) is all it needs, no header and no compiler. ctypes rather than cffi's ABI
mode because cffi parses its declarations at every start (~70 ms here); ctypes takes
them as they are. The declarations follow libseccomp's seccomp.h.
The filter is process-wide and cannot be removed: test it in a subprocess.
"""
from __future__ import annotations

import ctypes
import errno
import os
import resource
from dataclasses import dataclass, field

from ..errors import KvmpyError
from . import seccomp_prog              # here, not when used: after run_as the stdlib may be unreadable

# --- the errnos that name a refused call ---------------------------------------------
REFUSED = 3072                  # a refused call fails with errno REFUSED + its number
REFUSED_ARGS = REFUSED + 1022   # an allowed call with arguments the filter does not allow
_MAX_NR = 1022                  # x86-64 numbers are < 512 (libseccomp takes errnos up to 4094)

# --- what a running VM needs, measured with strace -f on the demos (docs/security.md) ---
#: Always allowed: the vCPU threads (KVM_RUN, signals for kicks), the Python runtime
#: (memory, threads, locks, clocks), I/O on the fds already open (disks, serial, stdin),
#: and read-only opens (lazy imports such as the disassembler for a triple fault's report,
#: /proc/self/task/*/stat for the guest-time count).
BASE = (
    # KVM: ioctl is allowed for KVM's requests and a few harmless ones only (ARG_RULES)
    "ioctl",
    # memory: guest RAM and the interpreter's heap (realloc of a big block is mremap)
    "mmap", "munmap", "mremap", "mprotect", "madvise", "brk",
    # threads and signals: clone only for threads (ARG_RULES); vCPU kicks are pthread_kill
    "clone", "futex", "set_robust_list", "rseq", "rt_sigaction", "rt_sigprocmask",
    "rt_sigreturn", "tgkill", "gettid", "getpid", "exit", "exit_group",
    # a sleep or wait a stop (SIGSTOP, Ctrl-Z) interrupted goes on through restart_syscall
    "restart_syscall",
    # time: the vDSO's fallbacks, time.sleep
    "clock_gettime", "gettimeofday", "clock_nanosleep",
    # the fds already open: disks (C: preadv/pwritev, Python: preadv2/pwritev2), the
    # serial streams, stdin, /dev/kvm and its children
    "read", "write", "pread64", "pwrite64", "preadv", "pwritev", "preadv2", "pwritev2",
    "lseek", "fdatasync", "close", "newfstatat",
    # waiting: select.select (stdin), socket timeouts
    "pselect6", "poll",
    # read-only opens (ARG_RULES) and what Python's imports look at
    "openat", "getdents64", "readlink",
    # virtio-rng's entropy (os.getrandom); live migration's nonce too
    "getrandom",
)

#: Added with a control socket (``--control``), a gdb stub (``--gdb``) or a chart to
#: write (``--stats-svg``): the listening socket and its clients (SO_PEERCRED against
#: our uid), snapshots into a new directory (``ctl snapshot DIR``: mkdir, files created
#: and written, fsync, rename), live migration over TCP (``ctl migrate HOST:PORT``).
CONTROL = (
    "socket", "bind", "listen", "accept4", "connect", "shutdown", "getsockopt", "setsockopt",
    "getsockname", "getpeername", "recvfrom", "sendto", "getuid",
    "mkdir", "rename", "unlink", "chmod", "fchmod", "ftruncate", "fsync", "getcwd",
)

#: Added with a vsock device and no control socket (``--vsock``): the host side accepts host
#: programs on the socket it bound before the filter, and connects to ``PATH_port`` for a
#: guest; ``socket`` only for UNIX sockets (``VSOCK_RULES``); ``unlink`` removes its socket
#: file at exit. Nothing that creates files, binds or listens.
VSOCK = (
    "socket", "connect", "accept4", "shutdown", "getsockopt", "setsockopt", "getsockname",
    "getpeername", "recvfrom", "sendto", "unlink",
)

#: The calls a running guest makes most, first first: the filter tests them before the rest
#: (libseccomp's default layout is a list ordered by priority: ~15 ms to build, where its
#: binary tree takes ~23; an exit costs microseconds, a test of the list nanoseconds).
HOT = ("ioctl", "futex", "write", "read", "ppoll", "poll", "select", "clock_nanosleep", "pwrite64",
       "pread64", "tgkill", "rt_sigreturn", "clock_gettime")

_KVMIO = 0xAE                   # the type byte of every KVM ioctl (linux/kvm.h)
#: Harmless requests on any fd: isatty(), a socket's timeout (non-blocking), close-on-exec, and
#: setting a terminal's attributes (the console's raw mode ends, or resumes after SIGCONT).
_TTY_AND_FD = {"TCGETS": 0x5401, "TCSETS": 0x5402, "FIONBIO": 0x5421, "FIONCLEX": 0x5450, "FIOCLEX": 0x5451}
_CLONE_THREAD = 0x00010000
_O_WRITE_OR_CREATE = 0o3 | 0o100 | 0o1000       # O_ACCMODE | O_CREAT | O_TRUNC

# scmp_compare: SCMP_CMP_NE, SCMP_CMP_EQ, SCMP_CMP_MASKED_EQ
_NE, _EQ, _MASKED_EQ = 1, 4, 7

#: Allowed only with some arguments: (allow rules, refuse rules), each rule a list of
#: (argument, op, mask or value, value); a call that matches neither fails with
#: REFUSED_ARGS. ioctl: KVM's requests and _TTY_AND_FD's; clone: threads, no
#: processes; openat: read only (with CONTROL any: a snapshot creates its files).
ARG_RULES = {
    "ioctl": ([[(1, _MASKED_EQ, 0xFF00, _KVMIO << 8)]] + [[(1, _EQ, v, 0)] for v in _TTY_AND_FD.values()], []),
    "clone": ([[(0, _MASKED_EQ, _CLONE_THREAD, _CLONE_THREAD)]], [[(0, _MASKED_EQ, _CLONE_THREAD, 0)]]),
    "openat": ([[(2, _MASKED_EQ, _O_WRITE_OR_CREATE, 0)]],
               [[(2, _MASKED_EQ, bit, bit)] for bit in (0o1, 0o2, 0o100, 0o1000)]),
}

_AF_UNIX = 1
#: ARG_RULES' entries for VSOCK without CONTROL (which allows every socket: live migration).
VSOCK_RULES = {"socket": ([[(0, _EQ, _AF_UNIX, 0)]], [[(0, _NE, _AF_UNIX, 0)]])}

#: Refused with ENOSYS, not named: glibc's pthread_create tries clone3 first and falls
#: back to clone, whose flags (unlike clone3's) a filter can read.
FALL_BACK = ("clone3",)

_ACT_ALLOW = 0x7FFF0000                         # SCMP_ACT_ALLOW
_ATTR_ACT_BADARCH, _ATTR_CTL_TSYNC, _ATTR_API_SYSRAWRC = 2, 4, 9
_PR_SET_NO_NEW_PRIVS = 38

MISSING_HINT = ("install Debian's libseccomp2 (the runtime library, libseccomp.so.2), or run "
                "without the sandbox (kvmpy: --no-sandbox; docs/security.md)")


def act_errno(value: int) -> int:
    """SCMP_ACT_ERRNO(value): fail the call with this errno."""
    return 0x00050000 | (value & 0xFFFF)


class ConfineError(KvmpyError):
    """The sandbox could not be set up; nothing was left half done that matters: the
    guest has not run. The message says how to fix it or run without the sandbox."""


@dataclass
class Confinement:
    """What ``confine()`` did: for ``kvmpy`` to report and for tests to check."""

    seccomp: bool = False
    allowed: list[str] = field(default_factory=list)
    user: tuple[int, int] | None = None         # (uid, gid) dropped to
    limits: dict[str, int] = field(default_factory=dict)


_names: dict[int, str] = {}     # syscall number -> name, filled when the filter is built


# --- the one call ------------------------------------------------------------------------
def confine(machine=None, *, control: bool = False, vsock: bool = False, run_as: str | None = None,
            seccomp: bool = True, limits: bool = True) -> Confinement:
    """Confine this process from now on, in the order each step needs: resource limits,
    the unprivileged user (``run_as``, needs setuid), no_new_privs, then the seccomp filter.

    Call it once the machine is built and loaded, before it runs (the filter cannot be
    lifted, and every later Machine in this process runs under it). ``control`` adds
    ``CONTROL`` (a control socket or a gdb stub), ``vsock`` adds ``VSOCK`` (a vsock device's
    host side; CONTROL has all of it). ``machine`` is only checked to be built.
    Raises ``ConfineError`` (the library is missing, an unknown user, not permitted).
    """
    if machine is not None and getattr(machine, "vm", None) is None:
        raise ConfineError("confine() needs a built machine (its /dev/kvm and disk fds open)")
    lib = _library() if seccomp else None          # a missing library fails before any change
    done = Confinement()
    if limits:
        done.limits = set_limits(control, extra_fds=_device_fds(machine))
    if run_as is not None:
        done.user = drop_privileges(*lookup_user(run_as))
    if lib is not None:
        set_no_new_privs()
        done.allowed = load_filter(lib, control, vsock)
        done.seccomp = True
    return done


# --- resource limits ---------------------------------------------------------------------
#: Open files beyond those open now: control clients, a snapshot's files, a migration.
FD_HEADROOM = 64


def _device_fds(machine) -> int:
    """Sockets the devices may open while the guest runs, beyond FD_HEADROOM (which control
    clients and snapshots keep): each vsock host side's connections and half-open handshakes."""
    hosts = [s for s in machine.platform.vsocks if s.backend is not None] if machine is not None else []
    if not hosts:                   # (None: confine() of the caller alone) vsock stays unloaded
        return 0
    from ..devices.virtio.vsock import MAX_CONNECTIONS
    from .vsock import MAX_HANDSHAKES
    return len(hosts) * (MAX_CONNECTIONS + MAX_HANDSHAKES)


def set_limits(control: bool, extra_fds: int = 0) -> dict[str, int]:
    """RLIMIT_CORE 0: a crash writes no core file (it would hold guest RAM). RLIMIT_NOFILE:
    the highest fd open now plus FD_HEADROOM plus ``extra_fds`` (the devices' own sockets), so a
    guest cannot make the VMM hold more, nor take the headroom control clients need.
    Not limited: RLIMIT_AS (guest RAM is mapped and big), RLIMIT_FSIZE (disks and the
    serial log are written), RLIMIT_NPROC (counted per user; seccomp allows threads only)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    highest = max((int(fd) for fd in os.listdir("/proc/self/fd")), default=2)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = highest + 1 + FD_HEADROOM + extra_fds
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
    return {"core": 0, "nofile": want}


# --- an unprivileged user ----------------------------------------------------------------
def lookup_user(spec: str) -> tuple[int, int]:
    """``USER[:GROUP]`` (names or numbers) -> (uid, gid); the group defaults to the user's."""
    import grp
    import pwd
    user, _, group = spec.partition(":")
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        uid, gid = entry.pw_uid, entry.pw_gid
    except KeyError:
        if not user.isdigit():
            raise ConfineError(f"no user named {user!r} (--run-as USER[:GROUP])") from None
        uid, gid = int(user), int(user)
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfineError(f"no group named {group!r} (--run-as USER[:GROUP])") from None
    return uid, gid


def drop_privileges(uid: int, gid: int) -> tuple[int, int]:
    """Become ``uid``:``gid`` for good: no supplementary groups, then real, effective and
    saved group, then user ids (glibc applies each to every thread)."""
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except PermissionError as e:
        raise ConfineError(f"cannot become uid {uid}, gid {gid}: {e.strerror} "
                           "(dropping privileges needs root or CAP_SETUID/CAP_SETGID)") from None
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise ConfineError(f"dropping to uid {uid}, gid {gid} did not hold")
    return uid, gid


# --- no_new_privs and the filter -----------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)


class _ArgCmp(ctypes.Structure):
    """struct scmp_arg_cmp: the argument's index, a scmp_compare op, two data."""

    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


#: The libseccomp functions used, from seccomp.h: name -> (restype, argtypes).
_SIGNATURES = {
    "seccomp_init": (ctypes.c_void_p, [ctypes.c_uint32]),
    "seccomp_release": (None, [ctypes.c_void_p]),
    "seccomp_attr_set": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]),
    "seccomp_rule_add_array": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                              ctypes.c_uint, ctypes.POINTER(_ArgCmp)]),
    "seccomp_syscall_resolve_num_arch": (ctypes.c_void_p, [ctypes.c_uint32, ctypes.c_int]),
    "seccomp_syscall_priority": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint8]),
}


def _library():
    """libseccomp with the functions above declared; ConfineError if it is missing."""
    try:
        lib = ctypes.CDLL("libseccomp.so.2")
    except OSError:
        raise ConfineError(f"the seccomp sandbox needs libseccomp: {MISSING_HINT}") from None
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def set_no_new_privs() -> None:
    """prctl(PR_SET_NO_NEW_PRIVS, 1): execve can never grant privileges again (one way)."""
    if _libc.prctl(_PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0),
                   ctypes.c_ulong(0)) != 0:
        raise ConfineError(f"prctl(PR_SET_NO_NEW_PRIVS) failed: {os.strerror(ctypes.get_errno())}")


def syscall_names(lib) -> dict[int, str]:
    """Every system call libseccomp knows on this architecture: number -> name."""
    names = {}
    for nr in range(_MAX_NR):
        p = lib.seccomp_syscall_resolve_num_arch(0, nr)     # SCMP_ARCH_NATIVE; malloc'd
        if p:
            names[nr] = ctypes.string_at(p).decode()
            _libc.free(ctypes.c_void_p(p))
    return names


def _rules(name: str, nr: int, allowed: set[str], control: bool, vsock: bool) -> list[tuple[int, list]]:
    """The (action, argument comparisons) rules for system call ``name``."""
    rules = ARG_RULES.get(name)
    if vsock and not control:
        rules = VSOCK_RULES.get(name, rules)
    if rules is not None and not (control and name == "openat"):
        allow, refuse = rules
        return [(_ACT_ALLOW, r) for r in allow] + [(act_errno(REFUSED + nr), r) for r in refuse]
    if name in allowed:
        return [(_ACT_ALLOW, [])]
    return [(act_errno(errno.ENOSYS if name in FALL_BACK else REFUSED + nr), [])]


def load_filter(lib, control: bool, vsock: bool = False) -> list[str]:
    """Build the filter, load it into every thread; returns the names it allows. The program
    libseccomp compiles is kept and reused while its inputs stay the same (seccomp_prog.py)."""
    allowed = set(BASE) | (set(CONTROL) if control else set()) | (set(VSOCK) if vsock else set())
    names = syscall_names(lib)
    plan = {"default": act_errno(REFUSED_ARGS),
            "attrs": ((_ATTR_API_SYSRAWRC, 1), (_ATTR_CTL_TSYNC, 1), (_ATTR_ACT_BADARCH, act_errno(REFUSED_ARGS))),
            "hot": tuple((nr, 255 - HOT.index(name)) for nr, name in names.items() if name in HOT),
            "rules": tuple((nr, name, tuple(_rules(name, nr, allowed, control, vsock))) for nr, name in names.items())}
    path = seccomp_prog.cache_path(seccomp_prog.key(lib, plan))
    prog = seccomp_prog.read(path)
    if prog is not None:
        try:
            seccomp_prog.install(prog)
        except OSError:
            prog = None                     # not a program this kernel takes: compile it again
    if prog is None:
        prog = _compile(lib, plan)
        seccomp_prog.store(path, prog)      # before the filter, which refuses creating files
        try:
            seccomp_prog.install(prog)
        except OSError as e:
            raise ConfineError(f"loading the seccomp filter failed: {e.strerror}") from None
    _names.update(names)
    conditional = set(ARG_RULES) | (set(VSOCK_RULES) if vsock and not control else set())
    return sorted(n for n in names.values() if n in allowed or n in conditional)


def _compile(lib, plan: dict) -> bytes:
    """libseccomp's BPF program for ``plan`` (load_filter's rules as plain data)."""
    ctx = lib.seccomp_init(plan["default"])
    if not ctx:
        raise ConfineError("seccomp_init failed")
    try:
        for attr, value in plan["attrs"]:
            _check(lib.seccomp_attr_set(ctx, attr, value), f"seccomp_attr_set({attr})")
        for nr, priority in plan["hot"]:    # the calls a running guest makes most: tested first
            _check(lib.seccomp_syscall_priority(ctx, nr, priority), f"priority of {nr}")
        for nr, name, rules in plan["rules"]:
            for action, cmps in rules:
                array = (_ArgCmp * max(1, len(cmps)))(*(_ArgCmp(*c) for c in cmps))
                _check(lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), array), f"the rule for {name}")
        try:
            return seccomp_prog.export(lib, ctx)
        except OSError as e:
            raise ConfineError(str(e)) from None
    finally:
        lib.seccomp_release(ctx)


def _check(rc: int, what: str) -> None:
    if rc < 0:
        raise ConfineError(f"{what} failed: {os.strerror(-rc)}")


# --- naming a refused call -----------------------------------------------------------------
def refused_call(error: BaseException | None) -> str | None:
    """The name of the system call the filter refused, if ``error`` (or what caused it)
    is such a refusal; else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        code = getattr(error, "errno", None) if isinstance(error, OSError) else None
        if code == REFUSED_ARGS:
            return "ioctl with a request that is not KVM's (or a call libseccomp does not know)"
        if isinstance(code, int) and REFUSED <= code < REFUSED_ARGS:
            return _names.get(code - REFUSED, f"number {code - REFUSED}")
        error = error.__cause__ or error.__context__
    return None


def refusal_message(error: BaseException) -> str | None:
    """The one-line report of a refused call (None if ``error`` is not one)."""
    name = refused_call(error)
    if name is None:
        return None
    return (f"the sandbox's seccomp filter refused the system call {name} ({error}); kvmpy's "
            "sandbox allows only what a running VM needs (docs/security.md): run with "
            "--no-sandbox to allow it")
