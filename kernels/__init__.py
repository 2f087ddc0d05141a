"""mtp_kernels: optional accelerated kernels for mtp (installed from the repo's ``kernels/``).

Each kernel sits beside the pure-PyTorch reference it replaces (``mtp.ops`` / ``mtp.model``) and
is selected explicitly; nothing here is imported by ``mtp`` on the CPU path. Importing this
package needs Triton (``import triton``); running it needs a CUDA GPU.

- :class:`TritonMTP` wraps a ``DeepSeekV4MTP`` (released FP8/FP4 format) with the same
  ``forward`` / ``compute_logits`` and a sync-free ``decode_step``.
- :class:`DraftStepGraphs` captures ``decode_step`` in CUDA graphs per batch bucket.
"""

from .graph import DraftStepGraphs
from .model import TritonMTP

__all__ = ["DraftStepGraphs", "TritonMTP"]
