"""``Drafter.use_cuda_graphs``: draft steps s >= 1 replayed from CUDA graphs give the same drafts
and the same cache as the eager fast path (the model's triton backend without graphs).

The GPU tests need a CUDA GPU (skipped otherwise, with the reason); the rest run on the CPU
(errors, and that importing ``mtp`` never imports Triton).

What is compared, and why so:
- drafts (greedy, and sampled with the same generator): equal. Eager draft steps go through
  the module's ``forward`` (the general sliding-window path), graph replays through its
  ``decode_step`` (one row per sequence): the same kernels but the attention gathers
  its keys by a different index path, so the draft residuals may differ in the last bit; a draft
  would change only at a near-tie of two logits (random weights: none in these cases).
- draft residuals: relative Frobenius error < 1e-5 (float32: summation order only) or < 2e-2
  (bfloat16: an ulp of difference can cross an FP8 activation rounding boundary, which moves
  one element by up to 2^-4 relative; the measured value is printed).
- the cache after a final ``feed`` (which drops every draft entry): real entries bit for bit,
  positions exactly: they depend only on real rows, which both run eagerly.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from mtp import DeepSeekV4MTP, MTPConfig, Numerics
from mtp.drafter import Drafter
from mtp.sampling import Sampling
from mtp.testing import init_random_

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: CUDA graphs and the Triton "
                                "fast path run only there")
TINY = MTPConfig.from_name("tiny")


def build(dtype, n_mtp=2, device="cuda"):
    cfg = MTPConfig(**{**TINY.__dict__, "num_nextn_predict_layers": n_mtp,
                       "mtp_compress_ratios": (0,) * n_mtp})
    src = init_random_(DeepSeekV4MTP(cfg, numerics=Numerics()), seed=0)
    m = DeepSeekV4MTP(cfg, dtype=dtype, numerics=Numerics(), device=device)
    m.load_state_dict(src.state_dict())
    return m


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def play(drafter, dtype, sampling_seed=None):
    """Rounds of proposals for subsets of 4 sequences (1, 2, 3, 4 at a time: bucket 1, bucket 2,
    more than the largest bucket -> eager), then a final feed. Returns drafts, residuals."""
    cfg = drafter.config
    g = torch.Generator().manual_seed(7)
    for s in range(4):
        drafter.add_sequence(s, position=3 * s)
    drafts, hidden = [], []
    for r, ids in enumerate([[0], [1, 2], [3], [0, 1, 2], [2, 3], [0, 1, 2, 3], [1]]):
        counts = [1 + (r + i) % (cfg.sliding_window + 2) for i in range(len(ids))]
        pos = torch.cat([torch.arange(drafter.next_position(s), drafter.next_position(s) + n)
                         for s, n in zip(ids, counts)])
        t = sum(counts)
        h = torch.randn(t, cfg.hc_dim, generator=g).to("cuda", dtype)
        nxt = torch.randint(0, cfg.vocab_size, (t,), generator=g).cuda()
        sampling = Sampling() if sampling_seed is None else Sampling(
            temperature=0.8, generator=torch.Generator("cuda").manual_seed(sampling_seed + r))
        p = drafter.propose(ids, h, nxt, pos.cuda(), counts, k=3, sampling=sampling)
        drafts.append(p.drafts)
        hidden.append(p.hidden)
    ids = [0, 1, 2, 3]
    pos = torch.tensor([drafter.next_position(s) for s in ids], device="cuda")
    h = torch.randn(4, cfg.hc_dim, generator=g).to("cuda", dtype)
    drafter.feed(ids, h, torch.randint(0, cfg.vocab_size, (4,), generator=g).cuda(), pos,
                 [1] * 4)
    return drafts, hidden


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sampled", [False, True])
def test_graphs_equal_eager(dtype, sampled):
    model = build(dtype)
    assert model.ops.name == "triton"  # backend "auto" on CUDA in the released format
    eager = Drafter(model, max_seqs=4, max_draft_tokens=3, cuda_graphs=False)
    graphs = Drafter(model, max_seqs=4, max_draft_tokens=3, cuda_graphs=False)
    graphs.use_cuda_graphs(buckets=(1, 2))  # draft-step graphs only
    assert len(graphs._graphs) == 2  # one DraftStepGraphs per MTP layer
    seed = 11 if sampled else None
    d_e, h_e = play(eager, dtype, seed)
    d_g, h_g = play(graphs, dtype, seed)
    for a, b in zip(d_g, d_e):
        assert torch.equal(a, b)
    err = max(rel(a, b) for a, b in zip(h_g, h_e))
    print(f"\n{dtype} sampled={sampled}: draft residuals, graphs vs eager: max rel {err:.2e} "
          f"(bit-identical: {all(torch.equal(a, b) for a, b in zip(h_g, h_e))})")
    assert err < (1e-5 if dtype == torch.float32 else 2e-2)
    held = eager.cache.pos >= 0
    assert torch.equal(eager.cache.pos, graphs.cache.pos)
    assert torch.equal(eager.cache.kv[held], graphs.cache.kv[held])


@needs_cuda
def test_graphs_timing_and_reset():
    """A k = 3 proposal at batch 1, eager fast path vs graphs (tiny shapes: launch-bound, so
    this shows the host cost removed, not the Flash figure: see docs/performance.md)."""
    model = build(torch.bfloat16, n_mtp=1)
    cfg = model.config
    ms = {}
    for use in (False, True):
        d = Drafter(model, max_seqs=1, max_draft_tokens=3, cuda_graphs=False)
        if use:
            d.use_cuda_graphs(buckets=(1,))
        d.add_sequence("a")
        times = []
        for _ in range(30):
            pos = torch.tensor([d.next_position("a")], device="cuda")
            h = torch.randn(1, cfg.hc_dim, device="cuda", dtype=torch.bfloat16)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            d.propose(["a"], h, torch.tensor([5], device="cuda"), pos, [1], k=3)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        ms[use] = sorted(times[5:])[len(times[5:]) // 2] * 1e3
    print(f"\ntiny, batch 1, k = 3 proposal: eager {ms[False]:.2f} ms, graphs {ms[True]:.2f} ms")
    d.accelerator = None  # a new accelerator drops the graphs
    assert d._graphs is None


@needs_cuda
def test_use_cuda_graphs_rejects_bad_arguments():
    model = build(torch.bfloat16, n_mtp=1)
    d = Drafter(model, max_seqs=2)
    with pytest.raises(ValueError, match="buckets"):
        d.use_cuda_graphs(buckets=(0, 2))
    with pytest.raises(ValueError, match="buckets"):
        d.use_cuda_graphs(buckets=())

    class Other:
        def forward(self, *a, **k):
            return model.forward(*a, **k)

        def compute_logits(self, *a, **k):
            return model.compute_logits(*a, **k)

    other = Other()
    with pytest.warns(DeprecationWarning, match="Drafter.accelerator is deprecated"):
        d.accelerator = other
    with pytest.raises(ValueError, match="TritonMTP"):
        d.use_cuda_graphs()
    assert d.accelerator is other and d._graphs is None  # unchanged


@needs_cuda
def test_cli_bench_graphs(capsys):
    from mtp.cli import EXIT_OK, main
    code = main(["bench", "--batch", "1", "2", "--repeats", "2", "--device", "cuda",
                 "--kernels", "triton", "--graphs"])
    out = capsys.readouterr().out
    assert code == EXIT_OK and "CUDA graphs" in out


def test_use_cuda_graphs_on_cpu_is_a_clear_error():
    d = Drafter(build(torch.float32, n_mtp=1, device="cpu"), max_seqs=1)
    with pytest.raises(RuntimeError, match="need a CUDA device"):
        d.use_cuda_graphs()
    assert d.accelerator is d.model and d._graphs is None


def test_cli_graphs_on_cpu_is_an_error(capsys):
    from mtp.cli import EXIT_ERROR, main
    code = main(["bench", "--batch", "1", "--repeats", "1", "--warmup", "0", "--device", "cpu",
                 "--graphs"])
    out, err = capsys.readouterr()
    assert code == EXIT_ERROR
    assert "+ CUDA graphs" in out and "need a CUDA device" in err


def test_importing_mtp_imports_no_triton():
    code = ("import sys, mtp, mtp.drafter, mtp.cli; "
            "assert 'triton' not in sys.modules and 'mtp_kernels' not in sys.modules, "
            "sorted(m for m in sys.modules if 'triton' in m or 'kernels' in m)")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- the whole-call graphs (cuda_graphs=True): a call is one graph replay -----------------
# Compared with the eager path (the same module, same triton ops, cuda_graphs=False) and with
# the module's reference ops. Tolerances, with their reasons:
# - the graph runs the real rows through decode_step over padded buckets (S x R rows), the
#   eager path through forward over exactly T rows: the same kernels, but the row count picks
#   some launch shapes (split-K of the products), so sums may round differently. float32: every
#   draft equal, residuals and cached KV within 1e-5 relative (summation order). bfloat16: an
#   ulp can cross an FP8 activation rounding boundary (one e4m3 step, up to 2^-3 of that
#   element, carried through every later product of the call), so neither path is nearer the
#   other than to the truth: both are judged against the same loop run in float64 (reference
#   ops), the graphs held to 1.5x the eager path's error plus 1e-3 (the bound of the fast path's
#   own tests), drafts to >= 90% agreement with the eager path (a near-tie flip changes that
#   sequence's later drafts; the measured share is printed).
# - positions in the cache: equal exactly (they depend on the row counts only).


def gpu_loop(drafters, dtype, seed=0, k=3, rounds=8):
    """A randomized loop of 4 sequences at different positions through each drafter with the
    same inputs: rounds of 1-4 of them with 1 .. k + 1 new rows each (accepted drafts + the
    bonus) and 1 .. k drafts, round 3 a catch-up longer than the window (graphed: the window
    bucket, its earlier rows checked only; every row's key written by ``write_keys``).
    Returns, per drafter, the list of Proposals."""
    cfg = drafters[0].config
    gen = torch.Generator().manual_seed(seed)
    for d in drafters:
        for s in range(4):
            d.add_sequence(s, position=5 * s)
    out = [[] for _ in drafters]
    for r in range(rounds):
        ids = torch.randperm(4, generator=gen)[:int(torch.randint(1, 5, (1,), generator=gen))]
        ids = ids.tolist()
        top = cfg.sliding_window + 3 if r == 3 else k + 1  # round 3 (seed 0): 1, 9, 11 rows
        counts = [int(torch.randint(1, top + 1, (1,), generator=gen)) for _ in ids]
        kr = int(torch.randint(1, k + 1, (1,), generator=gen))
        t = sum(counts)
        h = torch.randn(t, cfg.hc_dim, generator=gen).to("cuda", dtype)  # dtype's values
        nxt = torch.randint(0, cfg.vocab_size, (t,), generator=gen).cuda()
        first = drafters[0]
        pos = torch.cat([torch.arange(first.next_position(s), first.next_position(s) + n)
                         for s, n in zip(ids, counts)]).cuda()
        for d, o in zip(drafters, out):
            o.append(d.propose(ids, h.to(d.model.dtype), nxt, pos, counts, k=kr).check())
    for d in drafters[1:]:
        assert [d.next_position(s) for s in range(4)] == \
            [first.next_position(s) for s in range(4)]
    return out


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_drafter_equals_the_eager_path(dtype):
    model = build(dtype)
    graphed = Drafter(model, max_seqs=4, max_draft_tokens=3, cuda_graphs=True)
    eager = Drafter(model, max_seqs=4, max_draft_tokens=3, cuda_graphs=False)
    pg, pe = gpu_loop([graphed, eager], dtype)
    made = graphed._proposer.made
    assert any(r > 1 for _, r, *_ in made) and any(s > 1 for s, *_ in made), made.keys()
    assert any(r == model.config.sliding_window for _, r, *_ in made), made.keys()
    agree = torch.cat([(a.drafts == b.drafts).flatten() for a, b in zip(pg, pe)])
    err = max(rel(a.hidden[:, 0], b.hidden[:, 0]) for a, b in zip(pg, pe))
    # the real rows' entries (the last call's draft entries depend on its drafts)
    nxt = torch.full((eager.max_seqs,), -1, device="cuda")
    for s in eager.seq_ids:
        nxt[eager.slot(s)] = eager.next_position(s)
    held = (eager.cache.pos >= 0) & (eager.cache.pos < nxt[None, :, None])
    kv_err = rel(graphed.cache.kv[held], eager.cache.kv[held])
    print(f"\n{dtype}: graphs vs eager: drafts agree {agree.float().mean().item():.3f}, real "
          f"row residual max rel {err:.2e}, cached KV rel {kv_err:.2e}; buckets captured "
          f"{sorted(made)}")
    assert torch.equal(graphed.cache.pos, eager.cache.pos)
    if dtype == torch.float32:
        assert bool(agree.all()) and err < 1e-5 and kv_err < 1e-5
        return
    assert agree.float().mean() >= 0.9
    truth = Drafter(build(torch.float64), max_seqs=4, max_draft_tokens=3, cuda_graphs=False)
    pt, = gpu_loop([truth], dtype)
    for n, (a, b, t) in enumerate(zip(pg, pe, pt)):
        ga, eb = rel(a.hidden[:, 0], t.hidden[:, 0]), rel(b.hidden[:, 0], t.hidden[:, 0])
        print(f"call {n}: real-row residual rel error: graphs {ga:.2e}, eager {eb:.2e}")
        assert ga <= 1.5 * eb + 1e-3, (n, ga, eb)
    kv_g, kv_e = (rel(d.cache.kv[held], truth.cache.kv[held]) for d in (graphed, eager))
    assert kv_g <= 1.5 * kv_e + 1e-3, (kv_g, kv_e)


@needs_cuda
def test_graphed_drafter_equals_the_reference_ops():
    """float32 with the FP8 rounding steps off: the kernels differ from the reference ops in
    summation order only (tests/test_gpu_fast_path.py: < 2e-6 per step): every draft equal,
    residuals within 1e-4 relative after eight rounds of cache reuse."""
    num = Numerics(act_quant=False, kv_fp8=False)
    src = init_random_(DeepSeekV4MTP(TINY, numerics=num), seed=0)
    fast = DeepSeekV4MTP(TINY, dtype=torch.float32, numerics=num, device="cuda")
    ref = DeepSeekV4MTP(TINY, dtype=torch.float32, numerics=num, device="cuda",
                        backend="reference")
    fast.load_state_dict(src.state_dict())
    ref.load_state_dict(src.state_dict())
    graphed = Drafter(fast, max_seqs=4, max_draft_tokens=3, cuda_graphs=True)
    plain = Drafter(ref, max_seqs=4, max_draft_tokens=3)
    assert plain._whole_call_graphs() is None  # the reference ops run eagerly
    pg, pr = gpu_loop([graphed, plain], torch.float32, seed=1)
    err = max(rel(a.hidden, b.hidden) for a, b in zip(pg, pr))
    print(f"\ngraphs (triton) vs reference ops, float32: residuals max rel {err:.2e}")
    assert all(torch.equal(a.drafts, b.drafts) for a, b in zip(pg, pr))
    assert err < 1e-4 and torch.equal(graphed.cache.pos, plain.cache.pos)


def _on_cuda(call: dict) -> dict:
    out = {}
    for key, v in call.items():
        if isinstance(v, torch.Tensor) and v.device.type == "cpu":
            v = v.cuda()
        elif isinstance(v, Sampling):
            v = Sampling(*(x.cuda() if isinstance(x, torch.Tensor) else x
                           for x in (v.temperature, v.top_p)), v.generator)
        out[key] = v
    return out


def _bad_cases():
    from test_drafter_properties import BAD
    cases = dict(BAD)
    for name, value in (("nan", float("nan")), ("inf", float("inf")), ("huge", 1e7)):
        def brk(c, value=value):
            h = c["hidden_states"].clone()
            h[1, 3] = value
            return {**c, "hidden_states": h}
        cases[f"hidden {name}"] = (brk, ValueError, "hidden_states: row 1 holds")
    return cases


DEFERRED_ON_GPU = {"position going backwards", "gap", "not consecutive",
                   "id outside the vocabulary", "hidden nan", "hidden inf", "hidden huge",
                   "float16 row that rounds to inf", "bad temperature", "bad top_p"}


@needs_cuda
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("case", sorted(_bad_cases()))
def test_gpu_refusals_change_nothing(case, graphs):
    """Every refusal on the GPU drafter, eager (the default) and with whole-call graphs: host
    checks at the call, value checks on the device and raised at the next call (both paths);
    either way the drafter is bitwise as before."""
    from drafter_helpers import assert_same_state, snapshot
    from test_drafter_properties import _good
    model = build(torch.float32, n_mtp=1)
    d = Drafter(model, max_seqs=4, max_draft_tokens=4, cuda_graphs=graphs)
    g = torch.Generator().manual_seed(0)
    for name, start, n in (("a", 0, 5), ("b", 1, 2), ("idle", 0, 4)):
        d.add_sequence(name, position=start)
        h = torch.randn(n, TINY.hc_dim, generator=g).cuda()
        ids = torch.randint(0, TINY.vocab_size, (n,), generator=g).cuda()
        d.propose([name], h, ids, torch.arange(start, start + n).cuda(), [n], k=3)
    break_call, error, message = _bad_cases()[case]
    good_cpu = {**_good(), "hidden_states": _good()["hidden_states"].float()}
    good = _on_cuda(good_cpu)
    call = _on_cuda(break_call(dict(good_cpu)))  # broken on the CPU, as the CPU tests do
    if case.endswith(" device"):  # (the table's messages name the CPU drafter's device)
        message = message.replace("the drafter is on cpu", "the drafter is on cuda")
    before = snapshot(d)
    if case in DEFERRED_ON_GPU:
        d.propose(**call)
        with pytest.raises(error, match=message) as info:
            d.propose(**good)
        assert "found on the GPU after propose(['a', 'b']) returned" in str(info.value)
    else:
        with pytest.raises(error, match=message):
            d.propose(**call)
    assert_same_state(before, snapshot(d))
    assert d.propose(**good).check().drafts.shape == (2, 2)


@needs_cuda
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("graphs", [False, True])
def test_gpu_nan_logits_are_refused_at_the_next_synchronisation(graphs, sampled, fused,
                                                                monkeypatch):
    """Finite inputs, NaN logits (a NaN in the head norm), eager and graphed, greedy and
    sampled: the call returns without waiting, the next synchronisation raises "logits: hold
    NaN" with the next position put back, and the drafter then drafts exactly as a twin that
    never saw the call. The eager path puts its cache slots back bit for bit; the graphed path
    drops the call's entries (positions equal to the twin's where they can still be read).
    The NaN bit set in the call's last launch (``fused``, the default) or by torch's ops."""
    import mtp_kernels.backend as be
    from drafter_helpers import assert_same_state, snapshot
    monkeypatch.setattr(be, "FINISH_IN_COPY", fused)
    model = build(torch.float32, n_mtp=1)
    norm = model.model.layers[str(TINY.num_hidden_layers)].shared_head.norm.weight
    keep = norm.clone()
    g = torch.Generator().manual_seed(2)
    h = torch.randn(9, TINY.hc_dim, generator=g).cuda()
    ids = torch.randint(0, TINY.vocab_size, (9,), generator=g).cuda()

    def sampling():
        return Sampling(temperature=0.8, top_p=0.9,
                        generator=torch.Generator("cuda").manual_seed(1)) if sampled \
            else Sampling()

    d, twin = (Drafter(model, max_seqs=2, max_draft_tokens=3, cuda_graphs=graphs)
               for _ in range(2))
    for x in (d, twin):
        x.add_sequence("a")
        x.propose(["a"], h[:4], ids[:4], torch.arange(4).cuda(), [4], k=3,
                  sampling=sampling()).check()
    before = snapshot(d)
    norm[0] = float("nan")
    try:
        p = d.propose(["a"], h[4:6], ids[4:6], torch.arange(4, 6).cuda(), [2], k=3,
                      sampling=sampling())
        assert d.next_position("a") == 6
        with pytest.raises(ValueError, match=r"logits: hold NaN .*found on the GPU after "
                                             r"propose\(\['a'\]\) returned"):
            p.check()
    finally:
        norm.copy_(keep)
    assert d.next_position("a") == 4 and d.seq_ids == ["a"]
    if not graphs:
        assert_same_state(before, snapshot(d))
    pa = d.propose(["a"], h[4:7], ids[4:7], torch.arange(4, 7).cuda(), [3], k=3,
                   sampling=sampling()).check()
    pb = twin.propose(["a"], h[4:7], ids[4:7], torch.arange(4, 7).cuda(), [3], k=3,
                      sampling=sampling()).check()
    # the same calls on the same kernels; 1e-6 relative (not bitwise) leaves room for a library
    # (cuBLAS) picking another algorithm for the twin's separate graphs: float32 reordering
    assert torch.equal(pa.drafts, pb.drafts) and rel(pa.hidden, pb.hidden) < 1e-6


@needs_cuda
def test_gpu_sampling_functions_refuse_nan_logits():
    """On CUDA as on the CPU: sample, probs and verify_greedy raise naming the argument (one
    synchronisation each); with check_nan=False a NaN row still draws a token in range and
    nothing fails on the device (torch.multinomial never sees the NaN row), and nan_flag
    says so when read."""
    from mtp.sampling import nan_flag, probs, sample
    from mtp.verify import verify_greedy
    logits = torch.tensor([[0.0, 2.0, 1.0], [float("nan"), 0.0, 0.0]], device="cuda")
    sampled = Sampling(temperature=1.0, generator=torch.Generator("cuda").manual_seed(0))
    for call in (lambda: sample(logits), lambda: sample(logits, sampled),
                 lambda: probs(logits, sampled)):
        with pytest.raises(ValueError, match="logits: holds NaN"):
            call()
    with pytest.raises(ValueError, match="target_logits: holds NaN"):
        verify_greedy(logits[None], torch.tensor([[1]], device="cuda"))
    flag = nan_flag(logits)
    tokens, q = sample(logits, sampled, check_nan=False)
    assert flag.device.type == "cuda" and bool(flag)
    assert int(tokens[1]) == 0 and 0 <= int(tokens[0]) < 3 and torch.isnan(q[1]).all()
    torch.cuda.synchronize()  # no device-side assertion fired


@needs_cuda
def test_graphed_call_does_not_wait_for_the_gpu():
    """With the GPU busy (a sleeping kernel queued first), a graphed propose returns while the
    queue still runs: no host synchronisation. Also prints the first call's capture time and
    the host time per call."""
    model = build(torch.bfloat16, n_mtp=1)
    d = Drafter(model, max_seqs=2, max_draft_tokens=3, cuda_graphs=True)
    d.add_sequence("a")
    h = torch.randn(1, TINY.hc_dim, device="cuda", dtype=torch.bfloat16)
    ids = torch.tensor([5], device="cuda")
    t0 = time.perf_counter()
    d.propose(["a"], h, ids, torch.tensor([0], device="cuda"), [1], k=3).check()
    capture = time.perf_counter() - t0
    host = []
    for i in range(1, 21):
        pos = torch.tensor([i], device="cuda")
        torch.cuda.synchronize()
        torch.cuda._sleep(50_000_000)  # ~25 ms of GPU time queued ahead
        t0 = time.perf_counter()
        d.propose(["a"], h, ids, pos, [1], k=3)
        host.append(time.perf_counter() - t0)
        assert not torch.cuda.current_stream().query(), "propose waited for the GPU"
    d.synchronize()
    print(f"\ntiny bf16 batch 1: first call (capture) {capture * 1e3:.0f} ms; host time per "
          f"graphed call {sorted(host)[len(host) // 2] * 1e6:.0f} us (median, GPU busy)")


@needs_cuda
def test_sampled_calls_replay_graphs_too():
    """Temperature / top-p drafting through the whole-call graph (float32): d_1's q equals the
    eager path's within 1e-5 (the logits differ by summation order, ~1e-6 relative), every
    draft lies where its q > 0 (inside the nucleus), the same seed gives the same drafts, and
    positions in the cache agree with the eager path's."""
    model = build(torch.float32, n_mtp=1)
    out = []
    for _ in range(2):
        graphed = Drafter(model, max_seqs=4, max_draft_tokens=3, cuda_graphs=True)
        eager = Drafter(model, max_seqs=4, max_draft_tokens=3, cuda_graphs=False)
        g = torch.Generator().manual_seed(4)
        h = torch.randn(5, TINY.hc_dim, generator=g).cuda()
        ids = torch.randint(0, TINY.vocab_size, (5,), generator=g).cuda()
        pos = torch.tensor([2, 3, 4, 0, 1], device="cuda")
        props = []
        for d in (graphed, eager):
            d.add_sequence("a", position=2)
            d.add_sequence("b")
            s = Sampling(temperature=0.7, top_p=0.6,
                         generator=torch.Generator("cuda").manual_seed(3))
            props.append(d.propose(["a", "b"], h, ids, pos, [3, 2], k=3, sampling=s).check())
        pg, pe = props
        assert (pg.probs[:, 0] - pe.probs[:, 0]).abs().max() < 1e-5
        assert bool((pg.probs.gather(2, pg.drafts[:, :, None]) > 0).all())
        assert torch.equal(graphed.cache.pos, eager.cache.pos)
        assert any(m == "top_p" for *_, m in graphed._proposer.made)
        out.append(pg.drafts)
    assert torch.equal(out[0], out[1])


