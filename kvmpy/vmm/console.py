"""COM1's host side: where the guest's serial output goes and where the host's input comes in.

The UART model (Python ``Serial16550`` or the C twin ``NativeUart``) is the register
machine; the console is the plumbing around it that a user sees: the output stream (or
an in-memory buffer), the lock that orders host input with guest accesses, and, for the
C UART, which collects output in its own buffer, ``drain()``, which writes that buffer
to the stream. The Python UART writes to the stream itself, so it has nothing to drain.
"""
from __future__ import annotations

import io
import threading
from typing import BinaryIO, Callable


class Console:
    """The host end of the guest's console UART.

    ``out`` is a binary file-like (None: collect in memory, read it as ``output``). A
    failing stream (a closed pipe, a full disk) is reported once to ``on_error``, which
    the Machine points at "stop the run with this error".
    """

    def __init__(self, out: BinaryIO | None):
        self.buffer = io.BytesIO() if out is None else None
        self.out = out if out is not None else self.buffer
        self.lock = threading.Lock()            # host input vs guest accesses (Python UART)
        self.uart = None                        # set by attach(): the UART model
        self.error: BaseException | None = None
        self.on_error: Callable[[BaseException], None] = lambda e: None

    def attach(self, uart) -> None:
        """The UART whose output this console carries; a UART with ``take_output()``
        (the C one) buffers output and is drained, any other writes to ``out`` itself."""
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

    def drain(self) -> bool:
        """Write the UART's collected output to ``out`` in one write, and flush.

        Returns False (after telling ``on_error``) if the stream failed, else True.
        """
        take = getattr(self.uart, "take_output", None)
        if take is None:
            return True
        with self.lock:
            try:
                data = take()
                if data:
                    self.out.write(data)
                    flush = getattr(self.out, "flush", None)
                    if flush is not None:
                        flush()
            except (OSError, ValueError) as e:
                if self.error is None:
                    self.error = e
                    self.on_error(e)
                return False
        return True

    def flush(self) -> None:
        """Flush the stream, ignoring a failure (the run is over; drain() reported any)."""
        flush = getattr(self.out, "flush", None)
        if flush is not None:
            try:
                flush()
            except (OSError, ValueError):
                pass

    def take_error(self) -> BaseException | None:
        """The stream's failure since the last call, if any (and forget it)."""
        err, self.error = self.error, None
        return err
