"""The interactive console: while a guest runs with a terminal on stdin, the terminal is raw
and the guest's; Ctrl-A starts a command, as in QEMU's ``-nographic``.

``RawTerminal`` puts the terminal in raw mode (what QEMU's stdio character device does:
no echo, no line editing, no signals from the keyboard, no CR/NL translation of input;
output processing is kept, so a guest's "\\n" still starts a new line) and restores the
saved attributes on every way out: ``restore()`` from the run's ``finally`` (a normal end,
a guest error, an exception, SIGINT from elsewhere, Ctrl-A x), and from its own SIGTERM
handler, which then lets SIGTERM do what it did before (end the process). A SIGCONT puts
the terminal back in raw mode (a shell may have reset it while we were stopped). With
stdin not a terminal, or when this process is in a background process group (changing the
terminal would stop it with SIGTTOU), nothing is changed.

``Escapes`` splits what is typed into bytes for the guest and commands, after QEMU's
``mux_proc_byte``: Ctrl-A then ``x`` quits, ``h`` or ``?`` prints the keys, Ctrl-A sends a
Ctrl-A; any other key after Ctrl-A is dropped. Ctrl-C, Ctrl-Z and Ctrl-\\ are bytes for
the guest (a Linux shell in it wants them).

Standard library only (the CLI floor): termios, signal.
"""
from __future__ import annotations

import os
import signal
import termios
import threading

ESCAPE = 0x01                   # Ctrl-A
QUIT, HELP = "quit", "help"
_COMMANDS = {ord("x"): QUIT, ord("h"): HELP, ord("?"): HELP}

KEYS_HELP = ("kvmpy: console keys (after Ctrl-A):\n"
             "  Ctrl-A x        quit (exit status 130, as for an interrupt)\n"
             "  Ctrl-A h or ?   this help\n"
             "  Ctrl-A Ctrl-A   send Ctrl-A to the guest\n"
             "  Ctrl-C, Ctrl-Z and Ctrl-\\ go to the guest\n")
HINT = "kvmpy: the terminal is the guest's console (raw mode): Ctrl-A x quits, Ctrl-A h shows the keys\n"


class Escapes:
    """Typed bytes -> what the guest gets and the commands, in the order typed."""

    def __init__(self) -> None:
        self.pending = False            # the last byte was Ctrl-A

    def feed(self, data: bytes) -> list:
        """A list of ``bytes`` (for the guest) and command names (QUIT, HELP), in order."""
        out: list = []
        run = bytearray()
        for b in data:
            if self.pending:
                self.pending = False
                if b == ESCAPE:
                    run.append(b)
                elif b in _COMMANDS:
                    if run:
                        out.append(bytes(run))
                        run = bytearray()
                    out.append(_COMMANDS[b])
                continue                # any other key after Ctrl-A: dropped, as QEMU does
            if b == ESCAPE:
                self.pending = True
            else:
                run.append(b)
        if run:
            out.append(bytes(run))
        return out


def raw_attributes(attrs: list) -> list:
    """``attrs`` (termios.tcgetattr's list) made raw the way QEMU's stdio is, output kept."""
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = attrs
    iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP | termios.INLCR
               | termios.IGNCR | termios.ICRNL | termios.IXON)
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.IEXTEN | termios.ISIG)
    cflag = (cflag & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    cc = list(cc)
    cc[termios.VMIN], cc[termios.VTIME] = 1, 0
    return [iflag, oflag, cflag, lflag, ispeed, ospeed, cc]


class RawTerminal:
    """The terminal on ``fd`` in raw mode between ``enter()`` and ``restore()``."""

    def __init__(self, fd: int = 0):
        self.fd = fd
        self.saved: list | None = None
        self._old_handlers: dict = {}
        self._lock = threading.RLock()     # the signal handlers run in the main thread, maybe inside restore()

    @staticmethod
    def wanted(fd: int = 0) -> bool:
        """``fd`` is a terminal and we are not in a background process group of it."""
        if not os.isatty(fd):
            return False
        try:
            foreground = os.tcgetpgrp(fd)
        except OSError:                 # not our controlling terminal: no job control to fear
            return True
        return foreground == os.getpgrp()

    def enter(self) -> bool:
        """Save the attributes and go raw; with the main thread, handle SIGTERM and SIGCONT.
        False (nothing changed) if the terminal refuses."""
        try:
            self.saved = termios.tcgetattr(self.fd)
        except (termios.error, OSError):
            return False
        if threading.current_thread() is threading.main_thread():     # first: a SIGTERM from now on restores
            for sig, handler in ((signal.SIGTERM, self._on_term), (signal.SIGCONT, self._on_cont)):
                self._old_handlers[sig] = signal.signal(sig, handler)
        try:
            termios.tcsetattr(self.fd, termios.TCSANOW, raw_attributes(self.saved))
        except (termios.error, OSError):
            self.restore()
            return False
        return True

    def restore(self) -> None:
        """Put the saved attributes back (idempotent), and the signal handlers."""
        with self._lock:
            saved = self.saved
            if saved is None:
                return
            main = threading.current_thread() is threading.main_thread()
            old_ttou = signal.signal(signal.SIGTTOU, signal.SIG_IGN) if main else None
            try:                        # (a SIGTTOU would stop us if a shell moved us to the background)
                termios.tcsetattr(self.fd, termios.TCSANOW, saved)
            except (termios.error, OSError):
                pass                    # the terminal is gone (hung up): nothing to restore
            finally:
                if old_ttou is not None:
                    signal.signal(signal.SIGTTOU, old_ttou)
            self.saved = None           # only now: a SIGTERM handler running meanwhile restores too
            for sig, old in self._old_handlers.items():
                signal.signal(sig, old)
            self._old_handlers.clear()

    def _on_term(self, signum, frame) -> None:
        """SIGTERM: restore the terminal, then let SIGTERM do what it did before we came."""
        old = self._old_handlers.get(signal.SIGTERM, signal.SIG_DFL)
        self.restore()
        signal.signal(signal.SIGTERM, old)
        signal.raise_signal(signal.SIGTERM)

    def _on_cont(self, signum, frame) -> None:
        """SIGCONT: back from a stop, raw again (the shell may have reset the terminal)."""
        with self._lock:
            if self.saved is not None:
                try:
                    termios.tcsetattr(self.fd, termios.TCSANOW, raw_attributes(self.saved))
                except (termios.error, OSError):
                    pass
        old = self._old_handlers.get(signal.SIGCONT)
        if callable(old):
            old(signum, frame)