@needs_cuda
def test_per_sequence_temperature_replays_graphs_too():
    """A per-sequence temperature tensor (one row greedy, one sampled; then both 0; float32)
    through the whole-call graph of the sampled program: d_1's q equals the eager path's
    within 1e-5 (as above), the greedy row's q is one-hot and its drafts are the eager
    path's; then a bad value is refused at the next call, the drafter as before."""
    from drafter_helpers import assert_same_state, snapshot
    model = build(torch.float32, n_mtp=1)
    g = torch.Generator().manual_seed(6)
    h = torch.randn(5, TINY.hc_dim, generator=g).cuda()
    ids = torch.randint(0, TINY.vocab_size, (5,), generator=g).cuda()
    pos = torch.tensor([2, 3, 4, 0, 1], device="cuda")
    for temps in ([0.0, 0.7], [0.0, 0.0]):
        graphed = Drafter(model, max_seqs=4, max_draft_tokens=3, cuda_graphs=True)
        eager = Drafter(model, max_seqs=4, max_draft_tokens=3, cuda_graphs=False)
        props = []
        for d in (graphed, eager):
            d.add_sequence("a", position=2)
            d.add_sequence("b")
            s = Sampling(temperature=torch.tensor(temps, device="cuda"),
                         generator=torch.Generator("cuda").manual_seed(3))
            props.append(d.propose(["a", "b"], h, ids, pos, [3, 2], k=3, sampling=s).check())
        pg, pe = props
        assert torch.equal(pg.drafts[0], pe.drafts[0])  # temperature 0: the argmax
        assert (pg.probs[:, 0] - pe.probs[:, 0]).abs().max() < 1e-5
        assert bool((pg.probs[0].max(dim=-1).values == 1).all())
        assert {m for *_, m in graphed._proposer.made} == {"sample"}
        assert torch.equal(graphed.cache.pos, eager.cache.pos)
    for d in (graphed, eager):  # a NaN temperature: refused on the device, at the next call
        before = snapshot(d)
        h2 = torch.randn(2, TINY.hc_dim, generator=g).cuda()
        args = (["a", "b"], h2, ids[:2], torch.tensor([5, 2], device="cuda"), [1, 1])
        bad = Sampling(temperature=torch.tensor([0.5, float("nan")], device="cuda"))
        d.propose(*args, k=3, sampling=bad)
        with pytest.raises(ValueError, match=r"Sampling.temperature: value nan is out of "
                                             r"range.*found on the GPU after propose"):
            d.synchronize()
        assert_same_state(before, snapshot(d))


