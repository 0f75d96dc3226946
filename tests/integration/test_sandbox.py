"""kvmpy.Sandbox and SandboxPool (docs/sandboxes.md): typed calls into the sandbox-demo guest
(guests/sandbox-demo.c, CPL 3), host calls checked against what was registered, crashes and
timeouts as exceptions that leave the sandbox usable, no state from one call in the next,
and hostile results refused with a clear error. The call page's parsers have their
hypothesis tests in tests/unit/test_sandbox_abi.py (no KVM needed).
"""
import hashlib
import threading

import pytest

import kvmpy
from kvmpy.errors import KvmpyError
from kvmpy.sandbox import (GuestFunctionError, Sandbox, SandboxCrash, SandboxError, SandboxPool,
                           SandboxProtocolError, SandboxTimeout)

MEM = 16 << 20


@pytest.fixture(scope="module")
def sb():
    with Sandbox("sandbox-demo", mem_size=MEM, timeout=2.0) as s:
        s.register("double", lambda x: 2 * x, "i:i")
        s.register("decorate", lambda s: f"*{s}*", "s:s")
        yield s


def ram_digest(s) -> str:
    return hashlib.sha256(s.machine.memory.read(0, s.mem_size)).hexdigest()


def test_exports_are_read_from_the_guest(sb):
    assert {n: str(e.signature) for n, e in sb.exports.items()}.items() >= {
        "add": "ii:i", "nop": ":", "reverse": "b:b", "upper": "s:s", "counter": ":i", "dirty": "i:i",
        "call_host": "si:i", "shout": "s:s", "crash": "i:i", "spin": ":i", "hostile": "i:b"}.items()
    assert kvmpy.Sandbox is Sandbox and kvmpy.SandboxPool is SandboxPool


def test_calls_with_each_type(sb):
    assert sb.call("add", 2, 3) == 5
    assert sb.call("add", -7, 2) == -5                          # int64 both ways
    assert sb.call("add", (1 << 63) - 1, 1) == -(1 << 63)      # wraps like the guest's u64
    assert sb.call("nop") is None
    assert sb.call("reverse", b"hello") == b"olleh"
    assert sb.call("reverse", bytearray(b"")) == b""
    assert sb.call("upper", "héllo, wörld") == "HéLLO, WöRLD"
    big = bytes(range(256)) * 1024                               # 256 KiB in, 256 KiB back
    assert sb.call("reverse", big) == big[::-1]


def test_arguments_are_checked_before_the_guest_runs(sb):
    calls = sb.calls
    with pytest.raises(TypeError, match="takes 2 arguments"):
        sb.call("add", 1)
    with pytest.raises(TypeError, match="must be an int"):
        sb.call("add", 1, "2")
    with pytest.raises(TypeError, match="must be bytes"):
        sb.call("reverse", "text")
    with pytest.raises(OverflowError):
        sb.call("add", 1 << 64, 0)
    with pytest.raises(ValueError, match="argument area"):
        sb.call("reverse", bytes(sb.args_size))
    with pytest.raises(SandboxError, match="no function 'missing'"):
        sb.call("missing")
    assert sb.calls == calls


def test_host_calls(sb):
    assert sb.call("call_host", "double", 21) == 42
    assert sb.call("shout", "hi") == "*HI*"


def test_unregistered_and_ill_typed_host_calls_are_refused_into_the_guest(sb):
    with pytest.raises(GuestFunctionError, match="host function 'nope' is not registered") as e:
        sb.call("call_host", "nope", 1)
    assert e.value.function == "call_host"
    with pytest.raises(GuestFunctionError, match=r"'decorate' takes \(s\), the guest passed \(i\)"):
        sb.call("call_host", "decorate", 1)
    assert sb.call("add", 1, 1) == 2


def test_a_host_function_that_raises_aborts_the_call(sb):
    def boom(x):
        raise RuntimeError(f"boom {x}")
    sb.register("boom", boom, "i:i")
    with pytest.raises(RuntimeError, match="boom 7"):
        sb.call("call_host", "boom", 7)
    sb.register("wrong", lambda x: "not an int", "i:i")
    with pytest.raises(SandboxError, match="result must be an int"):
        sb.call("call_host", "wrong", 7)
    assert sb.call("call_host", "double", 4) == 8


def test_a_host_function_cannot_call_its_own_sandbox(sb):
    sb.register("nested", lambda x: sb.call("add", x, x), "i:i")
    with pytest.raises(SandboxError, match="called its own sandbox"):
        sb.call("call_host", "nested", 1)
    assert sb.call("add", 3, 3) == 6


def test_guest_errors(sb):
    with pytest.raises(GuestFunctionError, match="^fail: it went wrong$") as e:
        sb.call("fail", "it went wrong")
    assert e.value.message == "it went wrong"


