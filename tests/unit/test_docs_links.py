"""Every doc that README.md, the docs, the benchmarks' README or the source cites exists.

A reference is ``docs/NAME.md`` written anywhere in those files (also ``../docs/NAME.md``),
a Markdown link ``[text](NAME.md)`` in a Markdown file (resolved from that file's folder),
or a name listed on the ``docs/`` line of README.md's layout block. Only ``.md`` names
count, so QEMU's ``docs/specs/fw_cfg.rst`` or Xen's ``docs/misc/pvh.pandoc`` cited in
comments are not mistaken for ours.
"""
import re
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

SOURCE_DIRS = ("kvmpy", "csrc", "guests", "tests", "benchmarks", "docs")
SOURCE_SUFFIXES = {".py", ".c", ".h", ".S", ".md"}
SKIP_DIRS = {"__pycache__", "_guests", ".git", "build"}

# Cited but not written yet: these cases xfail (not strict, so they pass once the file lands;
# then drop the entry so that losing the file again is caught).
PENDING: dict[str, str] = {}          # docs cited before they are written: name -> why (keep empty)

DOCS_PATH = re.compile(r"(?<![\w.-])(?:\.\./)*docs/((?:[\w-]+/)*[\w.-]+\.md)\b")
MD_LINK = re.compile(r"\]\(([^)\s#:]+\.md)(?:#[^)\s]*)?\)")
MD_NAME = re.compile(r"\b([\w-]+\.md)\b")


def _sources() -> list[Path]:
    files = [ROOT / "README.md"]
    for d in SOURCE_DIRS:
        for p in sorted((ROOT / d).rglob("*")):
            if (p.is_file() and p.suffix in SOURCE_SUFFIXES and p != Path(__file__).resolve()
                    and not SKIP_DIRS & set(p.relative_to(ROOT).parts)):
                files.append(p)
    return files


def _readme_layout_docs(text: str) -> list[str]:
    """The names on README's layout line for docs/ and its indented continuation lines."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("docs/ ")), None)
    if start is None:
        return []
    block = [lines[start][len("docs/"):]]
    for ln in lines[start + 1:]:
        if not ln.startswith(" ") or not ln.strip():
            break
        block.append(ln)
    return MD_NAME.findall(" ".join(block))


def references(files: list[Path]) -> dict[Path, list[str]]:
    """Referenced doc path (absolute) -> ["file:line", ...] of every place that cites it."""
    refs: dict[Path, list[str]] = defaultdict(list)
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        where = f.relative_to(ROOT)
        for n, line in enumerate(text.splitlines(), 1):
            cited = {(DOCS / name).resolve() for name in DOCS_PATH.findall(line)}
            if f.suffix == ".md":
                cited |= {(f.parent / target).resolve() for target in MD_LINK.findall(line)}
            for path in cited:
                refs[path].append(f"{where}:{n}")
        if f == ROOT / "README.md":
            for name in _readme_layout_docs(text):
                refs[(DOCS / name).resolve()].append(f"{where}: layout block")
    return refs


REFS = references(_sources())


def _cases():
    for path in sorted(REFS):
        rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        marks = ()
        if path.parent == DOCS and path.name in PENDING:
            marks = pytest.mark.xfail(reason=PENDING[path.name], strict=False)
        yield pytest.param(path, id=str(rel), marks=marks)


def test_the_scan_finds_the_references_we_know_of():
    """Guards the scanner itself: these citations exist today and must be seen."""
    cited = {p.relative_to(ROOT).as_posix() for p in REFS if p.is_relative_to(ROOT)}
    assert {"docs/host-notes.md", "docs/walkthrough.md", "docs/snapshots.md", "docs/linux.md",
            "docs/CONTRACTS.md", "docs/virtio.md", "docs/devices.md"} <= cited
    assert any(w.startswith("kvmpy/") for w in REFS[(DOCS / "host-notes.md").resolve()])
    assert any(w.startswith("README.md") for w in REFS[(DOCS / "host-notes.md").resolve()])


@pytest.mark.parametrize("path", list(_cases()))
def test_referenced_doc_exists(path):
    assert path.is_file(), f"{path.relative_to(ROOT)} is cited but missing: " + ", ".join(REFS[path])


def test_a_missing_doc_is_caught(tmp_path, monkeypatch):
    """The check is real: a citation of a doc that is not there is reported as missing."""
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    monkeypatch.setitem(globals(), "DOCS", tmp_path / "docs")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "host-notes.md").write_text("# notes\n")
    src = tmp_path / "mod.py"
    src.write_text('"""See docs/no-such-page.md and ../docs/host-notes.md, not docs/specs/fw_cfg.rst."""\n')
    page = tmp_path / "docs" / "page.md"
    page.write_text("[gone](also-gone.md) [here](host-notes.md#found-since) [web](https://x.org/a.md)\n")
    refs = references([src, page])
    assert {p.name: p.is_file() for p in refs} == {"no-such-page.md": False, "host-notes.md": True,
                                                  "also-gone.md": False}
    assert refs[tmp_path / "docs" / "no-such-page.md"] == ["mod.py:1"]
