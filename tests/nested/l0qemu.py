"""The QEMU that runs L1: Debian's newer one from bookworm-backports, unpacked into the cache.

QEMU 7.2 (bookworm's own) emulates AMD SVM well enough for kvm_amd to load in L1, but its
nested SVM now and then corrupts L1's kernel while an L2 runs (docs/host-notes.md: "stack
guard page was hit" in exc_page_fault, then "corrupted stack end detected inside
scheduler"). bookworm-backports carries a newer QEMU built for the same system, for
``testbed.py --qemu backports``; L1 died under it too (docs/host-notes.md), so it is not the
default.

Nothing is installed: apt-get reads a private source list and package index under the
cache (``Dir::State::Lists``), ``apt-get download`` fetches the three packages, and
``dpkg -x`` unpacks them into ``<cache>/qemu-l0/<version>/``. The binary needs only
libraries bookworm's own ``qemu-system-x86`` already pulls in; its firmware comes from
the unpacked ``usr/share/qemu`` and ``usr/share/seabios`` (testbed.l0_qemu passes ``-L``).

    python tests/nested/l0qemu.py            # fetch (cached) and print the binary's path
"""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SUITE = "bookworm-backports"
PACKAGES = ("qemu-system-x86", "qemu-system-data", "seabios")
MIRROR = os.environ.get("KVMPY_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BINARY = "usr/bin/qemu-system-x86_64"


class FetchError(Exception):
    """apt could not fetch or unpack the backports QEMU; the message says what failed."""


def _apt(state: Path, tool: str = "apt-get") -> list[str]:
    """apt-get (or apt-cache) with a private source list and index: the system's apt state is
    not touched."""
    return [tool, "-qq", "-o", f"Dir::Etc::SourceList={state / 'sources.list'}",
            "-o", "Dir::Etc::SourceParts=/nonexistent", "-o", f"Dir::State::Lists={state / 'lists'}",
            "-o", f"Dir::Cache={state / 'cache'}", "-o", "APT::Sandbox::User=root"]


def _run(argv: list[str], cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FetchError(f"{argv[0]}: {e}") from None
    if proc.returncode != 0:
        raise FetchError(f"{' '.join(argv[:2])} ... failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def _version(state: Path) -> str:
    out = _run([*_apt(state, "apt-cache"), "policy", "qemu-system-x86"])
    for line in out.splitlines():
        if line.strip().startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
            if version and version != "(none)":
                return version
    raise FetchError(f"{SUITE} offers no qemu-system-x86 (apt-cache policy said: {out.strip()[-300:]})")


def fetch(cache: Path, offline: bool = False) -> Path:
    """The backports QEMU binary, fetched and unpacked on first use; the newest cached one
    when ``offline``."""
    root = cache / "qemu-l0"
    if offline:
        found = sorted(root.glob(f"*/{BINARY}"))
        if not found:
            raise FetchError(f"no QEMU from {SUITE} in {root}; run once with the network")
        return found[-1]
    state = root / ".apt"
    for d in (state / "lists" / "partial", state / "cache" / "archives" / "partial"):
        d.mkdir(parents=True, exist_ok=True)
    (state / "sources.list").write_text(f"deb {MIRROR} {SUITE} main\n")
    apt = _apt(state)
    _run([*apt, "update"])
    version = _version(state)
    slot = root / version.replace(":", "%3a")
    if (slot / BINARY).is_file():
        return slot / BINARY
    with tempfile.TemporaryDirectory(dir=root, prefix=".unpack-") as tmp:
        tmp = Path(tmp)
        _run([*apt, "download", *(f"{p}/{SUITE}" for p in PACKAGES)], cwd=tmp)
        debs = sorted(tmp.glob("*.deb"))
        if len(debs) != len(PACKAGES):
            raise FetchError(f"apt-get download left {[d.name for d in debs]}, not {len(PACKAGES)} packages")
        for deb in debs:
            _run(["dpkg", "-x", str(deb), str(tmp / "root")])
        if not (tmp / "root" / BINARY).is_file():
            raise FetchError(f"the {SUITE} packages hold no {BINARY}")
        os.replace(tmp / "root", slot)
    return slot / BINARY


if __name__ == "__main__":
    cache = Path(os.environ.get("KVMPY_CACHE", Path.home() / ".cache" / "kvmpy"))
    try:
        print(fetch(cache, offline="--offline" in sys.argv[1:]))
    except FetchError as e:
        sys.exit(f"l0qemu: {e}")
