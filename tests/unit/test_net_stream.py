"""The length-prefixed frame stream (kvmpy/net/stream.py): a hostile peer gets a clear
error or a drop, never a crash or unbounded memory."""
import struct

import pytest
from hypothesis import given, settings, strategies as st

from kvmpy.net import Net
from kvmpy.net.stream import MAX_FRAME, FrameReader, StreamError, encode

FRAMES = st.lists(st.binary(min_size=0, max_size=300), max_size=20)


@settings(max_examples=200, deadline=None)
@given(frames=FRAMES, cuts=st.lists(st.integers(0, 7000), max_size=30))
def test_any_split_of_a_good_stream_gives_its_frames_back(frames, cuts):
    data = b"".join(encode(f) for f in frames)
    r = FrameReader()
    out, pos = [], 0
    for c in sorted(set(cuts)) + [len(data)]:
        out += r.feed(data[pos:c])
        pos = max(pos, c)
    assert out == [f for f in frames if f]
    assert r.zero_length == sum(1 for f in frames if not f)
    r.eof()                                                     # ended on a frame boundary


@settings(max_examples=300, deadline=None)
@given(data=st.lists(st.binary(max_size=200), max_size=30), limit=st.integers(1, 600))
def test_hostile_bytes_give_frames_or_a_stream_error_and_bounded_memory(data, limit):
    r = FrameReader(max_frame=limit)
    try:
        for chunk in data:
            for f in r.feed(chunk):
                assert 1 <= len(f) <= limit
            assert r.pending < 4 + limit + len(chunk) + 4       # never more than one frame and a length
            if r.broken:
                assert r.pending == 0                           # nothing after a bad length is kept
    except StreamError as e:
        assert "frame length" in str(e) and r.broken == str(e)


def test_huge_zero_and_truncated_lengths():
    r = FrameReader()
    with pytest.raises(StreamError, match=r"frame length of 4294967295 bytes; at most 65550"):
        r.feed(b"\xff\xff\xff\xff")
    r = FrameReader()
    too_big = struct.pack(">I", MAX_FRAME + 1)
    assert r.feed(too_big[:3]) == []                           # not yet a whole length: waits
    with pytest.raises(StreamError):
        r.feed(too_big[3:])
    r = FrameReader()
    assert r.feed(encode(b"first") + b"\xff\xff\xff\xff" + encode(b"never")) == [b"first"]   # then the error
    with pytest.raises(StreamError, match="frame length of 4294967295"):
        r.feed(encode(b"more"))
    r = FrameReader()
    assert r.feed(b"\0\0\0\0" * 3 + encode(b"abc")) == [b"abc"] and r.zero_length == 3
    r.feed(encode(b"x" * 100)[:50])
    with pytest.raises(StreamError, match="closed the stream in the middle of a frame"):
        r.eof()


def test_net_specs():
    assert Net.parse("passt") == Net("passt")
    assert Net.parse("passt:/run/p.sock").target == "/run/p.sock"
    n = Net.parse("tap:kvm0,mac=02:00:00:00:00:07")
    assert (n.kind, n.target, n.mac_bytes) == ("tap", "kvm0", bytes.fromhex("020000000007"))
    assert Net.parse(n.spec) == n and Net.parse("passt").spec == "passt"
    for bad, why in (("tap", "interface name"), ("tap:", "nothing after"), ("slirp", "passt, tap"),
                     ("passt,mac=01:00:00:00:00:00", "multicast"), ("passt,mac=zz", "six hex bytes"),
                     ("passt,speed=1", "unknown option"), ("tap:a/b", "bad TAP interface name"),
                     ("tap:" + "x" * 16, "bad TAP interface name")):
        with pytest.raises(ValueError, match=why):
            Net.parse(bad)
