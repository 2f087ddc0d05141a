"""Independent float64 reference of the DeepSeek-V4 MTP layer, written from the model's
architecture description (the math) and the release's checkpoint format alone.

Everything is torch float64 on CPU.  The code is deliberately literal (loops over tokens, heads,
window positions, experts and Sinkhorn iterations) so that it is obviously correct; it is meant
for tiny shapes only and is used solely by the test suite.

Weights `W` are a dict of already dequantised float64 tensors keyed by checkpoint names
(`embed.weight`, `head.weight`, `mtp.0.attn.wq_a.weight`, ...).  `cfg` is a dict or an object
with the Hugging Face config.json key names.  `formats` (optional) maps those names to the
format each weight is STORED in ("fp8", "fp4", "bf16", "f32"): the activation rounding before a
product follows it (architecture.md, Weight formats: FP8/FP4 weight: round the input; bf16/fp32
weight: do not).  Without `formats`, every weight is taken as released (FP8, FP4 experts).
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64
FP8_MAX = 448.0


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def get_cfg(cfg, key):
    """Read a config value by its HF config.json key (architecture.md, Notation)."""
    if isinstance(cfg, dict):
        return cfg[key]
    return getattr(cfg, key)


def _has_cfg(cfg, key):
    """Whether the config carries a key (architecture.md, Notation)."""
    if isinstance(cfg, dict):
        return key in cfg
    return hasattr(cfg, key)


def _as_bytes(t):
    """View an int8 / uint8 / float8 tensor as int64 byte values 0..255 (checkpoint.md)."""
    if t.dtype == torch.uint8:
        return t.to(torch.int64)
    if t.element_size() == 1:
        return t.view(torch.uint8).to(torch.int64)
    return t.to(torch.int64) & 0xFF


def linear(x, weight):
    """y = x @ weight^T for weight [out, in] (architecture.md, all projections)."""
    return x.to(F64) @ weight.to(F64).T


def sigmoid(x):
    """Logistic function 1 / (1 + exp(-x)) (architecture.md, Hyper-connections)."""
    return 1.0 / (1.0 + torch.exp(-x))


def silu(x):
    """x * sigmoid(x) (architecture.md, MoE Expert)."""
    return x * sigmoid(x)


def softplus(x):
    """log(1 + exp(x)) as max(x,0) + log1p(exp(-|x|)) (architecture.md, MoE)."""
    return torch.clamp(x, min=0.0) + torch.log1p(torch.exp(-torch.abs(x)))


# ----------------------------------------------------------------------------------------------
# norms and RoPE
# ----------------------------------------------------------------------------------------------


def rms_norm(x, weight, eps):
    """RMSNorm(z) = weight * z * rsqrt(mean(z^2) + eps) over the last dim (architecture.md)."""
    x = x.to(F64)
    ms = (x * x).mean(dim=-1, keepdim=True)
    y = x / torch.sqrt(ms + eps)
    if weight is not None:
        y = y * weight.to(F64)
    return y


def rope_last(x, p, R, base, inverse=False):
    """Rotate the last R dims as R/2 interleaved pairs by exp(+-1j*p*theta_i) (Attention)."""
    x = x.to(F64)
    out = x.clone()
    Dh = x.shape[-1]
    start = Dh - R
    sign = -1.0 if inverse else 1.0
    for i in range(R // 2):
        theta_i = float(base) ** (-2.0 * i / R)
        angle = sign * float(p) * theta_i
        c, s = math.cos(angle), math.sin(angle)
        a = x[..., start + 2 * i]
        b = x[..., start + 2 * i + 1]
        # (a + 1j b) * (c + 1j s)
        out[..., start + 2 * i] = a * c - b * s
        out[..., start + 2 * i + 1] = a * s + b * c
    return out


# ----------------------------------------------------------------------------------------------
# FP8 / FP4 numerics
# ----------------------------------------------------------------------------------------------


def e4m3_grid():
    """All non-negative finite float8 e4m3fn values, ascending; index = (exp<<3)|mant (formats)."""
    vals = []
    for e in range(16):
        for m in range(8):
            if e == 15 and m == 7:
                continue  # 0x7F is NaN; e4m3fn has no inf
            if e == 0:
                vals.append((m / 8.0) * 2.0 ** (-6))  # subnormals
            else:
                vals.append((1.0 + m / 8.0) * 2.0 ** (e - 7))
    return torch.tensor(vals, dtype=F64)  # 127 values, max 448


def fp8_e4m3_round(x):
    """Round to the nearest e4m3fn value, ties to even mantissa, without float8 dtypes (FP8 sim)."""
    x = x.to(F64)
    grid = e4m3_grid()
    a = x.abs().reshape(-1)
    out = torch.empty_like(a)
    for n in range(a.numel()):
        v = a[n].item()
        hi = int(torch.searchsorted(grid, torch.tensor([v], dtype=F64)).item())
        if hi >= grid.numel():
            out[n] = grid[-1]  # inputs are clamped to 448, this is only a guard
            continue
        if grid[hi].item() == v or hi == 0:
            out[n] = grid[hi]
            continue
        lo = hi - 1
        d_lo = v - grid[lo].item()
        d_hi = grid[hi].item() - v
        if d_lo < d_hi:
            out[n] = grid[lo]
        elif d_hi < d_lo:
            out[n] = grid[hi]
        else:  # exact tie: the even code has the even mantissa
            out[n] = grid[lo] if lo % 2 == 0 else grid[hi]
    return torch.copysign(out.reshape(x.shape), x)


def pow2_scale(amax):
    """scale = 2^ceil(log2(max(amax,1e-4) * f32(1/448))), ceil from the float32 bits (FP8 sim)."""
    a32 = torch.as_tensor(amax, dtype=F64).to(torch.float32)
    a32 = torch.maximum(a32, torch.tensor(1e-4, dtype=torch.float32))
    prod = a32 * torch.tensor(1.0 / 448.0, dtype=torch.float32)  # float32 multiply
    bits = prod.reshape(-1).view(torch.int32).to(torch.int64)
    out = torch.empty(bits.shape, dtype=F64)
    for n in range(bits.numel()):
        b = int(bits[n].item())
        exponent = ((b >> 23) & 0xFF) - 127
        mantissa = b & 0x7FFFFF
        ceil_log2 = exponent + (1 if mantissa != 0 else 0)
        out[n] = math.ldexp(1.0, ceil_log2)
    return out.reshape(prod.shape)


def quant_dequant_blocks(x, block):
    """FP8 e4m3 quantise-dequantise along the last dim in blocks (Weight formats; FP8 sim of KV)."""
    x = x.to(F64)
    out = torch.empty_like(x)
    n = x.shape[-1]
    for start in range(0, n, block):
        blk = x[..., start:start + block]
        amax = blk.abs().amax(dim=-1, keepdim=True)
        scale = pow2_scale(amax)
        q = fp8_e4m3_round(torch.clamp(blk / scale, -FP8_MAX, FP8_MAX))
        out[..., start:start + block] = q * scale
    return out


def dequant_e4m3_bytes(q_uint8):
    """Decode float8 e4m3fn bytes by hand: sign, 4-bit exponent bias 7, 3-bit mantissa (formats)."""
    b = _as_bytes(q_uint8)
    flat = b.reshape(-1)
    out = torch.empty(flat.shape, dtype=F64)
    for n in range(flat.numel()):
        byte = int(flat[n].item())
        sign = -1.0 if byte & 0x80 else 1.0
        e = (byte >> 3) & 0xF
        m = byte & 0x7
        if e == 15 and m == 7:
            out[n] = float("nan")
        elif e == 0:
            out[n] = sign * (m / 8.0) * 2.0 ** (-6)
        else:
            out[n] = sign * (1.0 + m / 8.0) * 2.0 ** (e - 7)
    return out.reshape(b.shape)


def e8m0_to_float(b_uint8):
    """E8M0 byte b -> 2^(b-127); byte 255 is NaN (checkpoint.md, Numeric formats)."""
    b = _as_bytes(b_uint8)
    flat = b.reshape(-1)
    out = torch.empty(flat.shape, dtype=F64)
    for n in range(flat.numel()):
        byte = int(flat[n].item())
        out[n] = float("nan") if byte == 255 else math.ldexp(1.0, byte - 127)
    return out.reshape(b.shape)


def _scale_to_float(scale):
    """Scale as floats: uint8 means raw e8m0 exponents, anything else is already floats."""
    if scale.dtype == torch.uint8 or scale.dtype == getattr(torch, "float8_e8m0fnu", None):
        return e8m0_to_float(scale)
    return scale.to(F64)


def dequant_fp8_block(q_uint8, scale, block=128):
    """W[r, c] = e4m3(q[r, c]) * scale[r // block, c // block] (checkpoint.md, FP8 weight)."""
    q = dequant_e4m3_bytes(q_uint8)
    s = _scale_to_float(scale)
    rows, cols = q.shape
    out = torch.empty_like(q)
    for r in range(rows):
        for c in range(cols):
            out[r, c] = q[r, c] * s[r // block, c // block]
    return out


FP4_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def dequant_fp4(packed_int8, scale_e8m0_uint8):
    """W[r, 2k] = low nibble, W[r, 2k+1] = high nibble, times scale[r, j // 32] (FP4 experts)."""
    b = _as_bytes(packed_int8)
    s = _scale_to_float(scale_e8m0_uint8)
    rows, half = b.shape
    out = torch.empty((rows, 2 * half), dtype=F64)
    for r in range(rows):
        for k in range(half):
            byte = int(b[r, k].item())
            for j, code in ((2 * k, byte & 0xF), (2 * k + 1, (byte >> 4) & 0xF)):
                v = FP4_VALUES[code & 0x7]
                if code & 0x8:
                    v = -v
                out[r, j] = v * s[r, j // 32]
    return out


QUANTISED_FORMATS = ("fp8", "fp4")


def _rounds(act_quant, formats, name):
    """Whether the input of the product with weight `name` is FP8-rounded: only if enabled AND
    that weight is stored in FP8 or FP4 (architecture.md, Weight formats: the reference's
    `linear()` dispatches on the weight's dtype).  `formats` None: the released format."""
    return act_quant and (formats is None or formats[name] in QUANTISED_FORMATS)


def _aq(x, act_quant, formats=None, name=None):
    """Activation FP8 simulation (blocks of 128) before the product with weight `name`, if
    :func:`_rounds` says so."""
    return quant_dequant_blocks(x, 128) if _rounds(act_quant, formats, name) else x.to(F64)


# ----------------------------------------------------------------------------------------------
# hyper-connections
# ----------------------------------------------------------------------------------------------


def hc_pre(x, fn, scale, base, M, iters, hc_eps, eps):
    """hc_pre -> (y [D], post [M], comb [M, M]) with explicit Sinkhorn loops (Hyper-connections)."""
    x = x.to(F64)
    fn, scale, base = fn.to(F64), scale.to(F64), base.to(F64)
    z = x.reshape(-1)
    mixes = (fn @ z) / torch.sqrt((z * z).mean() + eps)
    pre = sigmoid(mixes[0:M] * scale[0] + base[0:M]) + hc_eps
    post = 2.0 * sigmoid(mixes[M:2 * M] * scale[1] + base[M:2 * M])
    c = mixes[2 * M:].reshape(M, M) * scale[2] + base[2 * M:].reshape(M, M)
    # softmax over the last dim (each row), then + hc_eps
    c = c.clone()
    for i in range(M):
        row = c[i]
        e = torch.exp(row - row.max())
        c[i] = e / e.sum()
    c = c + hc_eps

    def normalise_columns(c):
        """c = c / (c.sum(dim=-2, keepdim=True) + hc_eps): each column (Sinkhorn)."""
        c = c.clone()
        for j in range(M):
            c[:, j] = c[:, j] / (c[:, j].sum() + hc_eps)
        return c

    def normalise_rows(c):
        """c = c / (c.sum(dim=-1, keepdim=True) + hc_eps): each row (Sinkhorn)."""
        c = c.clone()
        for i in range(M):
            c[i, :] = c[i, :] / (c[i, :].sum() + hc_eps)
        return c

    c = normalise_columns(c)
    for _ in range(iters - 1):
        c = normalise_rows(c)
        c = normalise_columns(c)
    y = torch.zeros(x.shape[1], dtype=F64)
    for m in range(M):
        y = y + pre[m] * x[m]
    return y, post, c


def hc_post(a, residual, post, comb):
    """out[k] = post[k] * a + sum_j comb[j, k] * residual[j] (Hyper-connections)."""
    a, residual = a.to(F64), residual.to(F64)
    M = residual.shape[0]
    out = torch.zeros_like(residual)
    for k in range(M):
        acc = post[k] * a
        for j in range(M):
            acc = acc + comb[j, k] * residual[j]
        out[k] = acc
    return out


def hc_head(x, fn, scale, base, hc_eps, eps):
    """hc_head: pre = sigmoid(mixes * scale + base) + hc_eps; y = sum_m pre[m] x[m] (HC)."""
    x = x.to(F64)
    fn, scale, base = fn.to(F64), scale.to(F64), base.to(F64)
    z = x.reshape(-1)
    mixes = (fn @ z) / torch.sqrt((z * z).mean() + eps)
    pre = sigmoid(mixes * scale[0] + base) + hc_eps
    y = torch.zeros(x.shape[1], dtype=F64)
    for m in range(x.shape[0]):
        y = y + pre[m] * x[m]
    return y


# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------


def attention(u_rows, positions, W, cfg, act_quant, kv_fp8, prefix="mtp.0.", formats=None):
    """Sliding-window MQA with sink, RoPE on last R dims, grouped wo_a, wo_b (Attention)."""
    u_rows = u_rows.to(F64)
    T = u_rows.shape[0]
    H = get_cfg(cfg, "num_attention_heads")
    Dh = get_cfg(cfg, "head_dim")
    R = get_cfg(cfg, "qk_rope_head_dim")
    G = get_cfg(cfg, "o_groups")
    O = get_cfg(cfg, "o_lora_rank")
    Wwin = get_cfg(cfg, "sliding_window")
    eps = get_cfg(cfg, "rms_norm_eps")
    base = get_cfg(cfg, "rope_theta")
    pa = prefix + "attn."
    pos = [int(p) for p in positions]

    # per-token q [H, Dh] and kv [Dh]
    qs, kvs = [], []
    for t in range(T):
        u_q = _aq(u_rows[t], act_quant, formats, pa + "wq_a.weight")
        q_lat = rms_norm(linear(u_q, W[pa + "wq_a.weight"]), W[pa + "q_norm.weight"], eps)
        q = linear(_aq(q_lat, act_quant, formats, pa + "wq_b.weight"),
                   W[pa + "wq_b.weight"]).reshape(H, Dh)
        for h in range(H):
            q[h] = rms_norm(q[h], None, eps)  # per head, no weight
        u_kv = _aq(u_rows[t], act_quant, formats, pa + "wkv.weight")
        kv = rms_norm(linear(u_kv, W[pa + "wkv.weight"]), W[pa + "kv_norm.weight"], eps)
        for h in range(H):
            q[h] = rope_last(q[h], pos[t], R, base)
        kv = rope_last(kv, pos[t], R, base)
        if kv_fp8:
            kv = kv.clone()
            kv[: Dh - R] = quant_dequant_blocks(kv[: Dh - R], 64)
        qs.append(q)
        kvs.append(kv)

    row_of_position = {p: t for t, p in enumerate(pos)}
    sink = W[pa + "attn_sink"].to(F64)
    wo_a = W[pa + "wo_a.weight"].to(F64).reshape(G, O, H * Dh // G)
    out = torch.empty((T, W[pa + "wo_b.weight"].shape[0]), dtype=F64)
    for t in range(T):
        p = pos[t]
        keys = []
        for kp in range(max(0, p - Wwin + 1), p + 1):
            if kp in row_of_position:  # positions before the first row do not exist
                keys.append(kvs[row_of_position[kp]])
        o = torch.zeros((H, Dh), dtype=F64)
        for h in range(H):
            scores = [torch.dot(qs[t][h], kv_j).item() * Dh ** -0.5 for kv_j in keys]
            m = max(scores)
            num = torch.zeros(Dh, dtype=F64)
            den = 0.0
            for s_j, kv_j in zip(scores, keys):
                w = math.exp(s_j - m)
                num = num + w * kv_j
                den += w
            den += math.exp(sink[h].item() - m)
            o[h] = rope_last(num / den, p, R, base, inverse=True)
        o_groups = o.reshape(G, H * Dh // G)
        z = torch.empty((G, O), dtype=F64)
        for g in range(G):
            z[g] = wo_a[g] @ o_groups[g]
        out[t] = linear(_aq(z.reshape(-1), act_quant, formats, pa + "wo_b.weight"),
                        W[pa + "wo_b.weight"])
    return out


# ----------------------------------------------------------------------------------------------
# MoE
# ----------------------------------------------------------------------------------------------


def _swiglu(u, u_q, W, pe, weight, limit, act_quant, formats):
    """Expert `pe` (a name prefix): w2(weight * silu(clamp(g, max=limit)) *
    clamp(v, -limit, limit)) (MoE). `u_q`: u FP8-rounded, the input of w1 / w3 where their
    format asks for it."""
    g = linear(u_q if _rounds(act_quant, formats, pe + "w1.weight") else u, W[pe + "w1.weight"])
    v = linear(u_q if _rounds(act_quant, formats, pe + "w3.weight") else u, W[pe + "w3.weight"])
    if limit > 0:
        v = torch.clamp(v, -limit, limit)
        g = torch.clamp(g, max=limit)
    hidden = silu(g) * v
    if weight is not None:
        hidden = weight * hidden
    return linear(_aq(hidden, act_quant, formats, pe + "w2.weight"), W[pe + "w2.weight"])


def moe(u, W, cfg, act_quant, prefix="mtp.0.", formats=None):
    """sqrtsoftplus gate, top-K by scores+bias, routed + shared experts (MoE)."""
    if _has_cfg(cfg, "scoring_func") and get_cfg(cfg, "scoring_func") != "sqrtsoftplus":
        raise NotImplementedError("reference implements scoring_func sqrtsoftplus only")
    u = u.to(F64)
    E = get_cfg(cfg, "n_routed_experts")
    K = get_cfg(cfg, "num_experts_per_tok")
    rsf = get_cfg(cfg, "routed_scaling_factor")
    limit = get_cfg(cfg, "swiglu_limit")
    pf = prefix + "ffn."

    logits = linear(u, W[pf + "gate.weight"])  # [E], no activation quantisation
    scores = torch.sqrt(softplus(logits))
    biased = scores + W[pf + "gate.bias"].to(F64)
    chosen = []
    for _ in range(K):
        best = None
        for e in range(E):
            if e in chosen:
                continue
            if best is None or biased[e].item() > biased[best].item():
                best = e
        chosen.append(best)
    total = sum(scores[e].item() for e in chosen)
    weights = [scores[e].item() / total * rsf for e in chosen]

    u_q = quant_dequant_blocks(u, 128) if act_quant else None  # rounded once, used as needed
    out = torch.zeros_like(u)
    for e, w_k in zip(chosen, weights):
        out = out + _swiglu(u, u_q, W, pf + f"experts.{e}.", w_k, limit, act_quant, formats)
    out = out + _swiglu(u, u_q, W, pf + "shared_experts.", None, limit, act_quant, formats)
    return out


# ----------------------------------------------------------------------------------------------
# MTP layer and logits
# ----------------------------------------------------------------------------------------------


def mtp_layer(hidden, tokens, positions, W, cfg, act_quant=True, kv_fp8=True, prefix="mtp.0.",
              formats=None):
    """Forward of MTP layer i: enorm/hnorm, e_proj + h_proj, Block with hyper-connections."""
    D = get_cfg(cfg, "hidden_size")
    M = get_cfg(cfg, "hc_mult")
    iters = get_cfg(cfg, "hc_sinkhorn_iters")
    hc_eps = get_cfg(cfg, "hc_eps")
    eps = get_cfg(cfg, "rms_norm_eps")
    hidden = hidden.to(F64)
    T = hidden.shape[0]
    p = prefix

    # steps 1-3: x = h_proj(hnorm(h)) + e_proj(enorm(embed(t))), broadcast over the M streams
    xs = []
    for t in range(T):
        e = W["embed.weight"][int(tokens[t])].to(F64)
        e = rms_norm(e, W[p + "enorm.weight"], eps)
        h = hidden[t].reshape(M, D)
        x = torch.empty((M, D), dtype=F64)
        e_part = linear(_aq(e, act_quant, formats, p + "e_proj.weight"), W[p + "e_proj.weight"])
        for m in range(M):
            h_m = rms_norm(h[m], W[p + "hnorm.weight"], eps)
            x[m] = linear(_aq(h_m, act_quant, formats, p + "h_proj.weight"),
                          W[p + "h_proj.weight"]) + e_part
        xs.append(x)

    # Block, attention half
    u_rows = torch.empty((T, D), dtype=F64)
    hc = []
    for t in range(T):
        y, post, comb = hc_pre(xs[t], W[p + "hc_attn_fn"], W[p + "hc_attn_scale"],
                               W[p + "hc_attn_base"], M, iters, hc_eps, eps)
        u_rows[t] = rms_norm(y, W[p + "attn_norm.weight"], eps)
        hc.append((post, comb))
    a = attention(u_rows, positions, W, cfg, act_quant, kv_fp8, prefix=prefix, formats=formats)
    for t in range(T):
        post, comb = hc[t]
        xs[t] = hc_post(a[t], xs[t], post, comb)

    # Block, MoE half
    out = torch.empty((T, M * D), dtype=F64)
    for t in range(T):
        y, post, comb = hc_pre(xs[t], W[p + "hc_ffn_fn"], W[p + "hc_ffn_scale"],
                               W[p + "hc_ffn_base"], M, iters, hc_eps, eps)
        f = moe(rms_norm(y, W[p + "ffn_norm.weight"], eps), W, cfg, act_quant, prefix=prefix,
                formats=formats)
        out[t] = hc_post(f, xs[t], post, comb).reshape(-1)
    return out


def mtp_logits(x, W, cfg, prefix="mtp.0."):
    """Logits: hc_head, the layer's own norm, then head.weight (Forward of MTP layer i, step 6)."""
    D = get_cfg(cfg, "hidden_size")
    M = get_cfg(cfg, "hc_mult")
    hc_eps = get_cfg(cfg, "hc_eps")
    eps = get_cfg(cfg, "rms_norm_eps")
    x = x.to(F64)
    T = x.shape[0]
    out = torch.empty((T, W["head.weight"].shape[0]), dtype=F64)
    for t in range(T):
        y = hc_head(x[t].reshape(M, D), W[prefix + "hc_head_fn"], W[prefix + "hc_head_scale"],
                    W[prefix + "hc_head_base"], hc_eps, eps)
        y = rms_norm(y, W[prefix + "norm.weight"], eps)
        out[t] = linear(y, W["head.weight"])
    return out
