"""kvmpy.sandbox: call functions in micro-VMs, reset after every call (docs/sandboxes.md).

    from kvmpy import Sandbox
    with Sandbox("sandbox-demo") as sb:
        sb.call("add", 2, 3)                      # 5
        sb.register("decorate", lambda s: f"*{s}*", "s:s")
        sb.call("shout", "hi")                    # "*HI*": the guest called the host

``Sandbox`` (sandbox.py) owns a machine checkpointed at the guest's ready point; ``abi``
is the call page's layout and its bounds-checked parsers; ``SandboxPool`` (pool.py)
keeps warm sandboxes for many threads. The guest side is guests/runtime/sandbox.h.
"""
from .abi import (GuestFunctionError, SandboxCrash, SandboxError, SandboxProtocolError, SandboxTimeout,
                  Signature)
from .pool import SandboxPool
from .sandbox import Sandbox

__all__ = ["Sandbox", "SandboxPool", "SandboxError", "SandboxCrash", "SandboxTimeout", "GuestFunctionError",
           "SandboxProtocolError", "Signature"]
