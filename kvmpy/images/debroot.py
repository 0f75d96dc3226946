"""Debian's python3 for the root disk: Debian packages unpacked into the image's tree.

``kvmpy.images.rootfs.build(python=True)`` puts Debian's own interpreter in the image:
``python3.11-minimal`` (``/usr/bin/python3.11``), ``libpython3.11-minimal`` (the part of
the standard library the interpreter needs to start, plus os, re, subprocess, pathlib,
json's neighbours... but not json itself, which is in libpython3.11-stdlib) and the
shared libraries they link: ``libc6``, ``libexpat1``, ``zlib1g``, ``libssl3`` (the
packages' Depends, as ``apt-cache depends python3.11-minimal`` lists them).

Each package is fetched with ``apt-get download`` into kvmpy's cache (nothing is
installed on the host; kvmpy.images.linuxkernel.fetch_package) and its files and
symbolic links are kept there under ``tree/``, without documentation, manual pages,
locales and glibc's gconv modules (:func:`wanted`). :func:`install` copies the trees
into the image's staging directory, adds ``/usr/bin/python3``, and byte-compiles the
standard library with the building interpreter when it is a 3.11 too (the same byte-code
magic), unchecked-hash ``.pyc`` files, so the guest neither compiles at every start nor
needs the sources' times. Debian's glibc looks in ``/lib/x86_64-linux-gnu`` without an
``ld.so.cache``, so nothing needs ``ldconfig``.
"""
from __future__ import annotations

import compileall
import os
import py_compile
import shutil
import sys
from pathlib import Path

from . import linuxkernel

PYTHON_PACKAGES = ("python3.11-minimal", "libpython3.11-minimal", "libc6", "libexpat1", "zlib1g", "libssl3")
PYTHON_VERSION = (3, 11)
#: What no program in the guest needs (kept out of the cache and the image).
SKIP = ("usr/share/", "usr/lib/x86_64-linux-gnu/gconv/", "usr/lib/binfmt.d/", "usr/bin/python3.11-config")


def wanted(path: str) -> bool:
    """The package members kept: everything but documentation, locales and gconv modules."""
    return not path.startswith(SKIP)


def _safe(path: str) -> bool:
    parts = path.split("/")
    return bool(path) and not path.startswith("/") and ".." not in parts and "" not in parts


def _outputs(members: dict, out: Path) -> None:
    """A package's files and symbolic links under ``out/tree`` (fetch_package's ``outputs``)."""
    tree = out / "tree"
    tree.mkdir()
    for path in sorted(members):
        entry = members[path]
        if not _safe(path):
            raise linuxkernel.FetchError(f"package member {path!r} is not a relative path")
        dest = tree / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        if entry.link is not None:
            dest.symlink_to(entry.link)
        else:
            dest.write_bytes(entry.data)
            dest.chmod(entry.mode & 0o755)


def fetch(packages=PYTHON_PACKAGES, cache: Path | None = None, offline: bool = False) -> list[Path]:
    """The cache slot of each package (``NAME_VERSION/tree``), downloaded on first use. Offline
    (or without apt) the newest cached slot of each is used; FetchError if one is missing."""
    cache = Path(cache) if cache is not None else linuxkernel.cache_dir()
    if not offline:
        return linuxkernel.fetch_packages(packages, wanted, _outputs, cache, tree=True)
    slots = []
    for name in packages:
        found = sorted((cache / "debian").glob(f"{name}_*"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise linuxkernel.FetchError(f"{name} is not in the cache {cache}/debian; "
                                         "run 'python -m kvmpy.images.rootfs --python' once online")
        slots.append(found[-1])
    return slots


def bytecode_tag() -> str:
    """Whether this interpreter byte-compiles the image's standard library (part of the disk's key)."""
    return "pyc-unchecked" if sys.version_info[:2] == PYTHON_VERSION else "no-pyc"


def _inside(root: Path, path: Path) -> bool:
    real = os.path.realpath(path)
    return real == str(root) or real.startswith(str(root) + os.sep)


def install(slots: list[Path], stage: Path) -> None:
    """Copy the packages' trees into ``stage`` (links stay links; nothing is written through a
    link that leaves the stage), link ``usr/bin/python3``, byte-compile the standard library."""
    root = Path(os.path.realpath(stage))
    for slot in slots:
        tree = slot / "tree"
        for dirpath, dirnames, filenames in os.walk(tree):
            rel = Path(dirpath).relative_to(tree)
            for name in sorted(dirnames + filenames):
                src, dest = Path(dirpath, name), stage / rel / name
                if not _inside(root, dest.parent):
                    raise linuxkernel.FetchError(f"{slot.name}: {rel / name} would be written outside the image")
                if src.is_symlink():
                    if not dest.exists() and not dest.is_symlink():
                        dest.symlink_to(os.readlink(src))
                elif src.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                else:
                    dest.unlink(missing_ok=True)
                    shutil.copy2(src, dest)
    python3 = stage / "usr/bin/python3"
    if (stage / "usr/bin/python3.11").exists() and not python3.exists() and not python3.is_symlink():
        python3.symlink_to("python3.11")
    if bytecode_tag() == "pyc-unchecked" and (stage / "usr/lib/python3.11").is_dir():
        compileall.compile_dir(stage / "usr/lib/python3.11", quiet=2, stripdir=str(stage), prependdir="/",
                               workers=0, invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
