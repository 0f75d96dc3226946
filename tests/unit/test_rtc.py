"""The MC146818 CMOS RTC: the host clock in BCD or binary, UIP that clears, CMOS RAM."""
import calendar

import pytest
from hypothesis import given, strategies as st

from kvmpy.devices.rtc import (CMOS_SIZE, DATA, INDEX, REG_A_UIP, REG_B_24H, REG_B_DM, REG_B_SET,
                               REG_B_UIE, REG_C_UF, REG_D_VRT, RTC_CENTURY, RTC_DAY_OF_MONTH,
                               RTC_DAY_OF_WEEK, RTC_HOURS, RTC_MINUTES, RTC_MONTH, RTC_REG_A,
                               RTC_REG_B, RTC_REG_C, RTC_REG_D, RTC_SECONDS, RTC_YEAR, Rtc)
from kvmpy.errors import DeviceError

# Sunday 2024-03-17 21:45:09 UTC
T = calendar.timegm((2024, 3, 17, 21, 45, 9))


class Clock:
    def __init__(self, t=T):
        self.t = t

    def __call__(self):
        return self.t


def cmos(dev, reg, value=None):
    dev.write(INDEX, 1, reg)
    if value is None:
        return dev.read(DATA, 1)
    dev.write(DATA, 1, value)


def test_power_on_time_is_bcd_24_hour():
    rtc = Rtc(Clock())
    got = {r: cmos(rtc, r) for r in (RTC_SECONDS, RTC_MINUTES, RTC_HOURS, RTC_DAY_OF_WEEK,
                                     RTC_DAY_OF_MONTH, RTC_MONTH, RTC_YEAR, RTC_CENTURY)}
    assert got == {RTC_SECONDS: 0x09, RTC_MINUTES: 0x45, RTC_HOURS: 0x21, RTC_DAY_OF_WEEK: 1,
                   RTC_DAY_OF_MONTH: 0x17, RTC_MONTH: 0x03, RTC_YEAR: 0x24, RTC_CENTURY: 0x20}


def test_binary_mode_and_12_hour_mode():
    rtc = Rtc(Clock())
    cmos(rtc, RTC_REG_B, REG_B_DM | REG_B_24H)
    assert (cmos(rtc, RTC_HOURS), cmos(rtc, RTC_MINUTES), cmos(rtc, RTC_YEAR)) == (21, 45, 24)
    cmos(rtc, RTC_REG_B, REG_B_DM)
    assert cmos(rtc, RTC_HOURS) == 0x80 | 9                # 9 PM, binary
    cmos(rtc, RTC_REG_B, 0)
    assert cmos(rtc, RTC_HOURS) == 0x80 | 0x09             # 9 PM, BCD


@pytest.mark.parametrize("hour,want", [(0, 0x12), (11, 0x11), (12, 0x80 | 0x12), (23, 0x80 | 0x11)])
def test_12_hour_edges(hour, want):
    rtc = Rtc(Clock(calendar.timegm((2024, 3, 17, hour, 0, 0))))
    cmos(rtc, RTC_REG_B, 0)
    assert cmos(rtc, RTC_HOURS) == want


