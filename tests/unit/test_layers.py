"""The architecture guard: kvmpy's imports point down, loop nowhere, and stay out of each
other's underscore names; modules and functions stay small (DESIGN.md, "Layers").

Reads the source with ``ast`` (tests/unit/archcheck.py holds the checker and its rules);
nothing of kvmpy is imported, so it needs neither /dev/kvm nor the compiled extension.

The floors, bottom first, as the imports show them:

  L0            errors, localsock (owner-only sockets, standard library), _native
  L1            kvm/
  L2 (pure)     x86/, devices/, loader/    siblings; only loader -> x86 (layout, boot params)
  L3 tools      debug/, images/            the vCPU loop uses trace and disasm; gdbstub and
                                           images take a machine or produce bytes, never import vmm
  L3 vmm        vmm/
  L3 lifecycle  lifecycle/                 uses Machine (and vmm.native); vmm may not import it
  L3 fuzz       fuzz/                      a harness over Machine's public API (load, run, checkpoint, reset)
  L3 sandbox    sandbox/                   function calls into a guest over the same API; names crashes
                                           with fuzz.traps (above fuzz: it imports that piece)
  L3 linuxbox   linuxbox/                  Linux sandboxes over Machine's public API and the images (rootfs, guests)
  L3 bench      bench/                     drives Machine, migration and the images, and is run
                                           by the CLI: the top of L3, under the front end
  L4            cli, __main__, testing/        the command line; the pytest plugin and its fixtures
  exempt        kvmpy/__init__.py, the lazy facade; ``from kvmpy import Machine`` counts
                as an import of kvmpy.vmm.machine (its _EXPORTS/_SUBMODULES tables are read)

Pure (L2) modules may use, below them, only errors, kvm.regs, kvm.memory (whose _native
import is optional: ``try/except ImportError``) and the kvm facade; nothing they import at
module level may reach further.

Two allowlists, each entry an exact violation key and a one-line reason:
  ALLOWED       deliberate exceptions; only lazy imports can be allowed (a module-level cycle
                can never be).
  KNOWN_DEBTS   violations being fixed. Remove an entry when you fix it: an entry whose
                violation no longer occurs fails the test, so the list only shrinks.
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from archcheck import Layout, check  # noqa: E402

PACKAGE = Path(__file__).resolve().parents[2] / "kvmpy"

LAYOUT = Layout(
    floors=[
        ("L0", {"kvmpy.errors", "kvmpy.localsock", "kvmpy._native"}),
        ("L1", {"kvmpy.kvm"}),
        ("L2", {"kvmpy.x86", "kvmpy.devices", "kvmpy.loader", "kvmpy.net"}),
        ("L3 tools", {"kvmpy.debug", "kvmpy.images"}),
        ("L3 vmm", {"kvmpy.vmm"}),
        ("L3 lifecycle", {"kvmpy.lifecycle"}),
        ("L3 fuzz", {"kvmpy.fuzz"}),
        ("L3 sandbox", {"kvmpy.sandbox"}),
        ("L3 linuxbox", {"kvmpy.linuxbox"}),
        ("L3 bench", {"kvmpy.bench"}),
        ("L4", {"kvmpy.cli", "kvmpy.__main__", "kvmpy.testing"}),
    ],
    sideways={
        "kvmpy.loader": {"kvmpy.x86"},         # loaders place images with x86.layout and write boot params
        "kvmpy.__main__": {"kvmpy.cli"},       # ``python -m kvmpy`` is the CLI
        "kvmpy.net": {"kvmpy.devices"},        # network backends carry the virtio-net device's frame limits
    },
    pure={"kvmpy.x86", "kvmpy.devices", "kvmpy.loader", "kvmpy.net"},
    pure_may_use={"kvmpy.errors", "kvmpy.kvm", "kvmpy.kvm.regs", "kvmpy.kvm.memory"},
    exempt={"kvmpy"},
    extensions={"kvmpy._native"},
    max_module_lines=500,                      # code lines: no blanks, comments or docstrings
    max_function_lines=60,
)

ALLOWED = {
    "up kvmpy.vmm.machine -> kvmpy.lifecycle.snapshot":
        "Machine.snapshot()/restore()/clone() are thin sugar (habit 1), imported inside those methods only",
    "up kvmpy.vmm.machine -> kvmpy.lifecycle.reset":
        "Machine.checkpoint() is thin sugar (habit 1) over lifecycle/reset.py, imported inside it only",
}

KNOWN_DEBTS: dict[str, str] = {}      # violations being fixed: key -> why (empty: none left)


def excused(v) -> bool:
    return not v.hard and (v.key in KNOWN_DEBTS or (v.key in ALLOWED and v.lazy))


@pytest.fixture(scope="module")
def found():
    return check(PACKAGE, LAYOUT)


def test_no_new_violations(found):
    """Every violation in kvmpy/ is either fixed or listed (with a reason) in an allowlist."""
    bad = [v for v in found if not excused(v)]
    if bad:
        pytest.fail(f"{len(bad)} architecture violation(s) (DESIGN.md, Layers; rules in tests/unit/archcheck.py):\n\n"
                    + "\n\n".join(map(str, bad)), pytrace=False)


def test_allowlists_do_not_rot(found):
    """An allowlist entry whose violation is gone must be deleted: the lists only shrink."""
    keys = {v.key for v in found if excused(v)}
    stale = sorted((set(KNOWN_DEBTS) | set(ALLOWED)) - keys)
    if stale:
        pytest.fail("no longer found (fixed, or no longer lazy): delete from KNOWN_DEBTS/ALLOWED:\n  "
                    + "\n  ".join(stale), pytrace=False)


def test_allowlists_are_explained():
    assert not set(KNOWN_DEBTS) & set(ALLOWED)
    assert all(reason.strip() for reason in [*KNOWN_DEBTS.values(), *ALLOWED.values()])


# --- the checker catches what it should: synthetic packages -----------------------------

TOY = Layout(
    floors=[("L0", {"pkg.base"}), ("L1", {"pkg.low"}), ("L2", {"pkg.mid", "pkg.side"}), ("L3", {"pkg.top"})],
    sideways={"pkg.side": {"pkg.mid"}},
    pure={"pkg.mid", "pkg.side"},
    pure_may_use={"pkg.base", "pkg.low.regs"},
    exempt={"pkg"},
    max_module_lines=12,
    max_function_lines=4,
)
BASE = {"__init__.py": "", "base.py": "", "low/__init__.py": "", "low/regs.py": "", "low/vcpu.py": "",
        "mid/__init__.py": "", "mid/a.py": "", "mid/b.py": "", "side.py": "", "top/__init__.py": "",
        "top/machine.py": ""}


def toy(tmp_path, **files):
    """Write pkg/ (BASE plus files, named mid_a= for mid/a.py, init= for __init__.py) and check it."""
    for rel, src in {**BASE, **{_path(k): v for k, v in files.items()}}.items():
        path = tmp_path / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(src)
    return {v.key: v for v in check(tmp_path / "pkg", TOY)}


def _path(name):
    return "__init__.py" if name == "init" else name.replace("_", "/", 1) + ".py"   # mid__util: mid/_util.py


def test_toy_clean_package_passes(tmp_path):
    assert toy(tmp_path, mid_a="from ..low.regs import Regs\nfrom . import b\n",
               side="from .mid import a\n", top_machine="from ..mid import a\nfrom ..low import vcpu\n") == {}


def test_cycle_through_submodule_imports_is_hard(tmp_path):
    found = toy(tmp_path, mid_a="from . import b\n", mid_b="from .a import x\n")
    assert found["cycle pkg.mid.a pkg.mid.b"].hard


def test_cycle_through_from_pkg_import_submodule(tmp_path):
    found = toy(tmp_path, mid_a="from ..mid import b\n", mid_b="import pkg.mid.a\n")
    assert "cycle pkg.mid.a pkg.mid.b" in found


def test_lazy_cycle_is_reported_but_not_hard(tmp_path):
    found = toy(tmp_path, mid_a="from . import b\n", mid_b="def f():\n    from . import a\n")
    v = found["cycle pkg.mid.a pkg.mid.b"]
    assert v.lazy and not v.hard


def test_type_checking_imports_make_no_cycle(tmp_path):
    found = toy(tmp_path, mid_a="from . import b\n",
                mid_b="from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import A\n")
    assert found == {}


def test_upward_and_sideways_imports(tmp_path):
    found = toy(tmp_path, low_vcpu="from ..top import machine\n", mid_a="from .. import side\n",
                top_machine="from ..low import vcpu\n")
    assert not found["up pkg.low.vcpu -> pkg.top.machine"].lazy
    assert "up pkg.mid.a -> pkg.side" in found                # side may import mid, not the reverse
    assert "cycle pkg.low.vcpu pkg.top.machine" in found


def test_lazy_upward_import_is_flagged_and_breaks_no_cycle(tmp_path):
    found = toy(tmp_path, low_vcpu="def snap():\n    from ..top.machine import M\n",
                top_machine="from ..low import vcpu\n")
    assert set(found) == {"up pkg.low.vcpu -> pkg.top.machine"}
    assert found["up pkg.low.vcpu -> pkg.top.machine"].lazy


def test_facade_names_resolve_to_their_modules(tmp_path):
    found = toy(tmp_path, init='_EXPORTS = {"Machine": "top.machine"}\n_SUBMODULES = {"vcpu": "low.vcpu"}\n',
                mid_a="from pkg import Machine\n", mid_b="import pkg\ndef f():\n    return pkg.vcpu\n")
    assert "up pkg.mid.a -> pkg.top.machine" in found
    assert "impure pkg.mid.b -> pkg.low.vcpu" in found


def test_pure_modules_use_only_the_pure_floor_below(tmp_path):
    found = toy(tmp_path, mid_a="from ..low.vcpu import Vcpu\n", mid_b="from ..low import regs\n",
                low_regs="from . import vcpu\n",
                side="try:\n    from .low import vcpu\nexcept ImportError:\n    vcpu = None\n")
    assert "impure pkg.mid.a -> pkg.low.vcpu" in found
    assert "impure pkg.mid.b ->* pkg.low.vcpu" in found       # through regs, at import time
    assert not [k for k in found if k.startswith("impure pkg.side")]   # optional import


def test_private_names(tmp_path):
    found = toy(tmp_path,
                mid_a="def _helper(): pass\nclass A:\n    def __init__(self):\n        self._x = 1\n"
                       "    def same(self, other):\n        return other._x + self._x\n",
                mid_b="from .a import _helper\nfrom . import a\nimport collections\n"
                       "def f(m, t):\n    a._helper()\n    m._x = 2\n    t._replace(y=1)\n"
                       "    getattr(m, '_y')\n    return super().__init__, m.__class__, collections._sys\n",
                side="class Mixin:\n    def f(self):\n        return self._elsewhere\n",
                top_machine="from ..mid import _util\n", mid__util="")
    assert {k for k in found if k.startswith("private")} == {
        "private pkg.mid.b imports pkg.mid.a._helper", "private pkg.mid.b reads pkg.mid.a._helper",
        "private pkg.mid.b uses ._x", "private pkg.mid.b uses ._y", "private pkg.side uses self._elsewhere",
        "private pkg.top.machine imports pkg.mid._util"}


def test_size_counts_code_lines_only(tmp_path):
    body = "    x = 1\n" * 3                                   # with the def line: 4, the budget
    ok = 'def f():\n    """Doc\n    string."""\n    # comment\n\n' + body
    assert toy(tmp_path, mid_a=ok) == {}
    found = toy(tmp_path, mid_a="def f():\n" + body + "    y = 2\n", mid_b="x = 1\n" * 13)
    assert set(found) == {"size pkg.mid.a:f", "size pkg.mid.b"}


def test_modules_outside_the_floors_are_reported(tmp_path):
    assert "unplaced pkg.fuzz" in toy(tmp_path, fuzz="")


def test_violation_says_where_what_why_and_how(tmp_path):
    v = toy(tmp_path, low_vcpu="from ..top import machine\n")["up pkg.low.vcpu -> pkg.top.machine"]
    text = str(v)
    assert text.startswith("pkg/low/vcpu.py:1: pkg.low.vcpu (L1) imports pkg.top.machine (L3)")
    assert "why: " in text and "fix: " in text
