"""kvmpy.sandbox: call functions in micro-VMs, reset after every call (docs/sandboxes.md).

    from kvmpy import Sandbox
    with Sandbox("sandbox-demo") as sb:
        sb.call("add", 2, 3)                      # 5
        sb.register("decorate", lambda s: f"*{s}*", "s:s")
        sb.call("shout", "hi")                    # "*HI*": the guest called the host

``Sandbox`` (sandbox.py) owns a machine checkpointed at the guest's ready point; ``abi``
is the call page's layout and its bounds-checked parsers (pure: it imports without KVM or
the compiled extension, so names load on first use); ``SandboxPool`` (pool.py) keeps warm
sandboxes for many threads. The guest side is guests/runtime/sandbox.h.
"""
from importlib import import_module

_EXPORTS = {"Sandbox": "sandbox", "SandboxPool": "pool", "SandboxError": "abi", "SandboxCrash": "abi",
            "SandboxTimeout": "abi", "GuestFunctionError": "abi", "SandboxProtocolError": "abi",
            "Signature": "abi"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'kvmpy.sandbox' has no attribute {name!r}")
