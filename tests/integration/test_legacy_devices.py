"""The i8042 and the CMOS RTC seen from a real-mode guest, and in snapshots."""
import time

import kvmpy

from .lab import rewrite_manifest

# i8042: 0x20 (read CTR) to 0x64, status -> bl, CTR -> bh;
# RTC: register A -> cl, D -> ch, year -> dl, century -> dh; hlt
PROBE = ("b0 20 e6 64 e4 64 88 c3 e4 60 88 c7"
         "b0 0a e6 70 e4 71 88 c1"
         "b0 0d e6 70 e4 71 88 c5"
         "b0 09 e6 70 e4 71 88 c2"
         "b0 32 e6 70 e4 71 88 c6"
         "f4")
# CMOS byte 0x40 = 0x5a; i8042 CTR = 0x47 (0x60 to 0x64, 0x47 to 0x60); out 0xf4 (isa-debug-exit)
WRITE = "b0 40 e6 70 b0 5a e6 71 b0 60 e6 64 b0 47 e6 60 e6 f4"


def bcd(n):
    return (n // 10) << 4 | n % 10


def run(m, code):
    m.load(bytes.fromhex(code.replace(" ", "")), format="raw", mode="real")
    return m.run(timeout=10)


def test_a_guest_reads_the_ctr_and_the_clock_at_once():
    """The CTR read answers on the first status poll; the RTC reads the host's UTC date."""
    with kvmpy.Machine(mem_size=1 << 20, irqchip=False) as m:     # HLT exits without the irqchip
        result = run(m, PROBE)
    assert result.reason == "halt"
    r = result.regs
    status, ctr = r.rbx & 0xFF, (r.rbx >> 8) & 0xFF
    assert status & 0x01 and not status & 0x02          # OBF on the first poll, IBF never
    assert ctr == 0x05                                  # KBDINT | SYSFLAG, as Firecracker
    assert r.rcx & 0x7F == 0x26 and (r.rcx >> 8) & 0xFF == 0x80     # register A rate, D: VRT
    year = time.gmtime().tm_year
    assert r.rdx & 0xFF == bcd(year % 100) and (r.rdx >> 8) & 0xFF == bcd(year // 100)
    assert m.stats.devices["i8042"] == 3 and m.stats.devices["rtc"] == 8


def test_device_state_survives_a_snapshot_and_old_snapshots_still_restore(tmp_path):
    with kvmpy.Machine(mem_size=1 << 20) as m:
        assert run(m, WRITE).reason == "exit"
        m.snapshot(str(tmp_path / "snap"))
    with kvmpy.Machine.restore(str(tmp_path / "snap")) as m:
        devices = m.platform.save_state()
    assert devices["i8042"]["ctr"] == 0x47
    assert bytes.fromhex(devices["rtc"]["ram"])[0x40] == 0x5A

    def older(body):                    # a version-2 snapshot from before these had state
        del body["devices"]["i8042"], body["devices"]["rtc"]
    rewrite_manifest(tmp_path / "snap", older)
    with kvmpy.Machine.restore(str(tmp_path / "snap")) as m:
        devices = m.platform.save_state()
    assert devices["i8042"]["ctr"] == 0x05 and bytes.fromhex(devices["rtc"]["ram"])[0x40] == 0
