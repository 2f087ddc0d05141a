"""``mtp demo``: what the command line shows, and the small models it shows it with.

Not the library: an engine never imports this. It is a subpackage (installed with ``mtp``)
because the ``mtp demo`` command needs it on every install.

- :mod:`mtp.demo.toy_target`: :class:`ToyTarget`, a small V4-shaped target (the library's own
  blocks) with a KV cache, implementing the target protocol of ``mtp.speculative``.
- :mod:`mtp.demo.checkpoint_demo`: the embedded random checkpoint, loaded and drafting.
"""

from __future__ import annotations

from .checkpoint_demo import run, write_tiny_checkpoint
from .toy_target import ToyTarget, matching_mtp

__all__ = ["ToyTarget", "matching_mtp", "run", "write_tiny_checkpoint"]
