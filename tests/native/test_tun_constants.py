"""kvmpy.net.tap is a pure module (no compiled extension), so it writes TUNSETIFF and the
IFF_ flags as numbers; the compiler checks them here against <linux/if_tun.h> (csrc/build.py)."""
from kvmpy._native import lib
from kvmpy.net import tap


def test_the_tap_backends_numbers_are_the_kernel_headers():
    assert (tap.TUNSETIFF, tap.IFF_TAP, tap.IFF_NO_PI) == (lib.TUNSETIFF, lib.IFF_TAP, lib.IFF_NO_PI)