@needs_cuda
@pytest.mark.parametrize("rows", [1, 6])
def test_argmax_kernel_and_pdl_by_sequences_change_no_bit(rows, monkeypatch):
    """Two switches, on by default since measured inside the graphs: the greedy pick by
    ``kernels/argmax.py`` (``backend.ARGMAX_KERNEL``) and a bucket's programmatic dependent
    launch chosen by its sequences (``propose_graph.PDL_BY_SEQS``: a catch-up of 3 x 6 rows
    then takes PDL). A drafter captured with both on gives the drafts, residuals, cache and
    positions of one with both off (torch.max's pick, PDL by all rows), bit for bit (the pick
    is torch.max's, PDL only moves launches), and the kernel ran only where on."""
    import mtp_kernels.backend as be
    import mtp_kernels.propose_graph as pg
    model = build(torch.bfloat16, n_mtp=1)
    g = torch.Generator().manual_seed(11)
    s = 3
    h = torch.randn(s * rows, TINY.hc_dim, generator=g).to(torch.bfloat16).cuda()
    nxt = torch.randint(0, TINY.vocab_size, (s * rows,), generator=g).cuda()
    pos = torch.cat([torch.arange(rows) + 5 * i for i in range(s)]).cuda()
    picks = []
    kernel = be.argmax_k.argmax_rows
    monkeypatch.setattr(be.argmax_k, "argmax_rows",
                        lambda x, **kw: picks.append(1) or kernel(x, **kw))
    out = []
    for on in (False, True):
        monkeypatch.setattr(be, "ARGMAX_KERNEL", on)
        monkeypatch.setattr(pg, "PDL_BY_SEQS", on)
        d = Drafter(model, max_seqs=4, max_draft_tokens=3, cuda_graphs=True)
        for i in range(s):
            d.add_sequence(i, position=5 * i)
        p = d.propose(list(range(s)), h, nxt, pos, [rows] * s, k=3).check()
        assert len(d._proposer.made) == 1  # one graphed bucket
        out.append((p.drafts.clone(), p.hidden.clone(), d.cache.kv.clone(), d.cache.pos.clone()))
        assert bool(picks) == on
    for a, b in zip(*out):
        assert torch.equal(a, b)


