"""Linux sandboxes: Debian's stock kernel booted once, then commands from a checkpoint.

``LinuxSandbox`` (sandbox.py) boots the kernel with a root disk that holds an agent
(guests/linux/kvmpy-agent.c), waits for the agent over vsock, checkpoints the machine
and runs each command from that checkpoint; protocol.py is the wire format between the
two. docs/linux-sandbox.md tells the whole story.
"""
from importlib import import_module

_EXPORTS = {"LinuxSandbox": "sandbox", "Result": "sandbox", "SandboxError": "sandbox", "SandboxTimeout": "sandbox",
            "SandboxCrashed": "sandbox", "AgentError": "protocol", "ProtocolError": "protocol"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    """Names load on first use: protocol.py (pure) imports without the compiled extension."""
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'kvmpy.linuxbox' has no attribute {name!r}")
