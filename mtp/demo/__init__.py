"""``mtp demo``: what the command line shows, and the small models it shows it with.

Not the library: an engine never imports this. It is a subpackage (installed with ``mtp``)
because the ``mtp demo`` command needs it on every install.

- :mod:`mtp.demo.toy_target`: :class:`ToyTarget`, a small V4-shaped target (the library's own
  blocks) with a KV cache, implementing the target protocol of ``mtp.speculative``.
- :mod:`mtp.demo.pair`: :func:`load_tiny_pair`, the trained tiny pair shipped in the release
  format (package data), and how it is written and loaded.
- :mod:`mtp.demo.pair_demo`: :func:`run_pair`, what ``mtp demo`` prints.
- :mod:`mtp.demo.tokenizer`: :data:`TOKENIZER`, the pair's byte tokenizer.
- :mod:`mtp.demo.checkpoint_demo`: the embedded random checkpoint, loaded and drafting.
"""

from __future__ import annotations

from .checkpoint_demo import run, write_tiny_checkpoint
from .pair import load_tiny_pair
from .pair_demo import run_pair
from .tokenizer import TOKENIZER
from .toy_target import ToyTarget, matching_mtp

__all__ = ["TOKENIZER", "ToyTarget", "load_tiny_pair", "matching_mtp", "run", "run_pair",
           "write_tiny_checkpoint"]
