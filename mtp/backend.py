"""Choosing the ops that run a module's forward: ``"reference"``, ``"triton"`` or ``"auto"``.

The reference ops (:class:`mtp.ops.ReferenceOps`) run anywhere. The triton ops
(``mtp_kernels.TritonOps``, the repo's ``kernels/``) need a CUDA device, Triton, the released
weight format and a bfloat16 or float32 compute dtype; ``"auto"`` takes them where all of that
holds and the reference elsewhere. The choice is explicit data on the module, never guessed
from names; Triton is imported only when a CUDA module asks for it.
"""

from __future__ import annotations

import os
from typing import Any

from .ops import REFERENCE

CHOICES = ("reference", "triton", "auto")


def check_choice(value: Any) -> None:
    """Refuse what is neither a known name nor an ops object."""
    if isinstance(value, str):
        if value not in CHOICES:
            raise ValueError(f"backend: expected one of {CHOICES} or an ops object, got "
                             f"{value!r}")
    elif not callable(getattr(value, "hc_pre_norm", None)):
        raise TypeError(f"backend: expected one of {CHOICES} or an ops object (like "
                        f"mtp.ops.ReferenceOps), got {type(value).__name__}")


def resolve(choice: Any, model) -> Any:
    """The ops object for ``model`` as it is now (its device, format and dtype)."""
    if not isinstance(choice, str):
        return choice
    if choice == "reference":
        return REFERENCE
    device = model.model.embed_tokens.weight.device
    interpret = bool(os.environ.get("TRITON_INTERPRET"))
    if choice == "auto" and device.type != "cuda":
        return REFERENCE  # nothing to import: the CPU path stays free of Triton
    try:
        from mtp_kernels import TritonOps
    except ImportError as exc:
        if choice == "auto":
            return REFERENCE
        raise RuntimeError(f"backend='triton': the mtp_kernels package cannot be imported "
                           f"({exc}); it is the repo's kernels/ folder and needs Triton") from exc
    why = TritonOps.unsupported(model, interpret=interpret)
    if why is None:
        return TritonOps(model)
    if choice == "auto":
        return REFERENCE
    raise ValueError(f"backend='triton' cannot run this model: {why}; use backend='reference'")


__all__ = ["CHOICES", "check_choice", "resolve"]
