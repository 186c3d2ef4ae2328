"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.M | re.S)


def test_readme_has_python_examples() -> None:
    assert BLOCKS


@pytest.mark.parametrize("source", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_example_runs(source: str) -> None:
    exec(compile(source, str(README), "exec"), {"__name__": "readme_example"})


def test_ci_runs_the_readme_test_command_in_a_fresh_clone() -> None:
    """CI (`.ci/run`) must run exactly the command the README gives for all tests, and run it
    in a fresh clone (as a new user would), so no test can depend on a file outside the
    repository."""
    text = README.read_text(encoding="utf-8")
    section = text.split("Run all tests", 1)[1]
    command = re.search(r"^```bash\n(.*?)\n```", section, re.M | re.S)
    assert command is not None
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    lines = ci.splitlines()
    assert command.group(1).strip() in lines
    before = lines[: lines.index(command.group(1).strip())]
    assert any(re.match(r"git (-c \S+ )*clone ", line) for line in before)
