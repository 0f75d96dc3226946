"""Machine-check set-up: the IA32_MCG_CAP a vCPU gets, and when it gets one (as QEMU)."""
import pytest

from kvmpy.kvm.regs import CpuidEntry
from kvmpy.x86 import mce

MCE_MCA = mce.CPUID_1_EDX_MCE | mce.CPUID_1_EDX_MCA


def leaf1(eax=0x000A0671, edx=MCE_MCA):
    return [CpuidEntry(0, 0, 0, 0x16, 0, 0, 0), CpuidEntry(1, 0, 0, eax, 0, 0, edx)]


def test_ten_banks_with_mcg_ctl_p_and_mcg_ser_p_where_kvm_supports_them():
    """QEMU's value: 10 banks | MCG_CTL_P | MCG_SER_P, each feature only if KVM supports it."""
    assert mce.mcg_cap(mce.MCG_CTL_P | mce.MCG_SER_P | 32, 32) == 0x0100_010A
    assert mce.mcg_cap(mce.MCG_CTL_P | 32, 32) == 0x10A
    assert mce.mcg_cap(0, 32) == 10


def test_features_qemu_does_not_ask_for_are_left_out():
    """LMCE, CMCI and the rest of what KVM supports are not passed on: QEMU's default CPU asks
    only for MCG_CTL_P and MCG_SER_P."""
    assert mce.mcg_cap(0xFFFF_FFFF_FFFF_FFFF, 32) == 0x0100_010A


def test_fewer_banks_than_ten_gives_what_kvm_has_and_none_is_an_error():
    assert mce.mcg_cap(mce.MCG_CTL_P, 6) == mce.MCG_CTL_P | 6
    with pytest.raises(ValueError, match="0 machine-check banks"):
        mce.mcg_cap(mce.MCG_CTL_P, 0)


@pytest.mark.parametrize("eax,edx,expected", [
    (0x000A0671, MCE_MCA, True),                  # family 6
    (0x00A20F10, MCE_MCA, True),                  # family 0xF + 0x0A (AMD Zen 3)
    (0x00000543, MCE_MCA, False),                 # family 5: QEMU sets no banks up
    (0x000A0671, mce.CPUID_1_EDX_MCE, False),     # MCE without MCA
    (0x000A0671, mce.CPUID_1_EDX_MCA, False),
])
def test_banks_only_for_a_family_6_cpu_with_mce_and_mca(eax, edx, expected):
    assert mce.has_mca(leaf1(eax, edx)) is expected


def test_no_leaf_1_no_banks():
    assert not mce.has_mca([CpuidEntry(0, 0, 0, 0, 0, 0, 0)])
