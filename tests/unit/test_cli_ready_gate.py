"""kvmpy.cli.running: piped input held back until the guest prints a marker (kvmpy demo linux),
so commands reach a shell instead of a kernel that is still booting."""
import io
import threading

from kvmpy.cli import running


def test_the_console_opens_the_gate_once_the_marker_is_printed_even_split_across_writes():
    gate = threading.Event()
    out = io.BytesIO()
    console = running._Console(out, ready=(b"kvmpy-rootfs: ready", gate))
    console.write(b"booting...\r\nkvmpy-roo")
    assert not gate.is_set()
    console.write(b"tfs: ready (Linux)\r\n")
    assert gate.is_set() and out.getvalue().endswith(b"ready (Linux)\r\n")


class FakeMachine:
    def __init__(self):
        self.fed = bytearray()

    def feed_serial(self, data):
        self.fed += data[:4]
        return min(4, len(data))


def test_input_waits_for_the_gate_and_gives_up_when_the_run_ends(monkeypatch):
    reads = iter([b"uname -a\n", b""])
    monkeypatch.setattr(running.os, "read", lambda fd, n: next(reads))
    m, done, gate = FakeMachine(), threading.Event(), threading.Event()
    t = threading.Thread(target=running._feed_stdin, args=(m, done, b"", None, gate))
    t.start()
    t.join(0.3)
    assert t.is_alive() and m.fed == b""        # nothing before the gate opens
    gate.set()
    t.join(5)
    assert not t.is_alive() and m.fed == b"uname -a\n"
    done2 = threading.Event()
    t = threading.Thread(target=running._feed_stdin, args=(m, done2, b"", None, threading.Event()))
    t.start()
    done2.set()
    t.join(5)
    assert not t.is_alive()
