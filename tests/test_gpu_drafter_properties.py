"""The Drafter's properties (tests/test_drafter_properties.py) on the default CUDA path, where
each ``propose`` is one whole-call CUDA-graph replay; hypothesis draws the calls (derandomized,
conftest.py), several sequences at different positions each with its own row count and its
own accepted length.

Tolerances, with their reasons:
- two drafters that run the same arithmetic (the same bucket of sequences x rows per sequence,
  the same kernels, the same cache contents) must agree **bitwise**: rollback is tested that way
  (a drafter that drafted and one that never did: k draft steps against k = 1, which runs no
  draft step, so the real rows' step is the same graph program up to k);
- a sequence alone and the same sequence in a batch run other buckets, so other launch shapes
  (split-K of the products): float32 with the FP8 rounding steps off (with them on a 1-ulp
  difference can flip an e4m3 rounding), residuals and cached KV within 1e-5 relative (summation
  order through one layer and a few calls of cache reuse; tests/test_gpu_fast_path.py measures
  < 2e-6 per step) and every draft equal.
"""

from __future__ import annotations

import functools

import pytest
import torch
from drafter_helpers import TINY, live_entries, rel_err, same_entries
from drafter_helpers import model as cpu_model
from hypothesis import given, settings
from hypothesis import strategies as st

from mtp import DeepSeekV4MTP
from mtp.drafter import Drafter
from mtp.sampling import Sampling

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the "
                                "whole-call graphs and the Triton kernels run only there")
K = 3  # max_draft_tokens: up to K + 1 new rows per sequence stay inside the graph buckets
TOL = 1e-5  # float32, rounding off, other buckets: see the module docstring


@functools.cache
def module(rounding: bool) -> DeepSeekV4MTP:
    """The tiny released-format module of tests/drafter_helpers.py, in float32 on the GPU with
    the triton backend (what ``backend="auto"`` picks there)."""
    src = cpu_model(torch.float32, rounding=rounding)
    m = DeepSeekV4MTP(TINY, dtype=torch.float32, numerics=src.numerics, device="cuda")
    m.load_state_dict(src.state_dict())
    return m


def graphed(rounding: bool = True, max_seqs: int = 4) -> Drafter:
    d = Drafter(module(rounding), max_seqs=max_seqs, max_draft_tokens=K, cuda_graphs=True)
    assert d._whole_call_graphs() is not None
    return d


def rows(n: int, seed: int, start: int):
    """n target rows at positions start .. start+n-1, on the GPU: (hidden, next ids, positions)."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, TINY.hc_dim, generator=gen)
    ids = torch.randint(0, TINY.vocab_size, (n,), generator=gen)
    return h.cuda(), ids.cuda(), torch.arange(start, start + n).cuda()


def call(drafter: Drafter, seqs: list[int], parts: list, k: int, sampling=None):
    """One propose over several sequences, rows flattened in the order of ``seqs``."""
    h, ids, pos = (torch.cat(t) for t in zip(*parts))
    kw = {} if sampling is None else {"sampling": sampling}
    return drafter.propose(seqs, h, ids, pos, [p[0].shape[0] for p in parts], k=k, **kw).check()


@st.composite
def rounds(draw):
    """1-3 sequences at positions 0-40, each with 1 .. K + 1 new rows, k, and per sequence an
    accepted length a <= k."""
    s = draw(st.integers(1, 3))
    starts = draw(st.lists(st.integers(0, 40), min_size=s, max_size=s))
    counts = draw(st.lists(st.integers(1, K + 1), min_size=s, max_size=s))
    k = draw(st.integers(2, K))
    accepted = draw(st.lists(st.integers(0, k), min_size=s, max_size=s))
    return starts, counts, k, accepted


@settings(max_examples=12)
@given(r=rounds(), seed=st.integers(0, 2**31 - 1), sampled=st.booleans(),
       k2=st.integers(1, K))
def test_graphed_rollback_is_exact(r, seed, sampled, k2):
    """Draft k, accept any a <= k per sequence, re-feed the a + 1 verified rows (the accepted
    drafts, then the target's token): the cache (every entry a later window can see) and the
    next call's drafts and residuals equal, bitwise, those of a drafter that never drafted."""
    starts, counts, k, accepted = r
    seqs = list(range(len(starts)))
    drafting, never = graphed(), graphed()
    for d in (drafting, never):
        for s in seqs:
            d.add_sequence(s, position=starts[s])
    first = [rows(counts[s], seed + s, starts[s]) for s in seqs]
    sampling = Sampling(temperature=1.0, generator=torch.Generator("cuda").manual_seed(seed)) \
        if sampled else None
    p = call(drafting, seqs, first, k, sampling)
    call(never, seqs, first, 1)  # k = 1: the real rows' step alone, no draft entries

    second = []
    for s in seqs:
        a, start = accepted[s], starts[s] + counts[s]
        h, ids, pos = rows(a + 1, seed + 10 + s, start)
        ids = torch.cat((p.drafts[s, :a], ids[a:]))  # the accepted drafts, then the target's
        second.append((h, ids, pos))
    pa, pb = call(drafting, seqs, second, k2), call(never, seqs, second, k2)
    assert torch.equal(pa.drafts, pb.drafts) and torch.equal(pa.hidden, pb.hidden)
    for s in seqs:
        assert drafting.next_position(s) == never.next_position(s) == \
            starts[s] + counts[s] + accepted[s] + 1
        assert same_entries(live_entries(drafting, s), live_entries(never, s))


@settings(max_examples=12)
@given(r=rounds(), seed=st.integers(0, 2**31 - 1),
       subset=st.lists(st.booleans(), min_size=3, max_size=3).filter(any))
def test_graphed_batching_is_invisible(r, seed, subset):
    """Sequences proposed together (one bucket of S sequences) equal each proposed alone (bucket
    1), over two calls (the second of a subset, after partial acceptance); a sequence left out
    of a call is untouched by it."""
    starts, counts, k, accepted = r
    seqs = list(range(len(starts)))
    later_seqs = [s for s in seqs if subset[s]] or seqs[:1]
    together = graphed(rounding=False)
    alone = [graphed(rounding=False, max_seqs=1) for _ in seqs]
    for s in seqs:
        together.add_sequence(s, position=starts[s])
        alone[s].add_sequence(s, position=starts[s])
    first = [rows(counts[s], seed + s, starts[s]) for s in seqs]
    second = {s: rows(accepted[s] + 1, seed + 10 + s, starts[s] + counts[s]) for s in seqs}
    for ids_in, parts in ((seqs, first), (later_seqs, [second[s] for s in later_seqs])):
        p = call(together, ids_in, parts, k)
        for j, s in enumerate(ids_in):
            solo = call(alone[s], [s], [parts[j]], k)
            assert torch.equal(p.drafts[j], solo.drafts[0])
            assert rel_err(p.hidden[j], solo.hidden[0]) < TOL
    for s in seqs:
        assert together.next_position(s) == alone[s].next_position(s)
        mine, theirs = live_entries(together, s), live_entries(alone[s], s)
        assert mine.keys() == theirs.keys()
        assert all(rel_err(mine[q], theirs[q]) < TOL for q in mine)
