"""Build hooks that pyproject.toml cannot express.

* ``cffi_modules`` compiles kvmpy._native from csrc/ against <linux/kvm.h>.
* ``build_py`` also builds the bundled guests (``make -C guests``) into the
  package, so ``pip install .`` ships ready-to-run micro-VM images.
"""
import os
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithGuests(build_py):
    def run(self):
        super().run()
        out = os.path.abspath(os.path.join(self.build_lib, "kvmpy", "_guests"))
        os.makedirs(out, exist_ok=True)
        subprocess.run(["make", "-s", "-C", "guests", f"O={out}"], check=True)


setup(cffi_modules=["csrc/build.py:ffibuilder"], cmdclass={"build_py": BuildPyWithGuests})
