"""COM1's host side: where the guest's serial output goes and where the host's input comes in.

The UART model (Python ``Serial16550`` or the C twin ``NativeUart``) is the register
machine; the console is the plumbing around it that a user sees: the output stream (or
an in-memory buffer), the lock that orders host input with guest accesses, and the path
of output bytes from the UART to the stream.

Output never blocks a stop. Bytes go to the in-memory buffer at once, or, for a stream
the user gave, into a bounded queue (``LIMIT``) that a writer thread empties into the
stream. When the queue is full, the guest is throttled: its vCPU waits for room in
slices of ``WAIT_SLICE`` while ``throttle()`` says it may (the Machine: a vCPU thread, no
stop and no pause asked for), so a slow reader loses nothing. A stream that stops taking
bytes (a pipe nobody reads) stalls only the writer thread and the guest; once a stop or a
pause is asked for, output that does not fit is dropped and counted in ``dropped``. The C
UART collects output in its own buffer; ``drain()`` moves what fits into the queue
(called by the vCPU loop when that buffer is nearly full, and every 20 ms by the machine's
watchdog thread, which never waits). The Python UART writes into ``write()``.

``bps`` limits the bytes per second the writer hands the stream (a token bucket,
devices/ratelimit.py, holding one second's worth): the writer waits for tokens and the
queue fills behind it, which throttles the guest as a slow stream does. Output still
queued when the console is closed is dropped and counted. In-memory output (no stream)
is not limited.
"""
from __future__ import annotations

import io
import threading
import time
from typing import BinaryIO, Callable

from ..devices.ratelimit import NS, TokenBucket

LIMIT = 1 << 20              # bytes of output queued for a slow stream before output is dropped
BATCH = 64 << 10             # the writer hands the stream at most this much at a time
WAIT_SLICE = 0.05            # a throttled vCPU looks at stop and pause requests this often
SETTLE_S = 0.5               # at the end of a run, how long to wait for the stream to take the queue


class TailSink:
    """A serial stream that keeps only the last ``limit`` bytes: a guest that prints in every
    fuzz case or sandbox call costs no memory, and an error can still quote its last words."""

    def __init__(self, limit: int = 4096):
        self.limit = limit
        self.data = b""

    def write(self, data: bytes) -> int:
        self.data = (self.data + bytes(data))[-self.limit:]
        return len(data)

    def flush(self) -> None:
        pass


