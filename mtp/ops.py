"""The MTP layer's math as pure functions of tensors, and the module's ops (the reference
backend).

Two levels:

- the math (:func:`rms_norm`, :func:`apply_rope`, :func:`hc_pre`, :func:`hc_post`,
  :func:`sink_attention`, :func:`route`, :func:`swiglu`, ...), each a literal transcription of
  the model's definition;
- :class:`ReferenceOps`: the units the module's dataflow (``mtp/model.py``) is written in: the
  layer's input norms, the FP8 products, the hyper-connection pre-mix with its norm, attention
  prep (RoPE table, q/kv norms, the KV's FP8 simulation), the attention with its cache write,
  the grouped ``wo_a``, the MoE, the head. A backend (``mtp_kernels.TritonOps``) supplies faster
  versions of the same methods with the same signatures; the op tests run against every
  backend. Where a backend fuses across two ops it passes its own intermediate between them
  (the ``partials`` / ``u_rounded`` / ``rounded`` arguments, an ``embed_norms`` result only
  its ``input_proj`` reads, a MoE result only its ``hc_post`` reads), told by a ``proj``
  argument which product an op's output feeds: the reference ignores those hints and
  returns None for them.

Shape legend: T rows (tokens), M residual streams (hc_mult), D hidden, H heads, Dh head dim,
R RoPE dims (the LAST R of each head), W window, E experts, K experts per token, Q q_lora_rank,
G o_groups, O o_lora_rank, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from .cache import window_index
from .config import FP8_BLOCK, KV_FP8_BLOCK
from .quant import dequantize, fp8_simulate

ATTN_CHUNK = 256  # rows per attention chunk: bounds the gathered keys to 256 x W x Dh.


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
def rope_inv_freq(rope_dim: int, theta: float, device=None) -> torch.Tensor:
    """theta_i = theta^(-2i/R) for i < R/2, float64 [R/2] (derived once per model and device)."""
    i = torch.arange(0, rope_dim, 2, dtype=torch.float64, device=device)
    return theta ** (-i / rope_dim)


def rope_table(positions: torch.Tensor, inv_freq: torch.Tensor,
               dtype: torch.dtype = torch.float32):
    """cos, sin of p * theta_i: each [T, R/2] in ``dtype``, the angles formed in float64 (the
    reference forms them in float32, which is off by up to p * 2^-24 rad; both agree to float32
    rounding at the positions we test)."""
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # [T, R/2]
    return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)


def rope_cos_sin(positions: torch.Tensor, rope_dim: int, theta: float,
                 dtype: torch.dtype = torch.float32):
    """cos, sin of p * theta_i for theta_i = theta^(-2i/R): each [T, R/2] in ``dtype``."""
    return rope_table(positions, rope_inv_freq(rope_dim, theta, positions.device), dtype)


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


# ---- products ----------------------------------------------------------------------------------
def matmul(x: torch.Tensor, weight: torch.Tensor, round_input: bool,
           wide_out: bool = False) -> torch.Tensor:
    """x @ weight^T with float32 accumulation, result in x's dtype (``wide_out``: left in
    float32, e.g. a tensor-parallel partial sum); ``round_input``: x is first FP8-rounded in
    blocks of 128 (the reference's ``act_quant`` before an FP8/FP4 product)."""
    if round_input:
        x = fp8_simulate(x, FP8_BLOCK)
    xf = wide(x)
    y = F.linear(xf, weight.to(xf.dtype))
    return y if wide_out else y.to(x.dtype)


def rounds_input(storage: str, act_quant: bool) -> bool:
    """Whether a product rounds its input: the numerics switch is on AND the weight is stored in
    FP8 or FP4 (the reference's ``linear()`` dispatches on the weight's dtype; a bf16/fp32
    weight is a plain product)."""
    return act_quant and storage != "plain"


def routed_experts(u: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, experts,
                   limit: float, act_quant: bool) -> torch.Tensor:
    """sum_k weight_k * Expert_{idx_k}(u): u [T, D], idx/weights [T, K] -> [T, D] float32.
    ``experts``: the module holding the stacked weights (``expert_weights(e)``, ``storage``;
    tensor-parallel: only its range ``[first, first + E/w)``, the sum over those); the routing
    weight multiplies BEFORE w2 (and before w2's input is rounded)."""
    aq = rounds_input(experts.storage, act_quant)
    out = torch.zeros(u.shape, dtype=wide(u).dtype, device=u.device)
    first, n = experts.first, experts.w13_weight.shape[0]
    for e in idx.unique().tolist():
        if not first <= e < first + n:
            continue  # another rank's expert
        rows, k = torch.nonzero(idx == e, as_tuple=True)
        w13, w2 = experts.expert_weights(e - first)
        g, v = matmul(u[rows], w13, aq).chunk(2, dim=-1)
        a = (weights[rows, k, None] * swiglu(g, v, limit)).to(u.dtype)
        out.index_add_(0, rows, wide(matmul(a, w2, aq)))
    return out


class ReferenceOps:
    """The module's ops in pure PyTorch: the definition every backend matches, on any device
    and in every weight format and compute dtype. Stateless.

    ``lin`` arguments are the module's ``Linear``s (``weight``, ``weight_scale_inv``,
    ``storage``: read as stored); ``act_quant`` is the numerics switch, applied where the
    weight's stored format asks for it (:func:`rounds_input`).
    """

    name = "reference"

    def embed_norms(self, input_ids, inputs_embeds, positions, embed, h, enorm_w, hnorm_w,
                    eps: float, *, dtype: torch.dtype, zero_pos0: bool, proj=None):
        """The layer's two input norms: (enorm(e) [T, D], hnorm(h) [T, M, D]), e = embed[ids]
        (or ``inputs_embeds``) in ``dtype``, zero where positions == 0 with ``zero_pos0``.
        ``proj``: (e_proj, h_proj, act_quant), the products that read them next: a backend
        may return them in those products' input form, for its own ``input_proj`` (here
        ignored)."""
        e = F.embedding(input_ids, embed) if inputs_embeds is None else inputs_embeds
        e = e.to(dtype)
        if zero_pos0:
            e = e.masked_fill((positions == 0)[:, None], 0)
        return rms_norm(e, enorm_w, eps), rms_norm(h, hnorm_w, eps)

    def linear(self, x, lin, act_quant: bool, wide_out: bool = False, rounded=None):
        """x [..., in] @ lin^T -> [..., out] in x's dtype (``wide_out``: float32, a
        tensor-parallel partial sum; ``rounded``: a backend's form of x for this product,
        from the op that made x, here ignored)."""
        w = dequantize(lin.weight, lin.weight_scale_inv, lin.storage)
        return matmul(x, w, rounds_input(lin.storage, act_quant), wide_out)

    def input_proj(self, en, hn, e_proj, h_proj, act_quant: bool, *, mix_fn=None):
        """(x, partials): x = h_proj(hn) + e_proj(en) broadcast over the M streams [T, M, D];
        ``mix_fn`` asks a backend for the attention hc_pre's mixes of x alongside, as
        :meth:`hc_post` (here: None)."""
        x = self.linear(hn, h_proj, act_quant) + self.linear(en, e_proj, act_quant).unsqueeze(1)
        return x, None

    def hc_pre_norm(self, x, fn, scale, base, norm_w, iters: int, hc_eps: float, eps: float, *,
                    partials=None, act_quant: bool = False, proj=None, side_stream=None,
                    comb_rows=None):
        """RMSNorm(hc_pre(x)) and hc_pre's post, comb: x [T, M, D] -> (u [T, D], post [T, M],
        comb [T, M, M], u_rounded). ``partials``: a backend's precomputed mixes of x (from its
        ``hc_post``); ``u_rounded``: u as the FP8 products will read it, in the backend's own
        form (here None: each product rounds its input itself); ``proj`` = (lin, act_quant):
        the one product that reads u next, which a backend may round u for; ``side_stream``:
        a stream a backend may make post and comb on (their readers then wait for it) and
        ``comb_rows`` [S]: the rows whose post and comb will be read (a backend may leave the
        others' unwritten); both unused here."""
        y, post, comb = hc_pre(x, fn, scale, base, iters, hc_eps, eps)
        return rms_norm(y, norm_w, eps), post, comb, None

    def hc_post(self, a, residual, post, comb, *, mix_fn=None):
        """(:func:`hc_post`, partials): ``mix_fn`` asks a backend to compute the next
        ``hc_pre_norm``'s (or the head's) mixes of the result alongside (here: None)."""
        return hc_post(a, residual, post, comb), None

    def attn_prep(self, fused, q_norm_w, kv_norm_w, positions, inv_freq, eps: float, *,
                  kv_fp8: bool, kv_dtype: torch.dtype):
        """fused [T, Q + Dh] (wq_a rows, wkv rows) -> (q_lat = q_norm(fused[:, :Q]) [T, Q],
        kv [T, Dh] in ``kv_dtype``: kv_norm, RoPE on the last R dims, the FP8 simulation of the
        first Dh - R in blocks of 64 with ``kv_fp8``; the RoPE table cos, sin [T, R/2])."""
        cos, sin = rope_table(positions, inv_freq, wide(fused).dtype)
        q_rank = q_norm_w.shape[0]
        q_lat, kv = fused.split([q_rank, fused.shape[-1] - q_rank], dim=-1)
        kv = apply_rope(rms_norm(kv, kv_norm_w, eps), cos, sin)
        if kv_fp8:
            r = 2 * cos.shape[-1]
            kv = torch.cat((fp8_simulate(kv[:, :-r], KV_FP8_BLOCK), kv[:, -r:]), dim=-1)
        return rms_norm(q_lat, q_norm_w, eps), kv.to(kv_dtype), cos, sin

    def q_prep(self, q, cos, sin, eps: float):
        """q [T, H, Dh]: per-head RMSNorm (no weight), then RoPE on the last R dims."""
        return apply_rope(rms_norm(q, None, eps), cos, sin)

    def attend(self, q, kv, sink, cos, sin, positions, *, window: int, cache, cache_layer: int,
               index, seq_slots):
        """Sink attention of q [T, H, Dh] over each row's W keys, then the inverse RoPE ->
        [T, H, Dh] in q's dtype; then this call's kv [T, Dh] goes into the cache (after every
        read: the rows' own keys come from ``kv``).

        ``index``: a :class:`~mtp.cache.WindowIndex` (any batch), or None for a decode step:
        each sequence's rows together at consecutive positions (usually one), ``seq_slots`` [T]
        their cache slot, -1 for a padding row (reads and writes nothing; its output is zero
        here)."""
        if index is None:
            return self._attend_decode(q, kv, sink, cos, sin, positions, window, cache,
                                       cache_layer, seq_slots)
        t, _, dh = q.shape
        if cache is not None:
            layer_kv = cache.kv[cache_layer].view(-1, dh)  # [S*C, Dh]
            pool = torch.cat((layer_kv, kv.to(layer_kv.dtype)), dim=0)
        else:
            pool = kv
        idx, valid = index.keys_index, index.keys_valid
        o = torch.empty(q.shape, dtype=wide(q).dtype, device=q.device)
        for s in range(0, t, ATTN_CHUNK):
            e = s + ATTN_CHUNK
            o[s:e] = sink_attention(q[s:e], pool[idx[s:e]], valid[s:e], sink, dh ** -0.5)
        if cache is not None:
            self.write_keys(kv, positions, cache=cache, cache_layer=cache_layer, index=index,
                            seq_slots=None)
        return apply_rope(o.to(q.dtype), cos, sin, inverse=True)

    def take_rows(self, rows, tensors):
        """Rows ``rows`` [S] of each tensor [T, ...] -> a tuple of [S, ...]: a call's rows
        that go on past the keys (each sequence's last row) of every per-row tensor."""
        return tuple(t.index_select(0, rows) for t in tensors)

    def write_keys(self, kv, positions, *, cache, cache_layer: int, index, seq_slots):
        """Write this call's keys kv [T, Dh] and their positions into the cache, attending
        nothing (what a row whose output nobody reads needs: the MTP module is one layer, so a
        row's key depends on that row alone). ``index``: a :class:`~mtp.cache.WindowIndex`,
        whose ``write_rows`` go to ``write_slots`` (each run's last ``capacity`` rows); None
        (decode layout): every row with ``seq_slots`` >= 0 to ring entry ``slot * C + p % C``
        (at most C rows per slot: distinct entries)."""
        layer_kv = cache.kv[cache_layer].view(-1, kv.shape[-1])  # [S*C, Dh]
        if index is not None:
            rows, slots = index.write_rows, index.write_slots
        else:
            rows = torch.nonzero(seq_slots >= 0).flatten()
            slots = seq_slots[rows] * cache.capacity + positions[rows].remainder(cache.capacity)
        layer_kv.index_copy_(0, slots, kv[rows].to(layer_kv.dtype))
        cache.pos[cache_layer].view(-1).index_copy_(0, slots, positions[rows].to(torch.int64))

    def _attend_decode(self, q, kv, sink, cos, sin, positions, window, cache, cache_layer,
                       seq_slots):
        rows = torch.nonzero(seq_slots >= 0).flatten()
        out = torch.zeros_like(q)
        if rows.numel():
            index = window_index(positions[rows], seq_slots[rows], window,
                                 cache.pos[cache_layer], cache.capacity)
            out[rows] = self.attend(q[rows], kv[rows], sink, cos[rows], sin[rows],
                                    positions[rows], window=window, cache=cache,
                                    cache_layer=cache_layer, index=index, seq_slots=None)
        return out

    def grouped_linear(self, o, lin, groups: int):
        """The grouped low-rank output ``wo_a``: o [T, H, Dh] -> [T, G*O], group g's heads
        [g*H/G, (g+1)*H/G) times wo_a's rows [g*O, (g+1)*O); no activation rounding (the
        reference applies it as a plain bf16 product)."""
        og = wide(rearrange(o, "t (g hg) d -> t g (hg d)", g=groups))
        w = rearrange(dequantize(lin.weight, lin.weight_scale_inv, lin.storage),
                      "(g r) i -> g r i", g=groups)
        z = torch.einsum("tgi,gri->tgr", og, w.to(og.dtype)).to(o.dtype)  # [T, G, O]
        return rearrange(z, "t g r -> t (g r)")

    def routed(self, u, idx, w, experts, limit: float, act_quant: bool):
        """The routed experts' float32 sum [T, D] (:func:`routed_experts`)."""
        return routed_experts(u, idx, w, experts, limit, act_quant)

    def moe(self, u, u_rounded, ffn, cfg, act_quant: bool, *, side_stream=None):
        """The MoE of u [T, D]: gate, routing, routed experts + shared expert, summed in float32
        -> [T, D] in u's dtype. ``ffn``: the module (``gate``, ``experts``,
        ``shared_experts``, ``tp``); ``u_rounded`` / ``side_stream``: backend hints (unused
        here). Tensor-parallel (``ffn.tp``): the gate whole, the routed experts by range, the
        shared expert whole or split by width (``shared_experts.split``); one all-reduce, of
        the float32 partials."""
        idx, w = route(u, ffn.gate.weight, ffn.gate.e_score_correction_bias,
                       cfg.num_experts_per_tok, cfg.scoring_func, cfg.routed_scaling_factor)
        routed = self.routed(u, idx, w, ffn.experts, cfg.swiglu_limit, act_quant)
        sh, tp = ffn.shared_experts, ffn.tp
        if getattr(sh, "split", False):  # this rank's part of the width: a float32 partial
            i = sh.down_proj.weight.shape[1]
            a, b = tp.part(i)  # w1 rows, w3 rows, w2 columns
            aq = rounds_input(sh.gate_up_proj.storage, act_quant)
            g = matmul(u, sh.gate_up_proj.dequantized(rows=(a, b)), aq)
            v = matmul(u, sh.gate_up_proj.dequantized(rows=(i + a, i + b)), aq)
            shared = matmul(swiglu(g, v, cfg.swiglu_limit).to(u.dtype),
                            sh.down_proj.dequantized(cols=(a, b)), aq, wide_out=True)
            return tp.all_reduce_(routed + shared).to(u.dtype)
        g, v = self.linear(u, sh.gate_up_proj, act_quant).chunk(2, dim=-1)
        shared = self.linear(swiglu(g, v, cfg.swiglu_limit).to(u.dtype), sh.down_proj,
                             act_quant)
        return (tp.all_reduce_(routed) + wide(shared)).to(u.dtype)

    def head(self, x, fn, scale, base, norm_w, head_w, hc_eps: float, eps: float, *,
             partials=None):
        """Logits: hc_head, the layer's norm, the shared head: x [T, M, D] -> [T, V] float32
        (float64 in float64 mode). ``partials``: a backend's precomputed hc_head mixes."""
        y = rms_norm(hc_head(x, fn, scale, base, hc_eps, eps), norm_w, eps)
        yf = wide(y)
        return F.linear(yf, head_w.to(yf.dtype))

    def argmax_rows(self, logits, top=None):
        """The greedy pick: (values [T], indices [T]) of each row's maximum of logits [T, V],
        the first one, a NaN counting as the largest: ``torch.max(logits, dim=-1)``. ``top``
        [T]: where the values go (written in place and returned)."""
        values, indices = logits.max(dim=-1)
        if top is None:
            return values, indices
        return top.copy_(values), indices


REFERENCE = ReferenceOps()
