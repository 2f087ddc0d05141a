"""Held-out Python snippets for the tiny pair: from standard-library files the pair never saw
in training (package data, so every install measures on the same prompts)."""

from __future__ import annotations

import json
from importlib import resources

from .tokenizer import TOKENIZER


def heldout_snippets() -> list[dict]:
    """[{"file", "offset", "text"}]: each held-out file's snippet (see ``examples/tiny_pair``)."""
    path = resources.files("mtp.demo") / "data" / "heldout_prompts.json"
    return json.loads(path.read_text(encoding="utf-8"))["prompts"]


def heldout_prompts() -> list[list[int]]:
    """The snippets as token ids (``TOKENIZER.encode``).

    Example:
        >>> len(heldout_prompts()) >= 50
        True
    """
    return [TOKENIZER.encode(p["text"]) for p in heldout_snippets()]


__all__ = ["heldout_prompts", "heldout_snippets"]
