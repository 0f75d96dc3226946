"""Every Python block in docs/walkthrough.md runs as shown, chapter by chapter."""
import pathlib

import pytest

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "walkthrough.md"


def chapters(text: str) -> list[tuple[str, list[tuple[int, str]]]]:
    """(## heading, [(line number, code), ...]) for each chapter, in order; blocks before
    the first ## heading and chapters without ```python blocks are left out."""
    out: list[tuple[str, list[tuple[int, str]]]] = []
    heading, fence, start, body = None, None, 0, []
    for n, line in enumerate(text.splitlines(), 1):
        if fence is None:
            if line.startswith("## "):
                heading = line[3:].strip()
                out.append((heading, []))
            elif line.startswith("```"):
                fence, start, body = line[3:].strip(), n + 1, []
        elif line.startswith("```"):
            if fence == "python" and heading is not None:
                out[-1][1].append((start, "\n".join(body) + "\n"))
            fence = None
        else:
            body.append(line)
    assert fence is None, f"{DOC.name}: unclosed ``` fence"
    return [(h, blocks) for h, blocks in out if blocks]


CHAPTERS = chapters(DOC.read_text())


@pytest.mark.parametrize("blocks", [b for _, b in CHAPTERS], ids=[h for h, _ in CHAPTERS])
def test_walkthrough_chapter_runs(blocks):
    """A chapter's blocks run in order in one fresh namespace; their asserts check the results."""
    namespace = {"__name__": "walkthrough"}
    for start, code in blocks:
        # pad so tracebacks point at the line in the markdown file
        exec(compile("\n" * (start - 1) + code, str(DOC), "exec"), namespace)


def test_walkthrough_covers_first_ioctl_to_kernel():
    """The walkthrough has its eight chapters, each with runnable code."""
    assert len(CHAPTERS) == 8
    assert CHAPTERS[0][0].startswith("1.") and CHAPTERS[-1][0].startswith("8.")
