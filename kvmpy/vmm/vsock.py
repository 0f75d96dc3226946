"""The host side of virtio-vsock: UNIX sockets, as Firecracker's vsock device has them.

The VM listens on a UNIX socket at ``PATH`` (mode 0600, like the control socket):

- **Host to guest.** A host program connects to ``PATH`` and writes ``CONNECT <port>\\n``
  (the port in decimal). When the guest accepts (its RESPONSE), kvmpy answers
  ``OK <hostport>\\n`` (the host-side port of the connection) and from then on the socket
  carries the stream. If the guest refuses (RST) or the device is full, the socket is
  closed; a request that is not ``CONNECT <port>\\n`` within HANDSHAKE_TIMEOUT seconds
  gets one line ``ERROR <why>\\n`` and is closed.
- **Guest to host.** A guest connecting to CID 2 port ``P`` reaches whoever listens on
  the UNIX socket ``PATH_P``; nobody there means a RST (the guest sees ECONNRESET).

One thread per device (``vsock-host``) watches the listener, the half-open sockets and
every connection's socket with a selector, and feeds the device model under the device's
lock: it marks peers readable, writes guest data out, and asks for a host-side
QueueNotify of the rx queue (``notify(0)``, which raises the interrupt as a guest's
notify would) when packets are ready for the guest. A vCPU thread never waits on a host
socket: every socket is non-blocking and the model keeps what a slow reader has not
taken yet (bounded: devices/virtio/vsock.py). ``close()`` stops the thread, closes every
socket and removes ``PATH``.
"""
from __future__ import annotations

import os
import re
import selectors
import socket
import threading
import time

from ..devices.virtio.vsock import EVENTQ, RXQ, VirtioVsock
from ..errors import DeviceError
from ..localsock import listen_private

HANDSHAKE_TIMEOUT = 10.0            # seconds a new host connection has to send its CONNECT line
MAX_HANDSHAKES = 16                 # host connections that have not sent it yet, at most
MAX_LINE = 32                       # "CONNECT 4294967295\n" is 19 bytes
_CONNECT = re.compile(rb"CONNECT ([0-9]{1,10})\n")


def connect_request(seen: bytes) -> tuple[int, int] | None:
    """The first bytes a host program sent: ``(port, length of the line)`` for a complete
    ``CONNECT <port>\\n``; None while ``seen`` can still become one (an empty ``seen`` too);
    ValueError (the reason, for the ERROR line) when it cannot."""
    end = seen.find(b"\n")
    line = seen[:end + 1] if end >= 0 else seen
    m = _CONNECT.fullmatch(line)
    if m is not None and int(m.group(1)) <= 0xFFFF_FFFF:
        return int(m.group(1)), len(line)
    if end < 0 and len(seen) < MAX_LINE and b"CONNECT ".startswith(seen[:8]) \
            and (len(seen) <= 8 or (seen[8:].isdigit() and len(seen) <= 8 + 10)):
        return None
    raise ValueError("expected 'CONNECT <port>\\n' with a port in 0..4294967295")


HELD_S = 0.02                   # how soon work held back while the machine was not running is offered again


class VsockHostError(DeviceError):
    """The vsock socket cannot be set up (its path is taken, or not writable)."""


