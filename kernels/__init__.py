"""mtp_kernels: optional accelerated kernels for mtp (installed from the repo's ``kernels/``).

Each kernel computes one of ``mtp.ops``' functions faster; :class:`TritonOps` supplies them as
the module's ops (``DeepSeekV4MTP(..., backend="triton")``, or ``"auto"`` on CUDA in the
released format), so the forward itself stays the one in ``mtp/model.py``. Nothing here is
imported by ``mtp`` on the CPU path. Importing this package needs Triton (``import triton``);
running it needs a CUDA GPU.

- :class:`TritonOps`: the module's ops on the kernels (options: expert and head kernels).
- :class:`DraftStepGraphs` captures the module's ``decode_step`` in CUDA graphs per batch
  bucket.
- :class:`ProposeGraphs` captures a whole ``Drafter.propose`` call (real rows, draft steps,
  argmaxes or draws, device-side checks) per bucket, lazily.
- :class:`TritonMTP`: deprecated view of a module with these ops (one release).
"""

from .backend import MoEPairs, TritonMTP, TritonOps
from .graph import DraftStepGraphs
from .propose_graph import ProposeGraphs

__all__ = ["DraftStepGraphs", "MoEPairs", "ProposeGraphs", "TritonMTP", "TritonOps"]