@given(st.integers(0, 2**32), st.booleans())
def test_time_registers_follow_the_clock(t, binary):
    import time
    rtc = Rtc(Clock(t))
    cmos(rtc, RTC_REG_B, REG_B_24H | (REG_B_DM if binary else 0))
    enc = (lambda n: n) if binary else (lambda n: (n // 10) << 4 | n % 10)
    g = time.gmtime(t)
    assert cmos(rtc, RTC_SECONDS) == enc(g.tm_sec)
    assert cmos(rtc, RTC_DAY_OF_MONTH) == enc(g.tm_mday)
    assert cmos(rtc, RTC_MONTH) == enc(g.tm_mon)
    assert cmos(rtc, RTC_YEAR) == enc(g.tm_year % 100) and cmos(rtc, RTC_CENTURY) == enc(g.tm_year // 100)
    assert 1 <= cmos(rtc, RTC_DAY_OF_WEEK) <= 7


def test_uip_is_set_only_in_the_last_244_us_of_a_second():
    clock = Clock(T + 0.5)
    rtc = Rtc(clock)
    assert cmos(rtc, RTC_REG_A) == 0x26
    clock.t = T + 0.9999
    assert cmos(rtc, RTC_REG_A) == 0x26 | REG_A_UIP
    clock.t = T + 1.0001                                   # the update is done: UIP clear again
    assert cmos(rtc, RTC_REG_A) == 0x26
    cmos(rtc, RTC_REG_B, REG_B_SET | REG_B_24H)            # halted: never updating
    clock.t = T + 0.9999
    assert not cmos(rtc, RTC_REG_A) & REG_A_UIP


@pytest.mark.parametrize("frac", [0.0, 0.3, 0.99975, 0.99999])
def test_linux_style_read_finishes_in_a_few_reads(frac):
    """mc146818_avoid_UIP: read seconds, check UIP clear, read seconds again; retry otherwise.
    With the clock moving 10 us per port access it is done at once, or after the 244 us window."""
    clock = Clock(T + frac)
    rtc = Rtc(clock)

    def read(reg):
        clock.t += 10e-6
        return cmos(rtc, reg)
    for passes in range(1, 100):
        seconds = read(RTC_SECONDS)
        if not read(RTC_REG_A) & REG_A_UIP and seconds == read(RTC_SECONDS):
            break
    assert passes == 1 or frac > 0.9997 and passes <= 244 // 20 + 2


def test_register_a_keeps_its_rate_but_not_uip():
    rtc = Rtc(Clock())
    cmos(rtc, RTC_REG_A, 0xFF)
    assert cmos(rtc, RTC_REG_A) == 0x7F


def test_register_c_update_flag_clears_on_read():
    clock = Clock()
    rtc = Rtc(clock)
    assert cmos(rtc, RTC_REG_C) == 0
    clock.t += 1
    assert cmos(rtc, RTC_REG_C) == REG_C_UF
    assert cmos(rtc, RTC_REG_C) == 0
    cmos(rtc, RTC_REG_C, 0xFF)                             # read-only
    assert cmos(rtc, RTC_REG_C) == 0


def test_register_d_says_valid_ram_and_time():
    rtc = Rtc(Clock())
    cmos(rtc, RTC_REG_D, 0)
    assert cmos(rtc, RTC_REG_D) == REG_D_VRT


def test_set_clears_uie_and_time_writes_are_ignored():
    rtc = Rtc(Clock())
    cmos(rtc, RTC_REG_B, REG_B_SET | REG_B_UIE | REG_B_24H)
    assert cmos(rtc, RTC_REG_B) == REG_B_SET | REG_B_24H
    cmos(rtc, RTC_SECONDS, 0x30)
    assert cmos(rtc, RTC_SECONDS) == 0x09


def test_cmos_ram_and_alarm_bytes_keep_what_the_guest_writes():
    rtc = Rtc(Clock())
    assert all(cmos(rtc, r) == 0 for r in range(0x0E, CMOS_SIZE) if r != RTC_CENTURY)
    for r in (0x01, 0x03, 0x05, 0x0E, 0x31, 0x7F):
        cmos(rtc, r, r ^ 0xA5)
    assert [cmos(rtc, r) for r in (0x01, 0x03, 0x05, 0x0E, 0x31, 0x7F)] == [r ^ 0xA5 for r in
                                                                            (0x01, 0x03, 0x05, 0x0E, 0x31, 0x7F)]


def test_index_bit_7_is_the_nmi_mask_and_the_index_port_reads_ff():
    rtc = Rtc(Clock())
    assert cmos(rtc, 0x80 | RTC_MINUTES) == 0x45
    assert rtc.read(INDEX, 1) == 0xFF


accesses = st.lists(st.tuples(st.booleans(), st.integers(0, 3), st.sampled_from([1, 2, 4]),
                              st.integers(0, 2**32 - 1), st.floats(0, 2**33)), max_size=60)


@given(accesses)
def test_any_access_sequence_never_raises_and_state_round_trips(ops):
    clock = Clock()
    rtc = Rtc(clock)
    for is_write, off, size, value, t in ops:
        clock.t = t
        if is_write:
            rtc.write(off, size, value)
        else:
            assert 0 <= rtc.read(off, size) <= 0xFF
    twin = Rtc(clock)
    twin.load_state(rtc.save_state())
    assert twin.save_state() == rtc.save_state()


@pytest.mark.parametrize("bad", [None, [], {}, {"index": 0}, {"index": 0, "ram": "zz"},
                                 {"index": -1, "ram": "00" * 128}, {"index": 256, "ram": "00" * 128},
                                 {"index": 1.0, "ram": "00" * 128}, {"index": 0, "ram": "00" * 127},
                                 {"index": 0, "ram": 5}])
def test_hostile_state_is_refused_and_changes_nothing(bad):
    rtc = Rtc(Clock())
    cmos(rtc, 0x40, 0x99)
    before = rtc.save_state()
    with pytest.raises(DeviceError):
        rtc.load_state(bad)
    assert rtc.save_state() == before
