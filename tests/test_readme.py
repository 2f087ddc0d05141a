"""The README's first screen is the contract: its snippet runs and prints what it says, and the
CI script runs the README's test command."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def block_after(marker: str) -> str:
    match = re.search(re.escape(marker) + r"\s*```[a-z]*\n(.*?)```", README, re.S)
    assert match, f"README.md has no code block after {marker}"
    return match.group(1)


def test_readme_snippet_prints_its_stated_output():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block_after("<!-- snippet -->"), "README.md", "exec"), {})
    assert out.getvalue() == block_after("<!-- snippet-output -->")


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in ci
    command = block_after("<!-- test-command -->")
    assert "pip install" in command and "pytest" in command
