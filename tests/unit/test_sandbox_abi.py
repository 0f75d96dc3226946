"""kvmpy.sandbox.abi (docs/sandboxes.md, "The call ABI"): the call page's parsers take any page
a hostile guest may leave and either refuse it with SandboxProtocolError or return values whose
every address and length lies inside RAM and within the limits. No KVM needed.
"""
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kvmpy.sandbox import abi


def _page(words: dict) -> bytes:
    w = [0] * (abi.PAGE_SIZE // 8)
    for name, v in words.items():
        w[abi.OFFSET[name] // 8] = v
    return struct.pack(f"<{len(w)}Q", *w)


U64 = st.integers(0, (1 << 64) - 1)
SMALL = st.one_of(st.integers(0, 1 << 22), U64)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(words=st.lists(U64, min_size=abi.PAGE_SIZE // 8, max_size=abi.PAGE_SIZE // 8),
       ret=st.sampled_from(["", "i", "b", "s"]), status=st.sampled_from([0, 1, 2]),
       t=st.sampled_from([0, abi.INT, abi.BYTES, abi.STR, 0x99]), value=SMALL, n=SMALL)
def test_reply_parser_bounds_everything(words, ret, status, t, value, n):
    o = abi.OFFSET["status"] // 8
    words[o:o + 4] = [status, t, value, n]
    page = struct.pack(f"<{len(words)}Q", *words)
    ram, limit = 1 << 22, 1 << 16
    try:
        r = abi.parse_reply(page, ret, ram, limit)
    except abi.SandboxProtocolError:
        return
    if r.error or r.type in (abi.BYTES, abi.STR):
        assert 0 <= r.value and r.value + r.len <= ram
        assert r.len <= (abi.MAX_MESSAGE if r.error else limit)
    assert r.error == (status == 1)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(words=st.lists(SMALL, min_size=abi.PAGE_SIZE // 8, max_size=abi.PAGE_SIZE // 8))
def test_host_request_parser_bounds_everything(words):
    page = struct.pack(f"<{len(words)}Q", *words)
    ram = 1 << 22
    try:
        req = abi.parse_host_request(page, ram, 1 << 20)
    except abi.SandboxProtocolError:
        return
    assert req.name_len <= abi.MAX_NAME and req.name_addr + req.name_len <= ram
    assert len(req.args) <= abi.MAX_ARGS and req.buf + req.cap <= ram
    for v in req.args:
        assert v.type in abi.NAMES
        assert v.type == abi.INT or (v.len <= 1 << 20 and v.value + v.len <= ram)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(table=U64, n=st.one_of(st.integers(0, 8), U64), blob=st.binary(max_size=512))
def test_export_parser_bounds_everything(table, n, blob):
    ram = 1 << 16
    mem = (blob * (ram // max(len(blob), 1) + 1))[:ram] if blob else bytes(ram)

    def read(addr, size):
        assert 0 <= addr and addr + size <= ram
        return mem[addr:addr + size]
    try:
        exports = abi.parse_exports(_page({"magic": abi.MAGIC, "exports": table, "nexports": n}), read, ram)
    except abi.SandboxProtocolError:
        return
    assert len(exports) <= n <= abi.MAX_EXPORTS
    for name, e in exports.items():
        assert len(name) <= abi.MAX_NAME and len(e.signature.args) <= abi.MAX_ARGS


def test_signature_parser():
    assert abi.parse_signature("ii:i") == ("ii", "i")
    assert abi.parse_signature(":") == ("", "")
    for bad in ("ii", "x:i", "i:ii", "iiiiiiiii:i", ""):
        with pytest.raises(ValueError):
            abi.parse_signature(bad)


VALUE = st.one_of(st.integers(-(1 << 63), (1 << 64) - 1), st.binary(max_size=64), st.text(max_size=32))


@settings(max_examples=200)
@given(values=st.lists(VALUE, max_size=abi.MAX_ARGS), base=st.integers(0, 1 << 40), size=st.integers(0, 512))
def test_arguments_are_placed_inside_the_area(values, base, size):
    sig = abi.Signature("".join("i" if isinstance(v, int) else "b" if isinstance(v, bytes) else "s"
                                for v in values), "")
    try:
        vals, blob = abi.encode_args(sig, tuple(values), base, size)
    except ValueError:
        return
    assert len(blob) <= size and len(abi.pack_call(3, vals)) == abi.OFFSET["status"] - abi.OFFSET["func"]
    for v, x in zip(vals, values):
        if isinstance(x, int):
            assert v == (abi.INT, x & abi.U64, 0)
            continue
        data = x if isinstance(x, bytes) else x.encode()
        off = v.value - base
        assert off % 8 == 0 and blob[off:off + v.len] == data and blob[off + v.len] == 0


def test_sandbox_errors_survive_pickling():
    """A RaySandboxPool's actor sends the call's exception back pickled: every field comes back."""
    import pickle
    from kvmpy.sandbox.abi import GuestFunctionError, SandboxCrash, SandboxTimeout
    crash = pickle.loads(pickle.dumps(SandboxCrash("crash: the guest crashed: #PF", "#PF", 14, 0x1000, 0xdead)))
    assert (type(crash), str(crash), crash.kind, crash.vector, crash.rip, crash.address) == \
        (SandboxCrash, "crash: the guest crashed: #PF", "#PF", 14, 0x1000, 0xdead)
    err = pickle.loads(pickle.dumps(GuestFunctionError("fail", "on purpose")))
    assert (type(err), str(err), err.function, err.message) == (GuestFunctionError, "fail: on purpose", "fail", "on purpose")
    assert str(pickle.loads(pickle.dumps(SandboxTimeout("add: 1 s")))) == "add: 1 s"
