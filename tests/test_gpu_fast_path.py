"""End to end: the module's triton backend (``mtp_kernels.TritonOps``, and the CUDA-graph runner
of its ``decode_step``) against the same module on the reference backend, on the GPU.

Needs a CUDA GPU (skipped otherwise, with the reason; ``TRITON_INTERPRET=1`` runs the eager parts
on the CPU through Triton's interpreter). Triton is imported lazily. Under Triton 3.6's
interpreter the bfloat16 cases without the rounding steps fail the accuracy comparison below:
that interpreter converts float32 to bfloat16 by truncation, not to nearest as the GPU does
(tests/test_kernels.py's header); with the rounding steps on they pass there.

Tolerances, with their reasons:
- float32 with the rounding steps off: the kernels multiply the reference's exact operand values
  and differ only in fp32 summation order: relative error < 2e-6 (measured ~3e-7).
- with the FP8 rounding steps on, or in bfloat16, one ulp of accumulation-order difference can
  move a value across an e4m3 / bf16 rounding boundary and the step grows to 2^-4 / 2^-9
  relative, so a direct comparison says little. The statistic is instead accuracy against the
  float64 run of the same module (same rounding steps in float64): the fast path must be no
  less accurate than the reference path in the same dtype, within 1.5x plus 1e-4 (for
  float32, where both are tiny).
- the CUDA-graph replay must equal the eager fast path bit for bit (same kernels, same inputs,
  no atomics), outputs and cache alike.
"""

from __future__ import annotations

import dataclasses
import gc
import os

import pytest
import torch

from mtp import DeepSeekV4MTP, KVCache, MTPConfig, Numerics
from mtp.testing import init_random_

INTERPRET = bool(os.environ.get("TRITON_INTERPRET"))
DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if INTERPRET else None)
pytestmark = pytest.mark.skipif(
    DEVICE is None, reason="needs a CUDA GPU: the Triton fast path runs only there")


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


def build(dtype, rounding: bool, seed=0, backend="reference"):
    cfg = MTPConfig.from_name("tiny")
    num = Numerics(act_quant=rounding, kv_fp8=rounding)
    src = init_random_(DeepSeekV4MTP(cfg, numerics=num), seed=seed)
    m = DeepSeekV4MTP(cfg, dtype=dtype, numerics=num, device=DEVICE, backend=backend)
    m.load_state_dict(src.state_dict())
    return m


def triton(model, **options):
    """``model`` switched to the triton backend (with kernel options)."""
    from mtp_kernels import TritonOps
    model.backend = TritonOps(model, **options)
    return model


def scenario(model, runner, dtype):
    """Stateless rows, a cached catch-up of two sequences, then a decode step: every output."""
    cfg = model.config
    g = torch.Generator().manual_seed(3)
    out = []
    ids = torch.randint(0, cfg.vocab_size, (7,), generator=g).to(DEVICE)
    pos = torch.arange(2, 9, device=DEVICE)
    h = torch.randn(7, cfg.hc_dim, generator=g).to(DEVICE, dtype)
    x = runner.forward(ids, pos, h)
    out += [x, runner.compute_logits(x)]
    cache = KVCache(1, 3, cfg.sliding_window + 3, cfg.head_dim, dtype=dtype, device=DEVICE)
    slots = torch.tensor([0] * 6 + [2] * 4, device=DEVICE)
    pos = torch.cat([torch.arange(6), torch.arange(10, 14)]).to(DEVICE)
    ids = torch.randint(0, cfg.vocab_size, (10,), generator=g).to(DEVICE)
    h = torch.randn(10, cfg.hc_dim, generator=g).to(DEVICE, dtype)
    out.append(runner.forward(ids, pos, h, kv_cache=cache, seq_slots=slots))
    for step in range(3):  # decode steps, one row per sequence, the window sliding over the ring
        s = torch.tensor([2, 0], device=DEVICE)
        p = torch.tensor([14 + step, 6 + step], device=DEVICE)
        i = torch.randint(0, cfg.vocab_size, (2,), generator=g).to(DEVICE)
        hh = torch.randn(2, cfg.hc_dim, generator=g).to(DEVICE, dtype)
        x = runner.forward(i, p, hh, kv_cache=cache, seq_slots=s)
        out += [x, runner.compute_logits(x)]
    out += [cache.kv, cache.pos.to(torch.float64)]
    return out


