"""The MTP layer's math as pure functions of tensors (the reference path).

Shape legend: T rows (tokens), M residual streams (hc_mult), D hidden, H heads, Dh head dim,
R RoPE dims (the LAST R of each head), W window, E experts, K experts per token.

Every function follows ``spec/architecture.md`` literally; accelerated kernels (``kernels/``)
must match these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def wide(x: torch.Tensor) -> torch.Tensor:
    """x in its accumulation precision: float32, or float64 when the model computes in float64
    (the verification mode that runs this very code against the float64 spec reference)."""
    return x if x.dtype == torch.float64 else x.float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """weight * x * rsqrt(mean(x^2) + eps) over the last dim, in float32, cast back to x's dtype."""
    xf = wide(x)
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = weight.to(y.dtype) * y
    return y.to(x.dtype)


# ---- RoPE ------------------------------------------------------------------------------------
def rope_cos_sin(positions: torch.Tensor, rope_dim: int, theta: float,
                 dtype: torch.dtype = torch.float32):
    """cos, sin of p * theta_i for theta_i = theta^(-2i/R): each [T, R/2] in ``dtype``.

    Angles are formed in float64 (the reference forms them in float32, which is off by up to
    p * 2^-24 rad; both agree to float32 rounding at the positions we test)."""
    i = torch.arange(0, rope_dim, 2, dtype=torch.float64, device=positions.device)
    inv_freq = theta ** (-i / rope_dim)  # [R/2]
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # [T, R/2]
    return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               inverse: bool = False) -> torch.Tensor:
    """Rotate the last R dims of x [T, ..., Dh] as R/2 interleaved pairs (z[2i], z[2i+1]) read as
    complex numbers, by exp(+-1j * angle). Returns a new tensor of x's dtype."""
    rope_dim = 2 * cos.shape[-1]
    nope, rot = x[..., :-rope_dim], wide(x[..., -rope_dim:])
    pairs = rot.unflatten(-1, (-1, 2))  # [T, ..., R/2, 2]
    re, im = pairs[..., 0], pairs[..., 1]
    # broadcast [T, R/2] over the middle dims of x
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    c, s = cos.view(shape), sin.view(shape)
    if inverse:
        s = -s
    out = torch.stack((re * c - im * s, re * s + im * c), dim=-1).flatten(-2)
    return torch.cat((nope, out.to(x.dtype)), dim=-1)


# ---- hyper-connections -----------------------------------------------------------------------
def hc_mixes(x: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """(flatten(x) @ fn^T) * rsqrt(mean(flatten(x)^2) + eps): [T, M, D] -> [T, fn.rows] fp32."""
    z = wide(x.flatten(1))  # [T, M*D]
    return F.linear(z, fn.to(z.dtype)) * torch.rsqrt(z.square().mean(-1, keepdim=True) + eps)


def sinkhorn(c: torch.Tensor, iters: int, hc_eps: float) -> torch.Tensor:
    """Row softmax, then alternate column / row normalisation: [T, M, M] -> [T, M, M]."""
    c = torch.softmax(c, dim=-1) + hc_eps
    c = c / (c.sum(dim=-2, keepdim=True) + hc_eps)  # columns
    for _ in range(iters - 1):
        c = c / (c.sum(dim=-1, keepdim=True) + hc_eps)  # rows
        c = c / (c.sum(dim=-2, keepdim=True) + hc_eps)  # columns
    return c


def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
           iters: int, hc_eps: float, eps: float):
    """Collapse M streams into one block input. x [T, M, D] ->
    (y [T, D] in x's dtype, post [T, M] fp32, comb [T, M, M] fp32)."""
    m = x.shape[1]
    mixes = hc_mixes(x, fn, eps)  # [T, (2+M)M]
    pre = torch.sigmoid(mixes[:, :m] * scale[0] + base[:m]) + hc_eps
    post = 2 * torch.sigmoid(mixes[:, m:2 * m] * scale[1] + base[m:2 * m])
    comb = mixes[:, 2 * m:].view(-1, m, m) * scale[2] + base[2 * m:].view(m, m)
    comb = sinkhorn(comb, iters, hc_eps)
    y = (pre.unsqueeze(-1) * wide(x)).sum(dim=1)
    return y.to(x.dtype), post, comb


def hc_post(a: torch.Tensor, residual: torch.Tensor, post: torch.Tensor,
            comb: torch.Tensor) -> torch.Tensor:
    """out[k] = post[k] * a + sum_j comb[j, k] * residual[j]  (comb^T @ residual).
    a [T, D], residual [T, M, D] -> [T, M, D] in a's dtype."""
    mixed = torch.einsum("tjk,tjd->tkd", comb, wide(residual))
    return (post.unsqueeze(-1) * wide(a).unsqueeze(1) + mixed).to(a.dtype)


def hc_head(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
            hc_eps: float, eps: float) -> torch.Tensor:
    """Final collapse before the norm and head: x [T, M, D] -> [T, D] in x's dtype."""
    pre = torch.sigmoid(hc_mixes(x, fn, eps) * scale + base) + hc_eps  # [T, M]
    return (pre.unsqueeze(-1) * wide(x)).sum(dim=1).to(x.dtype)


# ---- attention core --------------------------------------------------------------------------
def sink_attention(q: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor,
                   sink: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Multi-query attention of each row over its own W gathered keys, with a per-head sink
    logit whose value vector is zero (it only enlarges the denominator).

    q [T, H, Dh], keys [T, W, Dh] (one KV head: key and value), valid [T, W] bool,
    sink [H] -> o [T, H, Dh] float32. Softmax over [scores, sink] then dropping the sink column
    is the spec's formula, and stays finite however large the sink is.
    """
    kf = wide(keys)
    s = torch.einsum("thd,twd->thw", wide(q), kf) * softmax_scale  # [T, H, W]
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    sink_col = sink.to(s.dtype).view(1, -1, 1).expand(s.shape[0], -1, 1)  # [T, H, 1]
    p = torch.softmax(torch.cat((s, sink_col), dim=-1), dim=-1)[..., :-1]
    return torch.einsum("thw,twd->thd", p, kf)


# ---- MoE routing -----------------------------------------------------------------------------
def route(u: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor | None,
          top_k: int, scoring_func: str, routed_scaling_factor: float):
    """Pick K experts per row. u [T, D] -> (idx [T, K] int64, weights [T, K] float32).
    The bias only steers the choice; the weights come from the unbiased scores."""
    uf = wide(u)
    logits = F.linear(uf, gate_weight.to(uf.dtype))  # [T, E]
    if scoring_func == "softmax":
        scores = logits.softmax(dim=-1)
    elif scoring_func == "sigmoid":
        scores = logits.sigmoid()
    else:  # sqrtsoftplus
        scores = F.softplus(logits).sqrt()
    choice = scores if gate_bias is None else scores + gate_bias.to(scores.dtype)
    idx = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, idx)
    if scoring_func != "softmax":
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return idx, weights * routed_scaling_factor


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(clamp(g, max=limit)) * clamp(v, -limit, limit) in float32 (limit 0: no clamp)."""
    g, v = wide(gate), wide(up)
    if limit > 0:
        v = v.clamp(-limit, limit)
        g = g.clamp(max=limit)
    return F.silu(g) * v
