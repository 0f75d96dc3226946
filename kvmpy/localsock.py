"""Local sockets only the VM's owner may use: the control socket and the gdb stub.

A Unix socket is born with mode 0600 (``listen_private``), so another user cannot
connect; and each connection's peer credentials (``SO_PEERCRED``, unix(7)) are checked
against our user id (``peer_uid``), in case the file's mode is widened later or the
peer is root acting for someone else. For a TCP connection on the loopback interface,
``peer_uid`` finds the connecting socket's owner in /proc/net/tcp (proc(5)), the way
identd does; a connection from another host has no local owner and gets None.

Standard library only, so any floor may use it (DESIGN.md, Layers: L0); the caller
names the exception to raise.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import stat
import struct

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def listen_private(path: str, what: str, error: type[Exception], backlog: int = 4) -> socket.socket:
    """A listening Unix socket at ``path`` with mode 0600. A stale socket file (nobody
    listening) is replaced; a live one (another VM's) or any other file is left alone and
    ``error("WHAT PATH: ...")`` is raised."""
    def fail(text: str):
        return error(f"{what} {path}: {text}")

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise fail(e.strerror or str(e)) from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise fail("exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                try:
                    os.unlink(path)             # left behind by a process that died
                except FileNotFoundError:
                    pass
            except OSError as e:
                raise fail(e.strerror or str(e)) from None
            else:
                raise fail("another process is listening on it")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Born 0600: Linux gives the socket file the socket inode's mode (less the umask),
        # so no window with wider permissions, and no os.umask(): the umask is per
        # process, and changing it would also narrow files other threads create meanwhile.
        os.fchmod(sock.fileno(), 0o600)
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise fail(e.strerror or str(e)) from None
    return sock


def peer_uid(conn: socket.socket) -> int | None:
    """The user id behind the other end of ``conn``: SO_PEERCRED for a Unix socket, the
    owner of the connecting socket for TCP on this host; None when it cannot be told."""
    if conn.family == socket.AF_UNIX:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[1]
    if conn.family in (socket.AF_INET, socket.AF_INET6):
        try:
            return _tcp_owner(conn.getpeername()[:2], conn.getsockname()[:2], conn.family)
        except OSError:
            return None
    return None


def _tcp_owner(peer: tuple, me: tuple, family: int) -> int | None:
    """The uid column of the /proc/net/tcp{,6} line whose local end is ``peer`` and whose
    remote end is ``me`` (that is the connecting socket, seen from its own side)."""
    want = (_proc_addr(peer, family), _proc_addr(me, family))
    with open("/proc/net/tcp6" if family == socket.AF_INET6 else "/proc/net/tcp") as f:
        next(f)                                 # the header
        for line in f:
            fields = line.split()
            if len(fields) > 7 and (fields[1].upper(), fields[2].upper()) == want:
                return int(fields[7])
    return None


def _proc_addr(addr: tuple, family: int) -> str:
    """``(host, port)`` as /proc/net/tcp writes it: the address's 32-bit words in host
    (little-endian) order, each as 8 hex digits, then ``:PORT`` in 4."""
    packed = ipaddress.ip_address(addr[0]).packed
    words = struct.unpack("<%dI" % (len(packed) // 4), packed)
    return "".join("%08X" % w for w in words) + ":%04X" % addr[1]