@needs_cuda
@pytest.mark.parametrize("rows", [1, 6])
def test_the_calls_first_and_last_launches_and_comb_apart_change_no_bit(rows, monkeypatch):
    """Three switches, on by default: hc_pre's post and comb made on the side stream
    (``backend.COMB_APART``), the staged record read and the error word written by kernels
    where the host buffers are mapped (``MAPPED_HOST``) and the NaN bit in the call's last
    launch (``FINISH_IN_COPY``). A graphed drafter with all on gives the drafts, residuals,
    cache and positions of one with all off, bit for bit, over two calls (the second after a
    partial acceptance, a catch-up after 6 rows); with them on the host buffers were mapped
    and the comb kernel ran, off neither."""
    import mtp_kernels.backend as be
    import mtp_kernels.hc as hc_k
    model = build(torch.bfloat16, n_mtp=1)
    g = torch.Generator().manual_seed(12)
    s = 3
    n = max(s * rows, 6)
    h = torch.randn(n, TINY.hc_dim, generator=g).to(torch.bfloat16).cuda()
    nxt = torch.randint(0, TINY.vocab_size, (n,), generator=g).cuda()
    pos = torch.cat([torch.arange(rows) + 5 * i for i in range(s)]).cuda()
    combs = []
    kernel = hc_k.hc_comb_kernel

    class Counted:  # hc_comb_kernel[grid](...) counted
        def __getitem__(self, grid):
            combs.append(grid)
            return kernel[grid]
    monkeypatch.setattr(hc_k, "hc_comb_kernel", Counted())
    out = []
    for on in (False, True):
        for name in ("COMB_APART", "MAPPED_HOST", "FINISH_IN_COPY"):
            monkeypatch.setattr(be, name, on)
        combs.clear()
        d = Drafter(model, max_seqs=4, max_draft_tokens=3, cuda_graphs=True)
        for i in range(s):
            d.add_sequence(i, position=5 * i)
        ids = list(range(s))
        p = d.propose(ids, h[:s * rows], nxt[:s * rows], pos, [rows] * s, k=3).check()
        first = (p.drafts.clone(), p.hidden.clone())
        counts = [2, 1, 3]  # 1, 0 and 2 drafts accepted, and the bonus row: a partial rollback
        nxt_pos = torch.cat([torch.arange(c) + d.next_position(i)
                             for i, c in zip(ids, counts)]).cuda()
        p = d.propose(ids, h[:6], nxt[:6], nxt_pos, counts, k=3).check()
        out.append((*first, p.drafts.clone(), p.hidden.clone(), d.cache.kv.clone(),
                    d.cache.pos.clone()))
        progs = list(d._proposer.made.values())
        assert progs and all((c.program._host_at is not None) == on for c in progs)
        assert bool(combs) == on
    for a, b in zip(*out):
        assert torch.equal(a, b)


