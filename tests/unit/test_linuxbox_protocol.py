"""kvmpy.linuxbox.protocol: the sandbox's requests and the agent's replies.

The reply parser meets hostile bytes: whatever a guest sends, it returns a Reply within
the request's limits or raises ProtocolError (AgentError for a well-formed ERROR reply),
never reads past a length it has not checked, and round-trips what the agent writes.
The request encoder is checked against a decoder written here from the module docstring
(the C agent's parser is exercised on the host by tests/integration/test_linux_sandbox.py).
"""
import struct

import pytest
from hypothesis import given, settings, strategies as st

from kvmpy.linuxbox import protocol as P

text = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=20)
blob = st.binary(max_size=200)


def decode_request(data: bytes):
    """The request format as the module docstring states it (the agent's side, in Python)."""
    magic, version, kind, zero, max_output, max_fetch, length = P.REQUEST_HEADER.unpack_from(data)
    assert (magic, version, kind, zero, len(data)) == (P.REQUEST_MAGIC, P.VERSION, P.KIND_RUN, 0,
                                                       P.REQUEST_HEADER.size + length)
    read = P.bytes_reader(data[P.REQUEST_HEADER.size:])

    def u32():
        return struct.unpack("<I", read(4))[0]

    def string():
        return read(u32()).decode()

    argv = [string() for _ in range(u32())]
    env = dict(string().split("=", 1) for _ in range(u32()))
    cwd, stdin = string(), read(u32())
    files = {}
    for _ in range(u32()):
        path, mode = string(), u32()
        files[path] = (read(u32()), mode)
    fetch = [string() for _ in range(u32())]
    with pytest.raises(P.ProtocolError):
        read(1)
    return P.Request(argv, env, cwd, stdin, files, fetch, max_output, max_fetch)


requests = st.builds(
    P.Request, st.lists(text, min_size=1, max_size=4),
    st.dictionaries(text.filter(lambda s: s and "=" not in s), text, max_size=3), text, blob,
    st.dictionaries(text, st.tuples(blob, st.integers(0, 0o7777)), max_size=3), st.lists(text, max_size=3),
    st.integers(0, P.MAX_OUTPUT), st.integers(0, P.MAX_FETCH))


@given(requests)
def test_a_request_decodes_to_itself(req):
    assert decode_request(P.encode_request(req)) == req


@pytest.mark.parametrize("bad, match", [
    (P.Request([]), "at least a program name"),
    (P.Request(["a\0b"]), "NUL byte"),
    (P.Request(["sh"], env={"A=B": "x"}), "has '='"),
    (P.Request(["sh"], files={"/f": (b"", 0o10000)}), "not a permission mode"),
    (P.Request(["sh"], max_output=P.MAX_OUTPUT + 1), "limited to"),
    (P.Request(["sh"], fetch=["/x"] * (P.MAX_ITEMS + 1)), "at most"),
    (P.Request(["sh"], stdin=bytes(P.MAX_REQUEST)), "at most"),
])
def test_a_request_that_breaks_a_limit_is_refused_before_it_is_sent(bad, match):
    with pytest.raises(P.ProtocolError, match=match):
        P.encode_request(bad)


statuses = st.one_of(st.integers(0, 255).map(lambda c: c << 8), st.integers(1, 0x7E))
fetched = st.lists(st.one_of(st.tuples(st.just(0), st.booleans(), blob),
                             st.tuples(st.integers(1, 4095), st.just(False), st.just(b""))), max_size=4)


@given(statuses, blob, blob, st.integers(0, 3), fetched)
def test_a_reply_round_trips(ws, out, err, flags, files):
    data = P.encode_reply(ws, out, err, flags, files)
    r = P.read_reply(P.bytes_reader(data), 200, 200, len(files))
    assert (r.wait_status, r.stdout, r.stderr, r.flags, r.fetched) == (ws, out, err, flags, files)
    assert r.status == (ws >> 8 if ws & 0x7F == 0 else -ws)


@given(st.binary(max_size=300), st.integers(0, 100), st.integers(0, 100), st.integers(0, 3))
@settings(max_examples=500)
def test_hostile_bytes_give_a_reply_within_the_limits_or_a_protocol_error(data, max_output, max_fetch, nfetch):
    try:
        r = P.read_reply(P.bytes_reader(data), max_output, max_fetch, nfetch)
    except P.AgentError as e:
        assert len(str(e).encode("utf-8", "replace")) <= 4 * P.MAX_MESSAGE
        return
    except P.ProtocolError:
        return
    assert len(r.stdout) <= max_output and len(r.stderr) <= max_output and len(r.fetched) == nfetch
    assert all(len(d) <= max_fetch and (not e or not d) for e, _, d in r.fetched)


@given(statuses, blob, fetched, st.data())
def test_a_mutated_reply_never_escapes_the_limits(ws, out, files, data):
    """A valid reply with one byte changed, or cut short: parsed within limits, or refused."""
    raw = bytearray(P.encode_reply(ws, out, b"", 0, files))
    if data.draw(st.booleans()):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    else:
        del raw[data.draw(st.integers(0, len(raw) - 1)):]
    try:
        r = P.read_reply(P.bytes_reader(bytes(raw)), 200, 200, len(files))
    except (P.ProtocolError, P.AgentError):
        return
    assert len(r.stdout) <= 200 and all(len(d) <= 200 for _, _, d in r.fetched)


def test_a_length_past_the_limit_is_refused_before_its_bytes_are_read():
    reads = []
    source = P.bytes_reader(P.encode_reply(0, b"x" * 100))

    def read(n):
        reads.append(n)
        return source(n)
    with pytest.raises(P.ProtocolError, match="stdout: the guest says 100 bytes, at most 10"):
        P.read_reply(read, 10, 0, 0)
    assert reads == [P.REPLY_HEADER.size, 4]


@pytest.mark.parametrize("ws, why", [(0x7F, "neither"), (0x137F, "neither"), (-1, "neither"), (1 << 16, "neither")])
def test_a_wait_status_that_is_neither_exit_nor_signal_is_refused(ws, why):
    with pytest.raises(P.ProtocolError, match=why):
        P.read_reply(P.bytes_reader(P.encode_reply(ws)), 0, 0, 0)


def test_an_error_reply_is_an_agent_error_with_a_bounded_message():
    with pytest.raises(P.AgentError, match="cannot write /x: Permission denied"):
        P.read_reply(P.bytes_reader(P.encode_reply(0, error="cannot write /x: Permission denied")), 0, 0, 0)
    with pytest.raises(P.ProtocolError, match="error message"):
        P.read_reply(P.bytes_reader(P.encode_reply(0, error="x" * (P.MAX_MESSAGE + 1))), 0, 0, 0)


def test_the_agent_must_answer_for_every_path_asked_for():
    with pytest.raises(P.ProtocolError, match="answers for 1 fetched files, 2 were asked for"):
        P.read_reply(P.bytes_reader(P.encode_reply(0, fetched=[(0, False, b"")])), 0, 0, 2)
