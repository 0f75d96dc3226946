"""L3: the virtual machine monitor. ``Machine`` (machine.py) owns the parts and wires them:
the platform (platform.py: every attached device, where it lives, and which of its
accesses C serves), one vCPU loop per vCPU (vcpu_loop.py), the pause gate (pause.py),
the machine state gathered from its parts (state.py), the C hot path's facade (native.py),
the run statistics (stats.py), the rate-limited disks' timer (throttle.py) and the process
sandbox (confine.py)."""
