"""A TAP interface as the guest's network: frames go to and come from the host's kernel.

``/dev/net/tun`` with ioctl TUNSETIFF (linux/if_tun.h; Documentation/networking/tuntap.rst)
attaches the fd to the TAP interface ``name``, creating it if it does not exist. Each
``read`` gives one whole frame and each ``write`` sends one. Flags: IFF_TAP (Ethernet
frames) and IFF_NO_PI (no 4-byte packet-information prefix). Not IFF_VNET_HDR: that
header only carries checksum and segmentation offloads, and the device negotiates none
of them, so it would always be zeros; it comes back with the offloads.

Creating an interface, or attaching to one owned by someone else, needs CAP_NET_ADMIN;
an interface made beforehand with ``ip tuntap add NAME mode tap user USER`` can be
attached by USER without it. Either way the interface has to be brought up and given an
address (``ip link set NAME up``; ``ip addr add ...``) by whoever owns the host's
network: kvmpy changes nothing else on the host. A TAP kvmpy created goes away when its
fd closes; one made beforehand stays.
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct

from .backend import NetBackendError
from .stream import MAX_FRAME, MIN_FRAME

TUNSETIFF = 0x400454CA          # _IOW('T', 202, int); tests/native/test_tun_constants.py checks these against the header
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
_IFREQ = struct.Struct(f"{IFNAMSIZ}sH22x")   # struct ifreq: ifr_name, ifr_flags, the rest of the union
_OPEN_HINTS = {errno.ENOENT: " (no TUN/TAP support: modprobe tun)",
               errno.EACCES: " (this user may not open it: a TAP interface needs read-write access to "
                             "/dev/net/tun, and CAP_NET_ADMIN to create one)"}
#: Frames read from the interface per ``receive`` at most (the network thread's turn).
READ_FRAMES = 256


def check_name(name: str) -> str:
    """``name`` if it can be a Linux interface name; ValueError saying why not."""
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ or any(c in name for c in "/ \t\n:") or name in (".", ".."):
        raise ValueError(f"bad TAP interface name {name!r}: 1 to {IFNAMSIZ - 1} bytes, no '/', ':' or spaces")
    return name


class Tap:
    """The TAP interface ``name``, opened non-blocking (see the module docstring)."""

    kind = "tap"

    def __init__(self, name: str, device: str = "/dev/net/tun"):
        self.name = check_name(name)
        self.error: str | None = None
        self.tx_dropped = 0
        self.rx_dropped = 0
        try:
            self.fd = os.open(device, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise NetBackendError(f"tap:{name}: cannot open {device}: {e.strerror}"
                                  + _OPEN_HINTS.get(e.errno, "")) from None
        try:
            fcntl.ioctl(self.fd, TUNSETIFF, _IFREQ.pack(self.name.encode(), IFF_TAP | IFF_NO_PI))
        except OSError as e:
            os.close(self.fd)
            self.fd = -1
            hint = ""
            if e.errno == errno.EPERM:
                hint = (" (creating a TAP interface, or using one someone else owns, needs CAP_NET_ADMIN: run "
                        f"as root, or have root run 'ip tuntap add {name} mode tap user $USER' first)")
            elif e.errno == errno.EBUSY:
                hint = " (another program has it open)"
            elif e.errno == errno.EINVAL:
                hint = " (an interface of that name exists and is not a TAP)"
            raise NetBackendError(f"tap:{name}: TUNSETIFF failed: {e.strerror}{hint}") from None

    def fileno(self) -> int:
        return self.fd

    def send(self, frame: bytes) -> bool:
        if self.fd < 0:
            self.tx_dropped += 1
            return False
        try:
            os.write(self.fd, frame)
            return True
        except OSError as e:
            self.tx_dropped += 1        # EAGAIN: the queue is full; EIO: the link is down; ...
            if e.errno == errno.EBADFD:
                self.error = f"tap:{self.name}: the interface went away"
            return False

    def wants_write(self) -> bool:
        return False

    def flush(self) -> None:
        """Writes are whole frames or nothing: nothing is ever held back."""

    def receive(self) -> list[bytes]:
        frames = []
        for _ in range(READ_FRAMES):
            try:
                frame = os.read(self.fd, MAX_FRAME + 1)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                raise NetBackendError(f"tap:{self.name}: read failed: {e.strerror}") from None
            if not MIN_FRAME <= len(frame) <= MAX_FRAME:
                self.rx_dropped += 1
                continue
            frames.append(frame)
        return frames

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __repr__(self) -> str:
        return f"Tap({self.name!r})"
