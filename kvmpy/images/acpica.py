"""ACPICA's ``iasl`` and ``acpiexec``, fetched into kvmpy's cache, to check kvmpy's ACPI tables.

The tests disassemble the tables kvmpy builds (``iasl -d``), compile the DSDT back and
load them into ACPICA's own interpreter (``acpiexec``): the same parser Linux uses. The
tools come from Debian's ``acpica-tools`` package, downloaded with ``apt-get download``
and unpacked here (nothing is installed), into ``$KVMPY_CACHE/debian/acpica-tools_VERSION``
like the kernel of :mod:`kvmpy.images.linuxkernel`. Command line::

    python -m kvmpy.images.acpica          # prints iasl=... and acpiexec=...
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from .linuxkernel import FetchError, fetch_package

PACKAGE = "acpica-tools"
TOOLS = ("iasl", "acpiexec")


@dataclass(frozen=True)
class AcpicaTools:
    """Paths of the two programs (they need only the C library)."""

    iasl: Path
    acpiexec: Path


def _outputs(members: dict[str, bytes], out: Path) -> None:
    for tool in TOOLS:
        data = members.get(f"usr/bin/{tool}")
        if data is None:
            raise FetchError(f"{PACKAGE} has no usr/bin/{tool}")
        (out / tool).write_bytes(data)
        (out / tool).chmod(0o755)


def fetch(cache: Path | None = None) -> AcpicaTools:
    """iasl and acpiexec from the cache, downloaded with apt on first use (FetchError if
    neither apt nor the cache has them)."""
    slot = fetch_package(PACKAGE, lambda p: p in {f"usr/bin/{t}" for t in TOOLS}, _outputs, cache)
    return AcpicaTools(slot / "iasl", slot / "acpiexec")


def main() -> int:
    try:
        tools = fetch()
    except FetchError as e:
        print(f"kvmpy.images.acpica: {e}", file=sys.stderr)
        return 1
    print(f"iasl={tools.iasl}\nacpiexec={tools.acpiexec}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