@pytest.mark.parametrize("experts,head", [("auto", "auto"), ("auto", "triton"),
                                          ("triton", "triton"), ("auto", "cublas")])
@pytest.mark.parametrize("dtype,rounding", [(torch.float32, False), (torch.float32, True),
                                            (torch.bfloat16, False), (torch.bfloat16, True)])
def test_fast_path_matches_module(dtype, rounding, experts, head):
    """experts="auto": the CUDA expert kernels where they can run (bf16, rounding on, a GPU),
    else the Triton ones. head="triton" (the default): head.head_logits' kernel for the few-row
    logits; "cublas" cuBLAS; "auto" the faster of the two for the shape."""
    model = build(dtype, rounding)
    assert model.ops.name == "reference"
    ref = scenario(model, model, dtype)
    runner = triton(build(dtype, rounding), experts=experts, head=head)
    if experts == "auto" and dtype == torch.bfloat16 and DEVICE == "cuda":
        assert runner.ops.experts == "cuda", "the CUDA expert kernels should run on this GPU"
    fast = scenario(runner, runner, dtype)
    if dtype == torch.float32 and not rounding:
        for a, b in zip(fast, ref):
            assert rel(a, b) < 2e-6
        return
    m64 = build(torch.float64, rounding)
    truth = scenario(m64, m64, torch.float64)
    for k, (a, b, c) in enumerate(zip(fast, ref, truth)):
        err_fast, err_ref = rel(a, c), rel(b, c)
        assert err_fast <= 1.5 * err_ref + 1e-4, (k, err_fast, err_ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: CUDA graphs")
@pytest.mark.parametrize("pdl_rows", [0, 1, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_graph_replay_equals_eager(dtype, pdl_rows):
    """pdl_rows: no bucket, bucket 1, both buckets captured with programmatic dependent launch
    (where the GPU has it): the overlap must change nothing."""
    from mtp_kernels import DraftStepGraphs, _common
    model = build(dtype, True, backend="triton")
    fast = model
    cfg = model.config
    caches = [KVCache(1, 4, cfg.sliding_window + 3, cfg.head_dim, dtype=dtype, device=DEVICE)
              for _ in range(2)]
    graphs = DraftStepGraphs(model, caches[1], buckets=(1, 4), pdl_rows=pdl_rows)
    for b, bucket in graphs.buckets.items():
        assert bucket.pdl == (b <= pdl_rows and bool(_common.PDL_ARCH))
    assert not _common.PDL  # restored after capture: eager calls launch without it
    # the staging kernel's runner passed its probe (Triton's internal is as expected)
    assert all(b._stage_run is not None for b in graphs.buckets.values())
    g = torch.Generator().manual_seed(5)
    for step in range(12):
        n = 1 + step % 3  # 1..3 rows: buckets 1 and 4, with padding rows
        slots = torch.randperm(4, generator=g)[:n].to(DEVICE)
        pos = torch.randint(0, 40, (n,), generator=g).to(DEVICE)
        ids = torch.randint(0, cfg.vocab_size, (n,), generator=g).to(DEVICE)
        h = torch.randn(n, cfg.hc_dim, generator=g).to(DEVICE, dtype)
        if step % 2:  # a strided view: staged by copies instead of the staging kernel
            h = torch.stack([h, h], dim=2)[..., 0]
            assert not h.is_contiguous()
        elif step % 4 == 2:  # contiguous views 2 and 8 bytes off any 16-byte boundary: the
            # staging kernel is compiled without alignment assumptions
            h = torch.cat([h.new_zeros(1), h.flatten()])[1:].view(n, cfg.hc_dim)
            ids = torch.cat([ids.new_zeros(1), ids])[1:]
            assert h.is_contiguous() and h.data_ptr() % 16 and ids.data_ptr() % 16
        x_e, l_e = fast.decode_step(ids, pos, h, slots, caches[0])
        x_g, l_g = graphs.step(ids, pos, h, slots)
        assert torch.equal(x_e, x_g) and torch.equal(l_e, l_g)
        assert torch.equal(caches[0].kv, caches[1].kv)
        assert torch.equal(caches[0].pos, caches[1].pos)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: CUDA graphs")
# the failing capture records no kernel (the call raises first): torch warns of the empty graph
@pytest.mark.filterwarnings("ignore:The CUDA Graph is empty:UserWarning")
@pytest.mark.parametrize("collecting", [True, False])
def test_capture_without_garbage_collection(collecting):
    """Python's garbage collector is off inside a capture (a collection there can finalise
    dead cycles' CUDA objects mid-capture: the GPU tests' process aborted in one) and as the
    caller set it in the warm-ups; the caller's setting comes back, also when the captured
    call raises."""
    from mtp_kernels.graph import capture
    seen = []

    def run():
        seen.append(gc.isenabled())
        return torch.ones(1, device="cuda") + 1

    def failing():
        seen.append(gc.isenabled())
        if len(seen) == 3:  # the captured call
            raise RuntimeError("captured call failed")
        return torch.ones(1, device="cuda")

    (gc.enable if collecting else gc.disable)()
    try:
        graph, out = capture(run, torch.device("cuda"), None, pdl=False)
        assert seen == [collecting, collecting, False]  # two warm-ups, then the capture
        assert gc.isenabled() == collecting
        out.zero_()
        graph.replay()
        assert out.item() == 2
        seen.clear()
        with pytest.raises(RuntimeError, match="captured call failed"):
            capture(failing, torch.device("cuda"), None, pdl=False)
        assert seen == [collecting, collecting, False] and gc.isenabled() == collecting
    finally:
        gc.enable()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: CUDA graphs")
def test_graph_step_rejects_bad_input():
    from mtp_kernels import DraftStepGraphs
    model = build(torch.bfloat16, True, backend="triton")
    cfg = model.config
    cache = KVCache(1, 2, cfg.sliding_window + 3, cfg.head_dim, dtype=torch.bfloat16,
                    device=DEVICE)
    with pytest.raises(ValueError, match="CUDA graphs capture the triton backend"):
        DraftStepGraphs(build(torch.bfloat16, True), cache, buckets=(2,))  # reference ops
    graphs = DraftStepGraphs(model, cache, buckets=(2,))
    before = cache.kv.clone(), cache.pos.clone()
    h = torch.zeros(2, cfg.hc_dim, dtype=torch.bfloat16, device=DEVICE)
    ids = torch.tensor([1, 2], device=DEVICE)
    pos = torch.tensor([3, 4], device=DEVICE)
    with pytest.raises(ValueError, match="distinct slots"):
        graphs.step(ids, pos, h, torch.tensor([1, 1], device=DEVICE))
    with pytest.raises(ValueError, match="vocabulary"):
        graphs.step(torch.tensor([1, cfg.vocab_size], device=DEVICE), pos, h,
                    torch.tensor([0, 1], device=DEVICE))
    with pytest.raises(ValueError, match="largest captured bucket"):
        graphs.step(torch.tensor([1, 2, 3], device=DEVICE), torch.tensor([1, 2, 3],
                    device=DEVICE), torch.zeros(3, cfg.hc_dim, dtype=torch.bfloat16,
                                                device=DEVICE), torch.tensor([0, 1, 2],
                                                                             device=DEVICE),
                    check=False)
    assert torch.equal(cache.kv, before[0]) and torch.equal(cache.pos, before[1])


def test_experts_choice_errors():
    from mtp_kernels import TritonOps
    model = build(torch.float32, True)
    with pytest.raises(ValueError, match="experts must be one of"):
        TritonOps(model, experts="fast")
    with pytest.raises(ValueError, match="experts='cuda' cannot run here"):
        TritonOps(model, experts="cuda")  # float32 (and on the interpreter, no GPU either)
    assert TritonOps(model).experts == "triton"  # auto: float32 takes the Triton kernels


@pytest.mark.skipif(DEVICE is None, reason="needs a CUDA GPU")
def test_backend_choice():
    """"auto": the kernels on CUDA in the released format, the reference elsewhere (decided
    from where the parameters are); "triton" where it cannot run: a clear error."""
    from mtp import WeightFormat
    cfg = MTPConfig.from_name("tiny")
    auto = DeepSeekV4MTP(cfg, dtype=torch.bfloat16, device=DEVICE)
    assert auto.ops.name == ("triton" if DEVICE == "cuda" else "reference")
    assert DeepSeekV4MTP(cfg, dtype=torch.bfloat16).ops.name == "reference"  # CPU
    plain = DeepSeekV4MTP(cfg, weight_format=WeightFormat.plain(), device=DEVICE)
    assert plain.ops.name == "reference"
    plain.backend = "triton"
    with pytest.raises(ValueError, match="released format"):
        plain.ops  # noqa: B018
    odd = dataclasses.replace(cfg, qk_rope_head_dim=48, head_dim=176)  # 24: no power of 2
    with pytest.raises(ValueError, match="qk_rope_head_dim / 2 = 24 must be a power of two"):
        DeepSeekV4MTP(odd, device=DEVICE, backend="triton").ops  # noqa: B018


@pytest.mark.skipif(DEVICE is None, reason="needs a CUDA GPU")
def test_deprecated_tritonmtp_is_a_view_of_the_module():
    """TritonMTP (one more release): the module's forward with the triton ops, bit for bit;
    the module keeps its own backend."""
    from mtp_kernels import TritonMTP
    model = build(torch.bfloat16, True)
    with pytest.warns(DeprecationWarning, match="TritonMTP is deprecated"):
        view = TritonMTP(model)
    fast = triton(build(torch.bfloat16, True))
    assert scenario_equal(view, fast)
    assert model.ops.name == "reference"


def scenario_equal(a, b) -> bool:
    cfg = MTPConfig.from_name("tiny")
    ids = torch.arange(6, device=DEVICE)
    pos = torch.arange(6, device=DEVICE)
    h = torch.randn(6, cfg.hc_dim, generator=torch.Generator().manual_seed(2)).to(
        DEVICE, torch.bfloat16)
    xa, xb = a.forward(ids, pos, h), b.forward(ids, pos, h)
    return torch.equal(xa, xb) and torch.equal(a.compute_logits(xa), b.compute_logits(xb))


def catchup_scenario(model, dtype, chunk_rows, monkeypatch, last_only=False):
    """A catch-up over a cache: 129 rows of one sequence and 70 of another behind their cached
    prompts (odd counts, past every row threshold of the kernels), in chunks of ``chunk_rows``,
    then the logits of each last row; the outputs (``last_only``: the two last rows', computed
    keys-only for the others) and the cache."""
    from mtp import model as model_mod
    cfg = model.config
    g = torch.Generator().manual_seed(4)
    cache = KVCache(1, 3, cfg.sliding_window + 3, cfg.head_dim, dtype=dtype, device=DEVICE)
    slots = torch.tensor([1] * 5 + [2] * 3, device=DEVICE)
    pos = torch.cat([torch.arange(5), torch.arange(3)]).to(DEVICE)
    ids = torch.randint(0, cfg.vocab_size, (8,), generator=g).to(DEVICE)
    h = torch.randn(8, cfg.hc_dim, generator=g).to(DEVICE, dtype)
    model.forward(ids, pos, h, kv_cache=cache, seq_slots=slots)
    slots = torch.tensor([1] * 129 + [2] * 70, device=DEVICE)
    pos = torch.cat([torch.arange(5, 134), torch.arange(3, 73)]).to(DEVICE)
    ids = torch.randint(0, cfg.vocab_size, (199,), generator=g).to(DEVICE)
    h = torch.randn(199, cfg.hc_dim, generator=g).to(DEVICE, dtype)
    monkeypatch.setattr(model_mod, "CHUNK_ROWS", chunk_rows)
    x = model.forward(ids, pos, h, kv_cache=cache, seq_slots=slots, last_only=last_only)
    last = x if last_only else x[[128, 198]]
    return [x, model.compute_logits(last), cache.kv, cache.pos.to(torch.float64)]


@pytest.mark.parametrize("many_rows", [False, True])
@pytest.mark.parametrize("chunk_rows", [1024, 100])
@pytest.mark.parametrize("dtype,rounding", [(torch.float32, False), (torch.bfloat16, True)])
def test_catchup_matches_module(dtype, rounding, chunk_rows, many_rows, monkeypatch):
    """A catch-up in a whole forward, one call or chunks of 100 rows, against the reference
    backend: the bounds of test_fast_path_matches_module. With ``many_rows`` the many-row
    kernels (FP8 products with the input rounded ahead, the hc mixes as one product,
    attention with 64 heads per program; off by default) take it."""
    from mtp_kernels import _common
    monkeypatch.setattr(_common, "MANY_ROWS", many_rows)
    ref = catchup_scenario(build(dtype, rounding), dtype, chunk_rows, monkeypatch)
    fast = catchup_scenario(triton(build(dtype, rounding)), dtype, chunk_rows, monkeypatch)
    assert_within_fast_path_bounds(fast, ref, dtype, rounding, lambda: catchup_scenario(
        build(torch.float64, rounding), torch.float64, chunk_rows, monkeypatch))


@pytest.mark.parametrize("rows", [(160, 90), (40, 30)])
def test_input_rounding_in_norms_and_add_kernel_change_no_bit(rows, monkeypatch):
    """A catch-up whose prefix products go to cuBLAS (hidden 512, ``CUBLAS_ROWS`` = 128:
    h_proj, e_proj and the attention's wq_a / wkv at 250 rows, h_proj alone at 70) with
    ``backend.ROUND_IN_NORMS`` (embed_norms and hc_pre_norm's finish write those inputs in
    cuBLAS's form, the weights' float32 scales too) and ``scaled_mm.ADD_KERNEL`` (the
    broadcast add by a kernel) gives the default path's outputs, logits and cache bit for
    bit (the same codes, scales and cuBLAS products; the add's one rounding); and with the
    rounding in the norms no ``quant_fp8`` launch is left."""
    import mtp_kernels.backend as be
    from mtp_kernels import fp8_linear as fl
    from mtp_kernels import scaled_mm
    if INTERPRET:
        pytest.skip("cuBLAS: the interpreter runs no cuBLAS")
    if not scaled_mm.ready(torch.device(DEVICE)):
        pytest.skip(f"cuBLAS's block-scaled FP8 GEMM: {scaled_mm.unavailable(DEVICE)}")
    cfg = dataclasses.replace(MTPConfig.from_name("tiny"), hidden_size=512)
    num = Numerics(act_quant=True, kv_fp8=True)
    src = init_random_(DeepSeekV4MTP(cfg, numerics=num), seed=6)
    model = DeepSeekV4MTP(cfg, dtype=torch.bfloat16, numerics=num, device=DEVICE)
    model.load_state_dict(src.state_dict())
    triton(model)
    monkeypatch.setattr(fl, "CUBLAS_ROWS", 128)
    g = torch.Generator().manual_seed(7)
    a, b = rows
    slots = torch.tensor([0] * a + [1] * b, device=DEVICE)
    pos = torch.cat([torch.arange(a), torch.arange(4, 4 + b)]).to(DEVICE)
    ids = torch.randint(0, cfg.vocab_size, (a + b,), generator=g).to(DEVICE)
    h = torch.randn(a + b, cfg.hc_dim, generator=g).to(DEVICE, torch.bfloat16)
    quants, products = [], []
    quant, mm = fl.quant_fp8, torch._scaled_mm
    monkeypatch.setattr(fl, "quant_fp8", lambda *x, **k: quants.append(x[0].shape[0]) or quant(
        *x, **k))
    monkeypatch.setattr(torch, "_scaled_mm", lambda *x, **k: products.append(1) or mm(*x, **k))
    out, launches = {}, {}
    # h_proj's, e_proj's, wq_a / wkv's rows
    by_cublas = [r for r in ((a + b) * cfg.hc_mult, a + b, a + b) if r >= 128]
    for on in (False, True):
        monkeypatch.setattr(be, "ROUND_IN_NORMS", on)
        monkeypatch.setattr(scaled_mm, "ADD_KERNEL", on)
        quants.clear()
        products.clear()
        cache = KVCache(1, 2, cfg.sliding_window + 3, cfg.head_dim, dtype=torch.bfloat16,
                        device=DEVICE)
        x = model.forward(ids, pos, h, kv_cache=cache, seq_slots=slots, last_only=True)
        out[on] = (x, model.compute_logits(x), cache.kv, cache.pos)
        assert len(products) == len(by_cublas)
        launches[on] = list(quants)
    # the rounding of those products' inputs went from quant_fp8 to the norms' kernels
    assert sorted(launches[False]) == sorted(by_cublas) and not launches[True]
    for u, v in zip(out[False], out[True]):
        assert torch.equal(u, v)


def assert_within_fast_path_bounds(got, want, dtype, rounding, truth) -> None:
    """float32 without rounding: each of ``got`` within 2e-6 of ``want`` (summation order
    only); otherwise no further from the float64 run ``truth()`` than 1.5x ``want``'s error +
    1e-4 (the FP8 roundings flip differently in another order)."""
    if dtype == torch.float32 and not rounding:
        for a, b in zip(got, want):
            assert rel(a, b) < 2e-6
        return
    for k, (a, b, c) in enumerate(zip(got, want, truth())):
        err_got, err_want = rel(a, c), rel(b, c)
        assert err_got <= 1.5 * err_want + 1e-4, (k, err_got, err_want)


@pytest.mark.parametrize("chunk_rows", [1024, 100])
@pytest.mark.parametrize("dtype,rounding", [(torch.float32, False), (torch.bfloat16, True)])
def test_catchup_last_only_equals_the_full_forward(dtype, rounding, chunk_rows, monkeypatch):
    """``forward(..., last_only=True)`` on the triton backend (every row's key through
    ``write_keys`` in the window layout, the last rows through the decode-layout attention over
    the ring): the cache bit for bit the full forward's (the same kernels over the same rows),
    the last rows' outputs and logits within the fast path's bounds of the full forward's
    (float32: 2e-6; with rounding: judged against the float64 reference run, as above)."""
    full = catchup_scenario(triton(build(dtype, rounding)), dtype, chunk_rows, monkeypatch)
    last = catchup_scenario(triton(build(dtype, rounding)), dtype, chunk_rows, monkeypatch,
                            last_only=True)
    assert torch.equal(last[2], full[2]) and torch.equal(last[3], full[3])
    got, want = [last[0], last[1]], [full[0][[128, 198]], full[1]]

    def truth():
        run = catchup_scenario(build(torch.float64, rounding), torch.float64, chunk_rows,
                               monkeypatch)
        return [run[0][[128, 198]], run[1]]
    assert_within_fast_path_bounds(got, want, dtype, rounding, truth)
