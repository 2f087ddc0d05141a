"""The ops the tiny pair is trained with: the reference's math, arranged for a training batch.

A training batch is B windows of S tokens each, every window a sequence at positions 0..S-1,
no cache, plain (unquantised) weights. :class:`TrainingOps` is :class:`mtp.ops.ReferenceOps`
with the two units that are slow on such a batch written for it, with no host synchronisation
(so a GPU step runs without stalls):

- ``attend``: each row gathers its W keys in the reference (a [T, W, Dh] copy, 128 x the
  keys); here each window attends densely ([B, H, S, S] scores) under the sliding-window band
  ``0 <= i - j < W``, with the sink as one more logit whose value is zero;
- ``routed``: the reference loops over the chosen experts (a ``.tolist()`` and a ``nonzero``
  per expert); here every row goes through all E experts as two products over the stacked
  weights (``u @ w13`` as [T, E*2I], ``a @ w2`` over [E*I]), the E - K unchosen experts
  weighted by zero. That is E / K times the experts' arithmetic, which at E = 8, K = 2 and
  this width costs less than the loop's launches and synchronisations.

Every other unit (hyper-connections, norms, RoPE, routing, the shared expert, the head) is the
reference's own. ``tests/test_training_ops.py`` checks values and gradients against the
reference in float64.

Shape legend: B windows, S tokens per window, T = B*S rows, H heads, Dh head dim, W window,
E experts, K experts per token, I expert width, D hidden.
"""

from __future__ import annotations

import torch

from .. import ops
from ..ops import ReferenceOps, apply_rope, swiglu, wide


class TrainingOps(ReferenceOps):
    """Reference ops for B windows of ``seq_len`` rows each (positions 0..S-1, no cache).

    Example:
        >>> import torch
        >>> from mtp.demo.training_ops import TrainingOps
        >>> from mtp.model import StepContext
        >>> from mtp.demo.toy_target import ToyTarget
        >>> target = ToyTarget.random(seed=0)
        >>> tokens = torch.randint(0, 256, (2, 8))                     # B = 2 windows, S = 8
        >>> positions = torch.arange(8).repeat(2)
        >>> slots = torch.arange(2).repeat_interleave(8)
        >>> fast, _ = target.rows(tokens.flatten(), positions, slots, ops_=TrainingOps(8))
        >>> ref, _ = target.rows(tokens.flatten(), positions, slots)
        >>> torch.allclose(fast, ref, atol=1e-4)
        True
    """

    name = "training"
    needs_window_index = False  # attend() needs no per-row key index (ToyTarget.rows)

    def __init__(self, seq_len: int):
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len: expected an int >= 1, got {seq_len!r}")
        self.seq_len = seq_len

    def attend(self, q, kv, sink, cos, sin, positions, *, window: int, cache, cache_layer: int,
               index, seq_slots):
        """q [T, H, Dh], kv [T, Dh] of B windows of S rows -> [T, H, Dh] in q's dtype."""
        if cache is not None:
            raise ValueError("TrainingOps.attend: training batches have no cache; use "
                             "mtp.ops.REFERENCE for cached calls")
        t, h, dh = q.shape
        s = self.seq_len
        if t % s:
            raise ValueError(f"TrainingOps: {t} rows are not whole windows of seq_len={s}")
        qb = wide(q).view(t // s, s, h, dh)  # [T, H, Dh] -> [B, S, H, Dh]
        kb = wide(kv).view(t // s, s, dh)  # [T, Dh] -> [B, S, Dh]
        scores = torch.einsum("bihd,bjd->bhij", qb, kb) * dh ** -0.5  # [B, H, S, S]
        i = torch.arange(s, device=q.device)
        lag = i[:, None] - i[None, :]  # [S, S]: row i, key j
        scores = scores.masked_fill(~((lag >= 0) & (lag < window)), float("-inf"))
        sink_col = sink.to(scores.dtype).view(1, h, 1, 1).expand(t // s, h, s, 1)
        p = torch.softmax(torch.cat((scores, sink_col), dim=-1), dim=-1)[..., :-1]
        o = torch.einsum("bhij,bjd->bihd", p.to(kb.dtype), kb).reshape(t, h, dh)
        return apply_rope(o.to(q.dtype), cos, sin, inverse=True)

    def routed(self, u, idx, w, experts, limit: float, act_quant: bool):
        """u [T, D], idx / w [T, K] -> the routed experts' float32 sum [T, D] (plain weights,
        one process: what training holds)."""
        if experts.storage != "plain" or experts.first != 0:
            raise ValueError("TrainingOps.routed: expected plain, unsharded experts (a "
                             "training module); use mtp.ops.REFERENCE otherwise")
        e, two_i, d = experts.w13_weight.shape
        i = two_i // 2
        gates = torch.zeros(u.shape[0], e, dtype=w.dtype, device=u.device).scatter(1, idx, w)
        h = ops.matmul(u, experts.w13_weight.reshape(e * two_i, d), False)  # [T, E*2I]
        g, v = h.view(-1, e, two_i).split(i, dim=-1)  # [T, E, 2I] -> w1 rows, w3 rows
        a = (gates[..., None] * swiglu(g, v, limit)).to(u.dtype)  # [T, E, I]
        w2 = experts.w2_weight.permute(1, 0, 2).reshape(d, e * i)  # [E, D, I] -> [D, E*I]
        return wide(ops.matmul(a.reshape(-1, e * i), w2, False))


__all__ = ["TrainingOps"]
