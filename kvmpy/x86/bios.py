"""What a kernel finds where a PC's BIOS would be: a reset entry at F000:FFF0.

kvmpy has no BIOS. Linux reboots by jumping to the BIOS's reset entry (real mode,
CS=0xF000, IP=0xFFF0: physical 0xFFFF0) when told to (``reboot=b``), and on its own when
the ACPI FADT says hardware-reduced, as kvmpy's does: ``reboot_init`` then picks EFI
(``efi_reboot_required()``), and without EFI runtime services ``BOOT_EFI`` falls through
to ``BOOT_BIOS``, ``machine_real_restart(MRR_BIOS)`` (arch/x86/kernel/reboot.c). Nothing
there, it would execute zeros forever. A BIOS there resets the machine; :func:`reset_entry`
is 16 bytes of real-mode code that do just that, through the Reset Control Register
(port 0xcf9, the write Linux's ``reboot=pci`` ends with) and, failing that, the i8042's
reset line, then halt with interrupts off.
"""
from __future__ import annotations

RESET_ENTRY = 0xFFFF0           # F000:FFF0, the last 16 bytes below 1 MiB
RESET_ENTRY_SIZE = 16
RCR_RESET = 0x06                # SYS_RST | RST_CPU (kvmpy/devices/reset.py)
I8042_PULSE_RESET = 0xFE        # i8042 command: pulse output line 0, the CPU reset


def reset_entry(reset_port: int | None = None, i8042_port: int | None = None) -> bytes:
    """The code at :data:`RESET_ENTRY`, 16 bytes (padded with ``hlt``), for a machine with a
    Reset Control Register at ``reset_port`` and/or an i8042 at ``i8042_port`` (its data port)."""
    code = b""
    if reset_port is not None:                      # mov dx, reset_port; mov al, 6; out dx, al
        code += b"\xba" + reset_port.to_bytes(2, "little") + bytes([0xB0, RCR_RESET, 0xEE])
    if i8042_port is not None:                      # mov al, 0xfe; out i8042_port + 4, al
        if not 0 <= i8042_port + 4 <= 0xFF:
            raise ValueError(f"the i8042's command port {i8042_port + 4:#x} needs 'out dx'")
        code += bytes([0xB0, I8042_PULSE_RESET, 0xE6, i8042_port + 4])
    code += b"\xfa\xf4\xeb\xfd"                     # cli; 1: hlt; jmp 1b
    return code.ljust(RESET_ENTRY_SIZE, b"\xf4")
