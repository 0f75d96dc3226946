"""kvmpy on a terminal: the guest's console in raw mode, QEMU's Ctrl-A keys, and the terminal's
attributes back as they were on every way out (a guest's exit, Ctrl-A x, a triple fault,
SIGINT, SIGTERM). Each run is a child on a fresh pseudo-terminal that is its controlling
terminal, as in a shell; the sandbox is on (its filter must let the attributes back)."""
import fcntl
import os
import select
import signal
import sys
import termios
import time

import pytest

from kvmpy import guests
from kvmpy.cli import EXIT_INTERRUPTED, EXIT_TRIPLE_FAULT
from kvmpy.cli.terminal import HINT

from . import lab

BANNER = b"echo: type lines, 'quit' ends"


class Child:
    """``python -m kvmpy ARGS`` on a new pty: its session leader, the pty its controlling terminal."""

    def __init__(self, *args):
        self.master, self.slave = os.openpty()
        attrs = termios.tcgetattr(self.slave)
        attrs[3] &= ~termios.ECHOCTL            # something a fresh pty does not have, to see it kept
        attrs[6][termios.VERASE] = b"\x08"
        termios.tcsetattr(self.slave, termios.TCSANOW, attrs)
        self.before = termios.tcgetattr(self.slave)
        self.out = b""
        self.pid = os.fork()
        if self.pid == 0:                       # the child: only system calls, then exec
            try:
                os.setsid()
                fcntl.ioctl(self.slave, termios.TIOCSCTTY, 0)
                for fd in (0, 1, 2):
                    os.dup2(self.slave, fd)
                os.chdir("/")
                os.execve(sys.executable, [sys.executable, "-m", "kvmpy", *args], lab.CHILD_ENV)
            finally:
                os._exit(127)

    def attrs(self):
        return termios.tcgetattr(self.slave)

    def raw(self) -> bool:
        return not self.attrs()[3] & (termios.ICANON | termios.ECHO | termios.ISIG)

    def read_until(self, want: bytes, timeout: float = 30.0) -> bytes:
        deadline = time.monotonic() + timeout
        while want not in self.out:
            assert time.monotonic() < deadline, f"no {want!r} in {self.out!r}"
            if select.select([self.master], [], [], 0.05)[0]:
                try:
                    self.out += os.read(self.master, 4096)
                except OSError:                 # EIO: the child's side is gone
                    break
        assert want in self.out, self.out
        return self.out

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait(self, timeout: float = 30.0) -> int:
        """The child's exit code (-N for a signal), reading its output meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                pytest.fail(f"kvmpy did not end; output {self.out!r}")
            if select.select([self.master], [], [], 0.05)[0]:
                try:
                    self.out += os.read(self.master, 4096)
                except OSError:
                    pass
        while select.select([self.master], [], [], 0.05)[0]:
            try:
                data = os.read(self.master, 4096)
            except OSError:
                break
            if not data:
                break
            self.out += data
        return os.waitstatus_to_exitcode(status)

    def close(self):
        for fd in (self.master, self.slave):
            os.close(fd)


@pytest.fixture
def child():
    made = []

    def spawn(*args):
        c = Child(*args)
        made.append(c)
        return c
    yield spawn
    for c in made:
        try:
            os.kill(c.pid, signal.SIGKILL)
            os.waitpid(c.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        c.close()


def echo_started(child):
    c = child("demo", "echo")
    c.read_until(BANNER)
    assert c.raw()
    assert HINT.encode().replace(b"\n", b"\r\n") in c.out
    return c


def test_typed_lines_echo_back_and_the_guest_ends_the_run(child):
    c = echo_started(child)
    c.type(b"hello\r")
    c.read_until(b"hello\r\r\n")                 # no local echo: the guest's CR LF only
    c.type(b"quit\r")
    c.read_until(b"bye")
    assert c.wait() == 0                         # the demo kept its promise
    assert c.out.count(b"hello") == 1
    assert c.attrs() == c.before


def test_ctrl_a_keys_help_literal_ctrl_a_and_quit(child):
    c = echo_started(child)
    c.type(b"\x01h")
    c.read_until(b"Ctrl-A Ctrl-A   send Ctrl-A to the guest\r\n")
    c.type(b"a\x01\x01b\x01zc\x03\r")            # Ctrl-A Ctrl-A: one Ctrl-A; Ctrl-A z: dropped; Ctrl-C: a byte
    c.read_until(b"a\x01bc\x03\r\r\n")
    assert c.raw()                               # Ctrl-C went to the guest, the run goes on
    c.type(b"\x01x")
    assert c.wait() == EXIT_INTERRUPTED
    assert b"kvmpy: interrupted" in c.out
    assert c.attrs() == c.before


def test_the_terminal_is_restored_after_a_triple_fault(child):
    c = child("demo", "triple-fault")
    assert c.wait() == EXIT_TRIPLE_FAULT
    assert HINT.encode().replace(b"\n", b"\r\n") in c.out     # it was the console while the guest ran
    assert guests.get("triple-fault").expect_output.replace(b"\n", b"\r\n") in c.out
    assert c.attrs() == c.before


def test_the_terminal_is_restored_after_sigint(child):
    c = echo_started(child)
    os.kill(c.pid, signal.SIGINT)
    assert c.wait() == EXIT_INTERRUPTED
    assert c.attrs() == c.before


def test_the_terminal_is_restored_when_kvmpy_is_terminated(child):
    c = echo_started(child)
    os.kill(c.pid, signal.SIGTERM)
    assert c.wait() == -signal.SIGTERM          # SIGTERM still ends the process, as it did
    assert c.attrs() == c.before


def test_a_stopped_and_continued_run_is_raw_again(child):
    c = echo_started(child)
    os.kill(c.pid, signal.SIGSTOP)
    termios.tcsetattr(c.slave, termios.TCSANOW, c.before)     # what a shell does when it takes over
    os.kill(c.pid, signal.SIGCONT)
    deadline = time.monotonic() + 10
    while not c.raw():
        assert time.monotonic() < deadline, "SIGCONT did not make the terminal raw again"
        time.sleep(0.01)
    c.type(b"quit\r")
    assert c.wait() == 0
    assert c.attrs() == c.before
