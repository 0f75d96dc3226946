"""Network backends for virtio-net: where the guest's frames go on the host.

``Net`` says which (the ``Machine(net=...)`` and ``--net`` forms), ``Net.open()`` makes it:

=====================  ==========================================================
``passt``              start Debian's passt as our child (user-mode networking: DHCP,
                       DNS, NAT; the gateway address reaches the host's loopback)
``passt:PATH``         connect to a passt (or any ``-netdev stream`` peer) at PATH
``tap:NAME``           the TAP interface NAME (needs CAP_NET_ADMIN to create it)
=====================  ==========================================================

Each may end in ``,mac=XX:XX:XX:XX:XX:XX`` (the guest's MAC; default DEFAULT_MAC).
Pure Python over sockets, fds and a child process: nothing here knows about virtio or
KVM (the device is devices/virtio/net.py, the thread between them vmm/netpump.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from .backend import NetBackendError, StreamBackend
from .stream import MAX_FRAME, FrameReader, StreamError

#: The MAC a guest gets unless told otherwise: locally administered (bit 1 of the first
#: byte), unicast, "kvmp" in the middle; the same every time so a restored guest keeps it.
DEFAULT_MAC = "02:6b:76:6d:70:01"
KINDS = ("passt", "tap")

__all__ = ["Net", "NetBackendError", "StreamBackend", "FrameReader", "StreamError", "MAX_FRAME",
           "DEFAULT_MAC", "parse_mac"]


def parse_mac(text: str) -> bytes:
    """Six bytes from ``XX:XX:XX:XX:XX:XX``; ValueError for anything else or a multicast MAC."""
    parts = text.split(":")
    try:
        if len(parts) != 6 or any(len(p) != 2 for p in parts):
            raise ValueError
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"bad MAC address {text!r}: expected six hex bytes like {DEFAULT_MAC}") from None
    if mac[0] & 1:
        raise ValueError(f"MAC address {text} is a multicast address (bit 0 of its first byte is set)")
    return mac


@dataclass(frozen=True)
class Net:
    """A network for the guest: ``kind`` "passt" or "tap"; ``target`` the passt socket to
    connect to (None: start passt) or the TAP interface's name; ``mac`` the guest's MAC;
    ``passt_args`` extra options for a passt kvmpy starts (e.g. ``("-a", "10.0.2.15")``)."""

    kind: str = "passt"
    target: str | None = None
    mac: str = DEFAULT_MAC
    passt_args: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"bad network kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.kind == "tap":
            from .tap import check_name
            if self.target is None:
                raise ValueError("a TAP network needs an interface name: tap:NAME")
            check_name(self.target)
        if self.passt_args and (self.kind != "passt" or self.target is not None):
            raise ValueError("passt_args are for a passt kvmpy starts (net 'passt' without a socket)")
        object.__setattr__(self, "passt_args", tuple(self.passt_args))
        parse_mac(self.mac)

    @classmethod
    def parse(cls, spec: "str | Net") -> "Net":
        """``passt``, ``passt:PATH`` or ``tap:NAME``, each with an optional ``,mac=MAC``."""
        if isinstance(spec, Net):
            return spec
        head, _, opts = spec.partition(",")
        kind, colon, target = head.partition(":")
        values = {}
        for o in filter(None, (o.strip() for o in opts.split(","))):
            key, eq, value = o.partition("=")
            if key != "mac" or not eq:
                raise ValueError(f"bad network {spec!r}: unknown option {o!r} (expected mac=XX:XX:XX:XX:XX:XX)")
            values["mac"] = value
        if colon and not target:
            raise ValueError(f"bad network {spec!r}: nothing after ':'")
        try:
            return cls(kind, target or None, **values)
        except ValueError as e:
            raise ValueError(f"bad network {spec!r}: {e}; expected passt, passt:SOCKET or tap:NAME "
                             "[,mac=XX:XX:XX:XX:XX:XX]") from None

    @property
    def spec(self) -> str:
        """The ``--net`` text that makes this Net again (``passt_args`` are not in it)."""
        head = self.kind + (f":{self.target}" if self.target else "")
        return head + (f",mac={self.mac}" if self.mac != DEFAULT_MAC else "")

    @property
    def mac_bytes(self) -> bytes:
        return parse_mac(self.mac)

    def open(self):
        """The backend: a started or connected Passt, or a Tap. NetBackendError on failure."""
        if self.kind == "tap":
            from .tap import Tap
            return Tap(self.target)
        from .passt import Passt
        return Passt.connect(self.target) if self.target else Passt.start(args=self.passt_args)
