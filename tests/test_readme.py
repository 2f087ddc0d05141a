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


def test_readme_says_what_the_commands_install_and_the_cpu_only_option():
    """From PyPI on Linux, torch==2.13.0 is the CUDA build (~5.5 GB): the README must not call
    it the CPU build, and shows the one option a CPU-only user adds, outside the two commands
    (which must keep working as they are: CI runs the test command verbatim)."""
    first_screen = README.split("<!-- snippet -->")[0]
    assert "CPU build of torch" not in first_screen
    assert "is the CUDA build" in first_screen
    option = "--extra-index-url https://download.pytorch.org/whl/cpu"
    assert f"`{option}`" in " ".join(first_screen.split())
    for marker in ("<!-- demo-command -->", "<!-- test-command -->"):
        command = block_after(marker)
        assert "download.pytorch.org" not in command and "pip install -q torch==2.13.0" in command
