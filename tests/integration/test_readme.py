"""Every Python example in README.md runs as shown."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code):
    """The README's example runs without error (its own asserts check the results)."""
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})


def test_readme_has_examples():
    """The README shows the library, a Python device and the low level."""
    assert len(BLOCKS) >= 3
