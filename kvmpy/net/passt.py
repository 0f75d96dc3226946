"""User-mode networking through passt (https://passt.top, Debian package ``passt``).

passt is a user-space program that gives a guest a network without privileges: it
answers the guest's ARP, DHCP, NDP and DHCPv6, and turns the guest's TCP, UDP and ICMP
into ordinary sockets on the host (NAT to the host's own address). Traffic the guest
sends to its default gateway's address reaches the host's loopback (passt maps the
gateway to 127.0.0.1/::1 unless told ``--no-map-gw``), so a server on the host's
127.0.0.1:PORT is at GATEWAY:PORT for the guest. It speaks the frame stream of QEMU's
``-netdev stream`` (stream.py) on a UNIX stream socket.

Two ways to get one (``Passt.start``/``Passt.connect``):

- **kvmpy starts passt** as its child on one end of a ``socketpair``, handed over with
  ``passt --fd`` (``-F``): no socket file at all, so nobody else can connect to it.
  ``--foreground`` keeps it our child; ``--mtu 1500`` makes its DHCP and NDP assign
  the MTU the virtio-net device offers (VIRTIO_NET_F_MTU). It ends when its end of the
  socket closes (a passt given ``--fd`` serves that one connection), so it never outlives
  kvmpy: ``close()`` closes our end and then waits for it (SIGTERM, then SIGKILL), the
  kernel closes our end if kvmpy dies, and the child also gets SIGKILL through
  PR_SET_PDEATHSIG. When run as root, passt changes to the user ``nobody`` itself.
  Both ends get the biggest send and receive buffers the host allows (:func:`size_buffers`),
  as passt gives a connection it accepts on its own socket: passt drops the frames its
  socket cannot take at once (its TCP then recovers them slowly), and a passt given
  ``--fd`` would otherwise keep the default buffer of ~200 KB (some 140 frames).
- **kvmpy connects** to a passt someone else started (``passt -s PATH``, or any peer of
  the same protocol, such as another VMM's ``-netdev stream,server=on``).

Addresses: passt copies the host's (the guest gets the host's address and default
gateway by DHCP), unless ``-a``/``-n``/``-g`` in ``args`` say otherwise. On a host with
no default route passt exits at once ("External interface not usable") unless given
``-i IFACE -g GATEWAY`` with IFACE a non-loopback interface holding an address (this
passt refuses ``-i lo``); we pass its words on.
"""
from __future__ import annotations

import ctypes
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from .backend import NetBackendError, StreamBackend

#: How long a started passt has to show it did not fail at once (it exits when it
#: cannot find an interface or address), and to end when asked.
START_CHECK_S = 0.25
STOP_WAIT_S = 2.0
PR_SET_PDEATHSIG = 1
MTU = 1500


#: What passt asks for on the connections it accepts (INT_MAX / 2): the kernel caps it at
#: net.core.wmem_max and rmem_max (doubled), the most an unprivileged process may have.
BUFFER_ASK = (1 << 31) // 2


def size_buffers(sock: socket.socket) -> None:
    """The biggest SO_SNDBUF and SO_RCVBUF the host allows on ``sock`` (as passt sets on the
    connections it accepts); a refusal leaves the default."""
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, BUFFER_ASK)
        except OSError:
            pass


def _die_with_parent() -> None:                      # runs in the child, between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _stop(child: subprocess.Popen) -> None:
    """Wait for ``child`` to end (it does once its socket is closed), then make it."""
    deadline = time.monotonic() + STOP_WAIT_S
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            child.wait(max(0.0, deadline - time.monotonic()))
            return
        except subprocess.TimeoutExpired:
            child.send_signal(sig)
            deadline = time.monotonic() + STOP_WAIT_S
    child.wait()


class Passt(StreamBackend):
    """A connection to passt (see the module docstring); ``child`` is the passt kvmpy started."""

    kind = "passt"

    def __init__(self, sock: socket.socket, what: str, child: subprocess.Popen | None = None, log=None):
        super().__init__(sock, what)
        self.child, self.log = child, log

    @classmethod
    def start(cls, passt: str = "passt", args: tuple[str, ...] = ()) -> "Passt":
        """Start ``passt`` (a path or a name on PATH) as our child; ``args`` are extra passt options."""
        exe = shutil.which(passt)
        if exe is None:
            raise NetBackendError(f"passt: {passt!r} is not installed or not on PATH (Debian: apt-get "
                                  "install passt), or give --net passt:SOCKET to use a running one")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        size_buffers(ours)
        size_buffers(theirs)
        log = tempfile.TemporaryFile(prefix="kvmpy-passt-")
        cmd = [exe, "--foreground", "--quiet", "--mtu", str(MTU), "--fd", str(theirs.fileno()), *args]
        try:
            child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     pass_fds=[theirs.fileno()], preexec_fn=_die_with_parent)
        except OSError as e:
            ours.close()
            log.close()
            raise NetBackendError(f"passt: cannot start {exe}: {e.strerror or e}") from None
        finally:
            theirs.close()
        self = cls(ours, "passt", child, log)
        try:
            child.wait(START_CHECK_S)
        except subprocess.TimeoutExpired:
            return self                 # still running: it took its configuration
        words = self.output()
        self.close()
        raise NetBackendError(f"passt exited at once (status {child.returncode}): {words or 'no output'}"
                              " (on a host without a default route give passt an interface that has an "
                              "address, and a gateway: passt_args=('-i', IFACE, '-g', GATEWAY); docs/net.md)")

    @classmethod
    def connect(cls, path: str) -> "Passt":
        """Connect to the UNIX stream socket at ``path`` (a ``passt -s PATH`` or the like)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
        except OSError as e:
            sock.close()
            raise NetBackendError(f"passt: cannot connect to {path!r}: {e.strerror or e}") from None
        return cls(sock, f"the socket {path}")

    def output(self) -> str:
        """What our passt child wrote (its log), minus its syslog complaints; '' if none."""
        if self.log is None or self.log.closed:
            return ""
        self.log.seek(0)
        lines = self.log.read(1 << 16).decode(errors="replace").splitlines()
        return "; ".join(ln.strip() for ln in lines if ln.strip() and "syslog" not in ln)

    def close(self) -> None:
        """Close the socket; our passt child then ends (made to if it does not). Idempotent."""
        super().close()
        child, self.child = self.child, None
        if child is not None:
            try:
                _stop(child)
            except OSError:
                pass                    # a sandbox refused wait4/kill (vmm/confine.py): the child ends
                                        # by itself (its socket closed) and is reaped when we exit
        if self.log is not None:
            self.log.close()

    def __repr__(self) -> str:
        who = f"child {self.child.pid}" if self.child is not None else self.what
        return f"Passt({who})"


__all__ = ["Passt", "MTU"]