class VsockHost:
    """The UNIX-socket side of one virtio-vsock device (see the module docstring).

    ``device`` is the model, ``lock`` the lock its transport is served under, ``notify(i)``
    a host-side QueueNotify of queue ``i`` that takes that lock itself and returns False if
    it was held back (the machine is not running: guest RAM must not change under a
    snapshot, a checkpoint or a pause); held-back work is offered again every HELD_S.
    """

    def __init__(self, path: str, device: VirtioVsock, lock: threading.Lock, notify):
        self.path, self.device, self.lock, self.notify = os.path.abspath(path), device, lock, notify
        self.listener = listen_private(self.path, "vsock socket", VsockHostError, backlog=16)
        self.listener.setblocking(False)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sel = selectors.PollSelector()
        self.sel.register(self.listener, selectors.EVENT_READ, "listener")
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.handshakes: dict[socket.socket, float] = {}     # half-open sockets -> deadline
        self.watched: dict[int, tuple] = {}                   # fd -> (connection, events)
        self.refused = 0                                     # host connections refused
        self.errors, self.last_error = 0, None               # the thread's own failures (none expected)
        self.held = False                                    # the last notify was held back
        self._stop = False
        device.host_connect = self.connect_to_host
        device.wake = self.wake
        self.thread = threading.Thread(target=self._run, name="vsock-host", daemon=True)
        self.thread.start()

    # --- called by the device (under its lock, from a vCPU thread) ---------------------------
    def connect_to_host(self, port: int):
        """The guest connects to host port ``port``: a socket connected to ``PATH_port``, or None."""
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        except OSError:                 # out of file descriptors (the sandbox's limit)
            return None
        try:
            s.connect(f"{self.path}_{port}")
        except OSError:                 # nobody listens there, or its backlog is full
            s.close()
            return None
        self.wake()
        return s

    def wake(self) -> None:
        """Make the host thread look at the device again (a vCPU added work for it)."""
        try:
            os.write(self._wake_w, b"!")
        except (BlockingIOError, OSError):
            pass                        # already awake, or closing

    # --- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop:
            try:
                self._round()
            except Exception as e:     # noqa: BLE001 - a bug must not end the host side silently
                self.errors += 1
                self.last_error = f"{type(e).__name__}: {e}"
                time.sleep(0.01)

    def _round(self) -> None:
        timeout = min(self.handshakes.values(), default=time.monotonic() + 1.0) - time.monotonic()
        if self.held:
            timeout = min(timeout, HELD_S)
        for key, mask in self.sel.select(max(0.0, timeout)):
            if self._stop:
                return
            self._event(key, mask)
        if not self._stop:
            self._expire_handshakes()
            self._pump()

    def _event(self, key, mask) -> None:
        what = key.data
        if what == "listener":
            self._accept()
        elif what == "wake":
            try:
                while os.read(self._wake_r, 256):
                    pass
            except BlockingIOError:
                pass
        elif what == "handshake":
            self._handshake(key.fileobj)
        else:
            conn = what
            with self.lock:
                if mask & selectors.EVENT_READ:
                    conn.readable = True
                if mask & selectors.EVENT_WRITE:
                    self.device.flush(conn)

    def _pump(self) -> None:
        """Write what the guest sent, deliver what is ready, and watch what needs watching."""
        with self.lock:
            self.device.flush_all()
            rx, event = self.device.has_rx_work(), self.device.reset_event
        held = False
        if rx:
            held |= self.notify(RXQ) is False
        if event:
            held |= self.notify(EVENTQ) is False
        self.held = held
        with self.lock:
            want = {}
            for conn in self.device.conns.values():
                events = (selectors.EVENT_READ if conn.wants_read() and not conn.readable else 0) | \
                         (selectors.EVENT_WRITE if conn.wants_write() else 0)
                fd = conn.peer.fileno()
                if events and fd >= 0:
                    want[fd] = (conn, events)
        for fd in [fd for fd, old in self.watched.items() if want.get(fd) != old]:
            self.sel.unregister(fd)
            del self.watched[fd]
        for fd, entry in want.items():
            if fd not in self.watched:
                self.sel.register(fd, entry[1], entry[0])
                self.watched[fd] = entry

    # --- host programs connecting to PATH ---------------------------------------------------
    def _accept(self) -> None:
        try:
            s, _ = self.listener.accept()
        except (BlockingIOError, OSError):
            return
        s.setblocking(False)
        if s.fileno() in self.watched:  # a closed connection's fd number, reused
            self.sel.unregister(s.fileno())
            del self.watched[s.fileno()]
        if len(self.handshakes) >= MAX_HANDSHAKES:
            self._refuse(s, "too many connections waiting to send CONNECT")
            return
        self.handshakes[s] = time.monotonic() + HANDSHAKE_TIMEOUT
        self.sel.register(s, selectors.EVENT_READ, "handshake")

    def _handshake(self, s: socket.socket) -> None:
        """Read the CONNECT line (peeked, so bytes after it stay for the guest)."""
        try:
            seen = s.recv(MAX_LINE, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            seen = b""
        try:
            request = connect_request(seen)
        except ValueError as e:
            self._drop_handshake(s)
            self._refuse(s, str(e))
            return
        if request is None:
            if seen:
                return                  # a prefix of a good line: wait for the rest
            self._drop_handshake(s)
            s.close()                   # it went away
            return
        port, length = request
        self._drop_handshake(s)
        s.recv(length)                  # consume the line
        with self.lock:
            conn = self.device.connect_from_host(port, s)
        if conn is None:
            self._refuse(s, "the vsock device has its maximum of connections")

    def _expire_handshakes(self) -> None:
        now = time.monotonic()
        for s, deadline in list(self.handshakes.items()):
            if deadline <= now:
                self._drop_handshake(s)
                self._refuse(s, f"no 'CONNECT <port>\\n' within {HANDSHAKE_TIMEOUT:g} s")

    def _drop_handshake(self, s: socket.socket) -> None:
        self.sel.unregister(s)
        del self.handshakes[s]

    def _refuse(self, s: socket.socket, why: str) -> None:
        self.refused += 1
        try:
            s.send(f"ERROR {why}\n".encode())
            for _ in range(16):         # take what it sent (bounded): closing on unread bytes is a reset
                if not s.recv(4096):
                    break
        except OSError:
            pass
        s.close()

    # --- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the thread, close every socket of the device, remove PATH. Idempotent."""
        if self._stop:
            return
        self._stop = True
        self.wake()
        if self.thread is not threading.current_thread():
            self.thread.join(5)
        with self.lock:
            self.device.close_all()
            self.device.host_connect = lambda port: None
            self.device.wake = lambda: None
        for s in list(self.handshakes):
            s.close()
        self.handshakes.clear()
        self.sel.close()
        self.listener.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def __repr__(self) -> str:
        return f"VsockHost({self.path!r}, {len(self.device.conns)} connections)"


class VsockState:
    """What a snapshot keeps of a virtio-vsock slot: the guest's CID and the transport's
    registers and rings (``transport``: a virtio-mmio window or a virtio-pci function, each
    saving its own form). Connections are not kept; loading tells the guest with
    VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue (when it has a buffer there)."""

    def __init__(self, transport, device: VirtioVsock, lock: threading.Lock):
        self.transport, self.device, self.lock = transport, device, lock

    def save_state(self) -> dict:
        with self.lock:
            return {"guest_cid": self.device.guest_cid, "transport": self.transport.save_state()}

    def load_state(self, saved) -> None:
        if not isinstance(saved, dict) or set(saved) != {"guest_cid", "transport"}:
            raise ValueError("vsock state must have exactly the keys guest_cid and transport")
        if saved["guest_cid"] != self.device.guest_cid:
            raise ValueError(f"the saved guest CID {saved['guest_cid']!r} is not this device's "
                             f"{self.device.guest_cid}")
        with self.lock:                 # the host thread serves the device under it
            self.transport.load_state(saved["transport"])
            self.device.transport_reset()
            self.transport.notify_queue(EVENTQ)     # the machine is not running: RAM may change

    def state(self) -> dict:
        return {**self.transport.state(), **self.device.state()}
