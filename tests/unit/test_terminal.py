"""The interactive console's pieces: the Ctrl-A escapes and raw mode on a pseudo-terminal."""
import os
import signal
import termios

import pytest
from hypothesis import given, strategies as st

from kvmpy.cli.terminal import ESCAPE, HELP, QUIT, Escapes, RawTerminal, raw_attributes


def feed_all(chunks):
    e = Escapes()
    return [item for c in chunks for item in e.feed(c)]


def test_plain_bytes_go_to_the_guest_as_typed():
    assert Escapes().feed(b"hello\r\x03\x1a") == [b"hello\r\x03\x1a"]


@pytest.mark.parametrize("typed, events", [
    (b"\x01x", [QUIT]),
    (b"ab\x01xcd", [b"ab", QUIT, b"cd"]),
    (b"\x01h", [HELP]),
    (b"\x01?", [HELP]),
    (b"\x01\x01", [b"\x01"]),
    (b"a\x01\x01b", [b"a\x01b"]),
    (b"a\x01zb", [b"ab"]),                # an unknown key after Ctrl-A is dropped
    (b"\x01", []),                         # waits for the next byte
])
def test_ctrl_a_commands(typed, events):
    assert Escapes().feed(typed) == events


def test_ctrl_a_may_end_one_read_and_its_key_start_the_next():
    assert feed_all([b"a\x01", b"x"]) == [b"a", QUIT]
    assert feed_all([b"\x01", b"\x01", b"z"]) == [b"\x01", b"z"]


@given(st.lists(st.binary(max_size=12), max_size=8))
def test_chunking_never_changes_the_outcome(chunks):
    """However the typed bytes arrive, the guest gets the same bytes and the same commands:
    every byte but Ctrl-A sequences, a Ctrl-A for each Ctrl-A Ctrl-A."""
    whole = Escapes().feed(b"".join(chunks))
    split = feed_all(chunks)

    def flat(events):
        out, data = [], b""
        for e in events:
            if isinstance(e, bytes):
                data += e
            else:
                out += [data, e]
                data = b""
        return out + [data]
    assert flat(whole) == flat(split)


def test_raw_attributes_are_qemus_and_keep_output_processing():
    m, s = os.openpty()
    try:
        attrs = termios.tcgetattr(s)
        raw = raw_attributes(attrs)
        assert raw[1] == attrs[1]                    # oflag: OPOST/ONLCR kept
        assert not raw[3] & (termios.ECHO | termios.ICANON | termios.ISIG | termios.IEXTEN)
        assert not raw[0] & (termios.ICRNL | termios.IXON | termios.BRKINT)
        assert raw[2] & termios.CSIZE == termios.CS8
        assert raw[6][termios.VMIN] == 1 and raw[6][termios.VTIME] == 0
    finally:
        os.close(m)
        os.close(s)


def test_raw_terminal_enters_and_restores_exactly_and_once():
    m, s = os.openpty()
    try:
        attrs = termios.tcgetattr(s)
        attrs[3] &= ~termios.ECHOCTL
        termios.tcsetattr(s, termios.TCSANOW, attrs)
        before = termios.tcgetattr(s)
        handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGCONT)
        t = RawTerminal(s)
        assert RawTerminal.wanted(s)                 # a terminal, not our controlling one
        assert t.enter()
        assert not termios.tcgetattr(s)[3] & termios.ICANON
        assert signal.getsignal(signal.SIGTERM) == t._on_term
        t.restore()
        assert termios.tcgetattr(s) == before
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGCONT)) == handlers
        termios.tcsetattr(s, termios.TCSANOW, raw_attributes(before))
        t.restore()                                  # idempotent: nothing saved any more
        assert termios.tcgetattr(s) != before
    finally:
        os.close(m)
        os.close(s)


def test_no_terminal_no_raw_mode(tmp_path):
    r, w = os.pipe()
    try:
        assert not RawTerminal.wanted(r)
        assert not RawTerminal(r).enter()
    finally:
        os.close(r)
        os.close(w)


def test_escape_is_ctrl_a():
    assert ESCAPE == 0x01