@pytest.mark.parametrize("mode, kind", [(0, "#PF"), (1, "#UD"), (2, "#DE"), (3, "triple-fault")])
def test_a_crash_raises_and_the_sandbox_stays_usable(sb, mode, kind):
    with pytest.raises(SandboxCrash) as e:
        sb.call("crash", mode)
    assert e.value.kind == kind and isinstance(e.value, KvmpyError)
    if kind == "#PF":
        assert e.value.address == 0x7F0000000000 and e.value.vector == 14
    assert sb.call("add", 20, 22) == 42


def test_a_timeout_raises_and_the_sandbox_stays_usable(sb):
    with pytest.raises(SandboxTimeout, match="spin: no result within 0.2 s"):
        sb.call("spin", timeout=0.2)
    assert sb.call("counter") == 1


def test_no_state_leaks_between_calls(sb):
    before = ram_digest(sb)
    assert [sb.call("counter") for _ in range(5)] == [1] * 5
    sb.call("dirty", 256)
    sb.call("reverse", b"x" * 4096)
    with pytest.raises(SandboxCrash):
        sb.call("crash", 3)                                      # wrecks the IDT, then resets
    assert ram_digest(sb) == before


@pytest.mark.parametrize("mode, message", [
    (0, "returned 0x10000000000 bytes; the limit is 0x100000"),
    (1, r"the result \(0x10 bytes at 0x8000000000\) is not inside"),
    (2, r"the result \(0x10 bytes at 0xffffffffffffffff\) is not inside"),
    (3, "returned a value of type 'i' for a function declared to return 'b'"),
    (4, "left call status 0x4d"),
    (5, "wrote 0x99 to isa-debug-exit"),
    (6, "a host call's name .* is not inside"),
    (7, "a host call with 1000 arguments"),
])
def test_hostile_results_are_refused(sb, mode, message):
    with pytest.raises(SandboxProtocolError, match="^hostile: (the guest )?" + message):
        sb.call("hostile", mode)
    assert sb.call("add", 1, 2) == 3


def test_a_str_result_must_be_utf8(sb):
    with pytest.raises(SandboxProtocolError, match="not UTF-8"):
        sb.call("hostile_str")


def test_result_limit(sb):
    with Sandbox("sandbox-demo", mem_size=MEM, max_result=16) as small:
        assert small.call("reverse", b"0123456789abcdef") == b"fedcba9876543210"
        with pytest.raises(SandboxProtocolError, match="returned 0x11 bytes; the limit is 0x10"):
            small.call("reverse", bytes(17))


def test_closed_sandbox_refuses_calls():
    s = Sandbox("sandbox-demo", mem_size=MEM)
    s.close()
    s.close()
    with pytest.raises(SandboxError, match="closed"):
        s.call("nop")


def test_image_without_the_sdk_is_refused():
    with pytest.raises(SandboxError, match="no sandbox_page"):
        Sandbox("reset-case")


# --- the pool ------------------------------------------------------------------------------

def test_pool_serves_many_threads():
    with SandboxPool("sandbox-demo", size=2, mem_size=MEM, timeout=2.0) as pool:
        pool.register("double", lambda x: 2 * x, "i:i")
        results, errors = {}, []

        def worker(k):
            try:
                for i in range(15):
                    assert pool.call("add", k, i) == k + i
                    assert pool.call("counter") == 1
                    if i == 7:
                        with pytest.raises(SandboxCrash):
                            pool.call("crash", k % 3)
                results[k] = pool.call("call_host", "double", k)
            except BaseException as e:          # noqa: BLE001 - reported below
                errors.append(e)
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert results == {k: 2 * k for k in range(6)}
        assert pool.replaced == 0
    with pytest.raises(SandboxError, match="closed"):
        pool.call("nop")


def test_pool_replaces_a_sandbox_after_a_host_failure():
    with SandboxPool("sandbox-demo", size=1, mem_size=MEM) as pool:
        pool.register("boom", lambda x: 1 // 0, "i:i")
        with pytest.raises(ZeroDivisionError):
            pool.call("call_host", "boom", 1)
        assert pool.replaced == 1
        assert pool.call("add", 2, 2) == 4
        with pytest.raises(ZeroDivisionError):                  # the new sandbox knows boom too
            pool.call("call_host", "boom", 1)


def test_the_docs_example_runs(capsys):
    """docs/sandboxes.md's Python example runs as shown."""
    import pathlib
    import re
    doc = pathlib.Path(__file__).resolve().parents[2] / "docs" / "sandboxes.md"
    code = re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)[0]
    exec(compile(code, str(doc), "exec"), {"__name__": "sandboxes_example"})
    assert capsys.readouterr().out == "#PF 0x7f0000000000\n"
