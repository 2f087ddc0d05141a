"""Run a page's ```python blocks as a reader would: in order, in one namespace, stdout captured
(shared by the tests that check docs/ and README pages run as written)."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def run_python_blocks(page: pathlib.Path, blocks: list[str]) -> tuple[dict, str]:
    """Execute ``blocks`` (taken from ``page``) in one namespace; returns it and what they
    printed. Tracebacks name the page and the block number."""
    namespace: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for i, block in enumerate(blocks):
            exec(compile(block, f"docs/{page.name} block {i + 1}", "exec"), namespace)
    return namespace, printed.getvalue()
