"""Guest RAM for loader tests: pre-filled so that stray writes and .bss zeroing show."""
from kvmpy.kvm.memory import GuestMemory

RAM = 0x20_0000          # 2 MiB
FILL = 0xAA              # RAM is pre-filled with this


def fresh_mem(size=RAM, gpa=0):
    mem = GuestMemory.anonymous(size, gpa)
    mem.fill(gpa, size, FILL)
    return mem


def untouched_outside(mem, segments, size=RAM) -> bool:
    """True if every RAM byte outside ``segments`` still holds FILL."""
    snap = mem.read(0, size)
    expect = bytearray([FILL]) * size
    for gpa, n in segments:
        expect[gpa:gpa + n] = snap[gpa:gpa + n]
    return snap == expect
