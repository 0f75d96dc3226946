"""The Linux sandbox's root disk: kvmpy.images.rootfs with Debian's python3 and the agent.

The agent (guests/linux/kvmpy-agent.c, built by guests/Makefile) goes to /usr/sbin, and
an ``/etc/rc.local``, which the disk's rcS runs last, starts it in the background with
its output on the console. Kept apart from sandbox.py so the nested testbed can build
(and ship) this disk without importing the machine.
"""
from __future__ import annotations

from ..images import guests, linuxkernel, rootfs

AGENT_PORT = 5200               # the host's vsock port the agent connects to
AGENT_PATH = "usr/sbin/kvmpy-agent"
RC_LOCAL = f"""#!/bin/sh
# kvmpy.linuxbox: the agent connects to the host's vsock port {AGENT_PORT} and runs its commands
/{AGENT_PATH} {AGENT_PORT} </dev/null >/dev/console 2>&1 &
"""


def agent_files(agent: bytes | None = None) -> dict[str, tuple[bytes, int]]:
    """The files the sandbox's disk adds: the agent (default: the one guests/Makefile built)
    and the rc.local that starts it."""
    if agent is None:
        agent = guests.built("kvmpy-agent").read_bytes()
    return {AGENT_PATH: (agent, 0o755), "etc/rc.local": (RC_LOCAL.encode(), 0o755)}


def build(linux: linuxkernel.LinuxFiles | None = None, *, agent: bytes | None = None, offline: bool = False,
          progress=None, cache=None) -> rootfs.RootDisk:
    """The sandbox's root disk (python3 and the agent), built once and cached by content."""
    return rootfs.build(linux, python=True, files=agent_files(agent), offline=offline, progress=progress,
                        cache=cache)