class Console:
    """The host end of the guest's console UART.

    ``out`` is a binary file-like (None: collect in memory, read it as ``output``). A
    failing stream (a closed pipe, a full disk) is reported once to ``on_error``, which
    the Machine points at "stop the run with this error".
    """

    def __init__(self, out: BinaryIO | None, bps: int | None = None,
                 clock: Callable[[], int] = time.monotonic_ns):
        if bps is not None and (not isinstance(bps, int) or isinstance(bps, bool) or bps < 1):
            raise ValueError(f"serial_bps must be a whole number of at least 1, not {bps!r}")
        self.clock = clock
        self.bucket = TokenBucket(bps, NS, 0, clock()) if bps is not None else None
        self.buffer = io.BytesIO() if out is None else None
        self.out = out if out is not None else self.buffer
        self.lock = threading.Lock()            # host input vs guest accesses (Python UART)
        self.uart = None                        # set by attach(): the UART model
        self.error: BaseException | None = None
        self.on_error: Callable[[BaseException], None] = lambda e: None
        self.dropped = 0                        # output bytes the stream could not take in time
        self.throttle: Callable[[], bool] = lambda: False   # may this caller wait for room?
        self._queue = bytearray()
        self._cond = threading.Condition()
        self._writing = False
        self._closed = False
        self._writer: threading.Thread | None = None

    def attach(self, uart) -> None:
        """The UART whose output this console carries; a UART with ``take_output()``
        (the C one) buffers output and is drained, any other writes to ``write()``."""
        self.uart = uart
        if hasattr(uart, "take_output"):
            uart.on_full = self.drain

    @property
    def output(self) -> bytes:
        """Everything the guest wrote, when no stream was given."""
        if self.buffer is None:
            raise AttributeError("serial output went to the stream given as serial=")
        return self.buffer.getvalue()

    def feed(self, data: bytes) -> int:
        """Give bytes to the guest's receiver; returns how many fit in its FIFO."""
        with self.lock:
            return self.uart.feed(data)

    # --- output --------------------------------------------------------------------------
    def write(self, data: bytes) -> int:
        """Guest output: to memory at once, or queued for the writer thread. With the queue
        full the caller waits for room while ``throttle()`` allows; what still does not fit
        (a stop or pause asked for, or the stream failed) is dropped and counted."""
        n = len(data)                           # all taken: queued, or dropped and counted
        if self.buffer is not None:
            return self.buffer.write(data)
        with self._cond:
            self._wait_for_room(len(data))
            if self.error is not None or self._closed:
                self.dropped += n
                return n
            room = max(LIMIT - len(self._queue), 0)
            if room < len(data):
                self.dropped += len(data) - room
                data = data[:room]
            self._queue += data
            self._cond.notify_all()
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_out, daemon=True, name="serial-out")
                self._writer.start()
        return n

    def _wait_for_room(self, need: int) -> None:
        """With the condition held: wait while the queue lacks ``need`` bytes of room, the
        stream works and the caller may be throttled."""
        need = min(need, LIMIT)
        while (LIMIT - len(self._queue) < need and self.error is None and not self._closed
               and self._writer is not None and self.throttle()):
            self._cond.wait(WAIT_SLICE)

    def drain(self) -> bool:
        """Move the C UART's collected output on, as much as the queue has room for (after
        waiting for some, if the caller may be throttled). Returns False once the stream
        has failed (the run is being stopped with that error)."""
        take = getattr(self.uart, "take_output", None)
        if take is not None:
            if self.buffer is None:
                with self._cond:
                    self._wait_for_room(BATCH)
                    room = max(LIMIT - len(self._queue), 0)
            else:
                room = None
            with self.lock:
                data = take(room)
            if data:
                self.write(data)
        return self.error is None

    def _write_out(self) -> None:
        """The writer thread: the queue into the stream, flushed after each batch."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if self._closed and (not self._queue or self.bucket is not None):
                    self.dropped += len(self._queue)        # a limited stream is not waited for
                    self._queue.clear()
                    self._cond.notify_all()
                    return
                n = self._batch()
                if not n:
                    continue
                data = bytes(self._queue[:n])
                del self._queue[:n]
                self._writing = True
            try:
                self.out.write(data)
                flush = getattr(self.out, "flush", None)
                if flush is not None:
                    flush()
            except (OSError, ValueError) as e:
                with self._cond:
                    self.error, self._writing = e, False
                    self.dropped += len(self._queue)
                    self._queue.clear()
                    self._cond.notify_all()
                self.on_error(e)
                return
            with self._cond:
                self._writing = False
                self._cond.notify_all()

    def _batch(self) -> int:
        """Bytes the writer may take now (called with ``_cond`` held): at most BATCH, and
        with a limit what the bucket holds; 0 after waiting (on ``_cond``) for a token."""
        n = min(len(self._queue), BATCH)
        if self.bucket is None:
            return n
        self.bucket.refill(self.clock())
        n = min(n, self.bucket.tokens + self.bucket.burst)
        if n <= 0:
            self._cond.wait(self.bucket.wait_ns(self.bucket.missing(1)) / NS)   # close() wakes it
            return 0
        self.bucket.take(n)
        return n

    def flush(self, timeout: float = SETTLE_S) -> bool:
        """Wait up to ``timeout`` seconds for the stream to take what is queued; True if it
        did. A stalled stream is left behind (the writer thread keeps trying), never waited for."""
        if self.buffer is not None:
            return True
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._writing, timeout)

    def take_error(self) -> BaseException | None:
        """The stream's failure since the last call, if any (and forget it)."""
        with self._cond:
            err, self.error = self.error, None
            if err is not None and self._writer is not None and not self._writer.is_alive():
                self._writer = None         # the next output starts a new writer
            return err

    def close(self, timeout: float = 0.2) -> None:
        """Let the writer finish what is queued (up to ``timeout``), then end it."""
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