@needs_cuda
@pytest.mark.parametrize("graphs", [False, True])
def test_take_rows_kernel_changes_no_bit(graphs, monkeypatch):
    """``backend.TAKE_ROWS_KERNEL`` (each sequence's last rows of a catch-up's per-row tensors
    in one launch of ``kernels/rows.py``, not an ``index_select`` each) gives the drafts,
    residuals, cache and positions of the index_selects, bit for bit (both copy bytes), in a
    catch-up of 3 x 6 rows, eager and graphed; the kernel ran only where on, at least twice
    a call (the attention's rows, the block's)."""
    import mtp_kernels.backend as be
    model = build(torch.bfloat16, n_mtp=1)
    g = torch.Generator().manual_seed(12)
    s, rows = 3, 6
    h = torch.randn(s * rows, TINY.hc_dim, generator=g).to(torch.bfloat16).cuda()
    nxt = torch.randint(0, TINY.vocab_size, (s * rows,), generator=g).cuda()
    pos = torch.cat([torch.arange(rows) + 5 * i for i in range(s)]).cuda()
    takes = []
    kernel = be.rows_k.take_rows
    monkeypatch.setattr(be.rows_k, "take_rows", lambda *a: takes.append(1) or kernel(*a))
    out = []
    for on in (False, True):
        monkeypatch.setattr(be, "TAKE_ROWS_KERNEL", on)
        takes.clear()
        d = Drafter(model, max_seqs=4, max_draft_tokens=3, cuda_graphs=graphs)
        for i in range(s):
            d.add_sequence(i, position=5 * i)
        p = d.propose(list(range(s)), h, nxt, pos, [rows] * s, k=3).check()
        out.append((p.drafts.clone(), p.hidden.clone(), d.cache.kv.clone(), d.cache.pos.clone()))
        assert len(takes) >= 2 if on else not takes
    for a, b in zip(*out):
        assert torch.equal(a, b)
