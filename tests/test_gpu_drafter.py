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
    eager = Drafter(model, max_seqs=4, max_draft_tokens=3)
    graphs = Drafter(model, max_seqs=4, max_draft_tokens=3)
    graphs.use_cuda_graphs(buckets=(1, 2))
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
        d = Drafter(model, max_seqs=1, max_draft_tokens=3)
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
