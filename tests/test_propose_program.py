"""The whole-call program (``mtp.propose_program``: what a CUDA graph captures for a greedy
``Drafter.propose``) run eagerly on the CPU with the reference ops, against the drafter's eager
path: the bucketing and padding, the rows at the end of each block, the rollback on the device,
and the device-side checks with their deferred errors. The GPU tests
(tests/test_gpu_drafter.py) run the same against the captured graphs.

Tolerance: the module in float64 (every FP8 rounding step on). The program runs the real rows
through ``decode_step`` (keys gathered by position from the cache, the head over each
sequence's last row only) where the eager path runs ``forward`` then ``compute_logits``: the same
operations on the same values, so drafts must be equal and residuals within 1e-12 relative
(float64 summation order at most); cache positions equal, cached KV within 1e-12.
"""

from __future__ import annotations

import math
import os
import re
import sys
import types
import warnings

import pytest
import torch
from drafter_helpers import (
    TINY,
    W,
    assert_same_state,
    bucket_rows,
    drafter,
    rel_err,
    rows,
    snapshot,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from test_drafter_properties import BAD, _good
from test_eager_deferred import deferred

from mtp import DeepSeekV4MTP, Numerics
from mtp.drafter import MAX_ABS_HIDDEN, Drafter
from mtp.ops import REFERENCE
from mtp.propose_program import MODES, ProposeBuckets, ProposeProgram, draw
from mtp.sampling import Sampling
from mtp.testing import CountOps, host_only, init_random_

TOL = 1e-12


def programmed(d: Drafter) -> Drafter:
    """``d`` with its calls through the whole-call programs, run eagerly (what the GPU
    replays as graphs), and its value checks on the device as on CUDA (a call too large for
    a bucket takes the eager path with its checks deferred)."""
    d._proposer = ProposeBuckets(d.model, d.cache, *d._buckets(), MAX_ABS_HIDDEN)
    d._defer_checks = True
    return d


def held_kv_close(a: Drafter, b: Drafter) -> bool:
    held = a.cache.pos >= 0
    return torch.equal(a.cache.pos, b.cache.pos) and \
        rel_err(a.cache.kv[held], b.cache.kv[held]) < TOL


def test_buckets():
    d = drafter(max_seqs=5, max_draft_tokens=4)
    # rows: powers of two up to the window (a catch-up), k + 1 = 5 (a call between
    # verifications) and W = 8
    assert W == 8 and d._buckets() == ((1, 2, 4, 5), (1, 2, 4, 5, 8))
    assert d._max_bucket_rows() >= 5 * 5  # every call between verifications fits
    b = ProposeBuckets(d.model, d.cache, (1, 2, 4), (1, 2, 5), MAX_ABS_HIDDEN)
    assert b.bucket(3, 3) == (4, 5) and b.bucket(5, 1) is None and b.bucket(1, 6) is None
    capped = ProposeBuckets(d.model, d.cache, (1, 2, 4), (1, 2, 5), MAX_ABS_HIDDEN, max_rows=8)
    assert capped.bucket(4, 2) == (4, 2) and capped.bucket(2, 5) is None
    # a call no bucket holds gets no runner (the drafter runs it eagerly); nothing is made
    assert b.get(5, 1, 2) is None and capped.get(2, 5, 2) is None and not b.made
    prog = ProposeProgram(d.model, d.cache, 4, 5, 2, MAX_ABS_HIDDEN)
    # each sequence's rows at the end of its block
    assert bucket_rows(prog.rows, [2, 5, 1]) == [3, 4, 5, 6, 7, 8, 9, 14]
    prog = ProposeProgram(d.model, d.cache, 2, W, 2, MAX_ABS_HIDDEN)
    assert bucket_rows(prog.rows, [W + 3, 1]) == list(range(W)) + [2 * W - 1]  # last W of 11
    with pytest.raises(ValueError, match="exceed the window"):  # rows <= min(capacity, W)
        ProposeProgram(d.model, d.cache, 1, W + 1, 2, MAX_ABS_HIDDEN)


@st.composite
def staged_calls(draw, seqs: int, rows: int, slots: int):
    """A run of calls for one bucket: each the last call's sequences and row counts again
    (new starts: a decode loop's usual call) or new ones (1 .. seqs distinct slots, 1 .. rows
    rows each)."""
    calls = []
    for _ in range(draw(st.integers(1, 8))):
        if calls and draw(st.booleans()):
            s, c = calls[-1][0], calls[-1][2]
        else:
            s = draw(st.lists(st.integers(0, slots - 1), min_size=1, max_size=seqs,
                              unique=True))
            c = draw(st.lists(st.integers(1, rows), min_size=len(s), max_size=len(s)))
        starts = draw(st.lists(st.integers(0, 10_000), min_size=len(s), max_size=len(s)))
        calls.append((list(s), starts, list(c)))
    return calls


@settings(max_examples=60, deadline=None)
@given(calls=staged_calls(seqs=3, rows=W + 3, slots=4))
def test_staging_writes_what_a_fresh_program_stages(calls):
    """A program that staged earlier calls holds, after each call, exactly the host record and
    the checks of the rows before each sequence's last W (``pre_error``: a sequence may bring
    up to W + 3 rows here, at positions that need not follow its start) that a program staging
    only that call holds (a call of the sequences and row counts already staged writes only
    its starts: the rest must still be right)."""
    d = drafter(max_seqs=4, max_draft_tokens=3)

    def program():
        return ProposeProgram(d.model, d.cache, 3, W, 2, MAX_ABS_HIDDEN)

    def same(a, b):
        return torch.equal(a.host, b.host) and torch.equal(a.pre_error, b.pre_error)

    prog = program()
    out = prog.new_out()
    for slots, starts, counts in calls:
        t = sum(counts)
        h, ids, pos = rows(t, seed=t)
        prog.stage(slots, starts, counts, ids, pos, h, out)
        fresh = program()
        fresh.stage(slots, starts, counts, ids, pos, h, out)
        assert same(prog, fresh), (slots, starts, counts)
    prog.clear()  # capture and warm-up's record: every sequence padding, nothing read
    fresh = program()
    assert torch.equal(prog.host, fresh.host)
    slots, starts, counts = calls[-1]  # the same call after a clear: written in full
    h, ids, pos = rows(sum(counts), seed=0)
    prog.stage(slots, starts, counts, ids, pos, h, out)
    fresh.stage(slots, starts, counts, ids, pos, h, out)
    assert same(prog, fresh)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(2, 4))
def test_program_equals_eager_over_a_loop_with_partial_acceptance(seed, k):
    """Four sequences at different positions, rounds of 1-4 of them with 1 .. k + 1 new rows
    each (accepted drafts + the bonus) and 1 .. k drafts, a catch-up round (longer than the
    window: the last W rows staged), rounds of the same sequences and counts as the round
    before (only their starts staged anew); the same loop through the eager path: drafts,
    residuals, cache (the draft entries dropped by the next call included) and positions
    agree."""
    gen = torch.Generator().manual_seed(seed)
    eager, prog = twin_drafters(4, spacing=3)
    last = None
    for r in range(9):
        top = W + 3 if r == 2 else k + 1  # round 2: a catch-up longer than the window
        again = last if r in (3, 5, 6) else None  # (3: the catch-up's again)
        ids, counts, h, nxt, pos = random_round(eager, gen, 4, top, seed + r, again)
        last = ids, counts
        kr = int(torch.randint(1, k + 1, (1,), generator=gen))  # fewer drafts: stale entries
        same_call(eager, prog, ids, h, nxt, pos, counts, kr, int32_ids=True)
    assert prog._proposer.made, "no call went through the programs"
    assert any(r > 1 for _, r, *_ in prog._proposer.made), "no multi-row bucket was used"


def test_each_proposal_owns_its_outputs():
    """A proposal's drafts and hidden live in its own buffer (the program writes them there at
    its end): the calls after it, in the same bucket, leave them as they were."""
    _, prog = twin_drafters(2, spacing=5)
    kept = []
    for r in range(3):  # one bucket: 2 sequences, 1 row each
        h, nxt, _ = rows(2, 40 + r)
        pos = torch.tensor([prog.next_position(0), prog.next_position(1)])
        p = prog.propose([0, 1], h, nxt, pos, [1, 1], k=2)
        kept.append((p, p.drafts.clone(), p.hidden.clone()))
    assert len(prog._proposer.made) == 1
    for p, drafts, hidden in kept:
        assert torch.equal(p.drafts, drafts) and torch.equal(p.hidden, hidden)


def twin_drafters(n: int, spacing: int) -> tuple[Drafter, Drafter]:
    """An eager drafter and one whose calls go through the programs, each holding sequences
    0 .. n - 1 at positions 0, spacing, 2 * spacing, ..."""
    eager, prog = drafter(), programmed(drafter())
    for d in (eager, prog):
        for s in range(n):
            d.add_sequence(s, position=spacing * s)
    return eager, prog


def random_round(d: Drafter, gen: torch.Generator, n: int, top: int, seed: int, again=None):
    """A call's arguments for 1 .. n of the n sequences (in random order), 1 .. top new rows
    each, or ``again``'s (ids, counts: a decode loop's next call of the same), continuing where
    ``d`` holds them -> (ids, counts, hidden, next ids, positions)."""
    if again is not None:
        ids, counts = again
    else:
        n_seqs = int(torch.randint(1, n + 1, (1,), generator=gen))
        ids = torch.randperm(n, generator=gen)[:n_seqs].tolist()
        counts = [int(torch.randint(1, top + 1, (1,), generator=gen)) for _ in ids]
    h, nxt, _ = rows(sum(counts), seed)
    pos = torch.cat([torch.arange(d.next_position(s), d.next_position(s) + c)
                     for s, c in zip(ids, counts)])
    return ids, counts, h, nxt, pos


def same_call(eager: Drafter, prog: Drafter, ids, h, nxt, pos, counts, k: int,
              int32_ids: bool = False) -> None:
    """The same propose through both drafters: drafts equal, residuals and cache within TOL
    (positions exactly), every sequence's next position equal."""
    pe = eager.propose(ids, h, nxt, pos, counts, k=k)
    pp = prog.propose(ids, h, nxt.to(torch.int32) if int32_ids else nxt, pos, counts, k=k)
    assert torch.equal(pe.drafts, pp.drafts), counts
    assert rel_err(pp.hidden, pe.hidden) < TOL
    assert held_kv_close(eager, prog)
    assert [eager.next_position(s) for s in eager.seq_ids] == \
        [prog.next_position(s) for s in prog.seq_ids]


DEFERRED = {  # checked on the device: the call returns, the next one raises
    "position going backwards", "gap", "not consecutive", "id outside the vocabulary",
    "float16 row that rounds to inf", "bad temperature", "bad top_p"}


@pytest.mark.parametrize("case", sorted(BAD))
def test_refusals_through_the_program_change_nothing(case):
    """Every refusal of the eager path, through the program: the host's checks raise at the
    call; the value checks raise at the next call with the same message, and either way the
    drafter is bitwise as before the refused call."""
    d = programmed(drafter())
    for name, start, n in (("a", 0, 5), ("b", 1, 2), ("idle", 0, 4)):
        d.add_sequence(name, position=start)
        h, ids, pos = rows(n, 3, start)
        d.propose([name], h, ids, pos, [n], k=3)
    break_call, error, message = BAD[case]
    call = break_call(_good())
    before = snapshot(d)
    if case in DEFERRED:
        d.propose(**call)  # returns: nothing was synchronised
        with pytest.raises(error, match=message) as info:
            d.propose(**_good())
        assert "found on the GPU after propose(['a', 'b']) returned" in str(info.value)
    else:
        with pytest.raises(error, match=message):
            d.propose(**call)
    assert_same_state(before, snapshot(d))
    assert d.propose(**_good()).drafts.shape == (2, 2)


@pytest.mark.parametrize("name, value", [
    ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", -0.5),
    ("top_p", float("nan")), ("top_p", 0.0), ("top_p", 1.5)])
@pytest.mark.parametrize("path", ["program", "eager"])
def test_sampling_values_out_of_range_are_refused_at_the_next_synchronisation(name, value,
                                                                             path):
    """A per-sequence setting out of range, with the checks on the device (CUDA's way):
    the call returns (a NaN row draws inside the vocabulary, no ``torch.multinomial``
    error), the next synchronisation names the value, and the drafter is bitwise as before
    the call; the next good call runs."""
    d = programmed(drafter()) if path == "program" else deferred(drafter())
    for seq, start, n in (("a", 0, 5), ("b", 1, 2)):
        d.add_sequence(seq, position=start)
        h, ids, pos = rows(n, 3, start)
        d.propose([seq], h, ids, pos, [n], k=3)
    before = snapshot(d)
    settings = {"temperature": torch.tensor([0.7, 0.7]), "top_p": torch.tensor([0.9, 0.9])}
    settings[name][1] = value
    call = {**_good(), "sampling": Sampling(**settings,
                                            generator=torch.Generator().manual_seed(0))}
    p = d.propose(**call)
    assert p.drafts.shape == (2, 2) and 0 <= int(p.drafts.min()) <= int(p.drafts.max()) \
        < TINY.vocab_size
    with pytest.raises(ValueError, match=rf"Sampling\.{name}: value {value} is out of range"
                                         r".*found on the GPU after propose\(\['a', 'b'\]\)"):
        p.check()
    assert_same_state(before, snapshot(d))
    assert d.propose(**_good()).check().drafts.shape == (2, 2)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e7])
@pytest.mark.parametrize("how", ["next call", "Proposal.check", "synchronize", "feed",
                                 "remove_sequence"])
@pytest.mark.parametrize("path", ["program", "eager"])
def test_bad_hidden_values_are_refused_at_the_next_synchronisation(value, how, path):
    """Through the program, and through the eager path with its checks on the device (CUDA's
    eager path; before, it read every value on the host): the bad row never reaches the cache,
    and the next synchronisation raises naming the row, the drafter bitwise as before."""
    d = programmed(drafter()) if path == "program" else deferred(drafter())
    d.add_sequence("a", position=5)
    d.add_sequence("b", position=3)
    h, ids, pos = rows(3, 1, 0)
    d.propose(["a", "b"], h, ids, torch.tensor([5, 6, 3]), [2, 1], k=2)
    before = snapshot(d)
    h, ids, _ = rows(3, 2, 0)
    h[1, 7] = value
    p = d.propose(["a", "b"], h, ids, torch.tensor([7, 8, 4]), [2, 1], k=2)
    assert d.next_position("a") == 9  # as if accepted, until the checks are read
    with pytest.raises(ValueError, match="hidden_states: row 1 holds") as info:
        if how == "next call":
            d.propose(["a"], h[:1], ids[:1], torch.tensor([7]), [1], k=2)
        elif how == "Proposal.check":
            p.check()
        elif how == "synchronize":
            d.synchronize()
        elif how == "feed":
            d.feed(["b"], h[:1], ids[:1], torch.tensor([4]), [1])
        else:
            d.remove_sequence("a")
    assert "changed nothing" in str(info.value)
    assert_same_state(before, snapshot(d))
    p.check()  # raised once; the drafter is usable again
    h[1, 7] = 0.0
    assert d.propose(["a", "b"], h[:2], ids[:2], torch.tensor([7, 4]), [1, 1],
                     k=2).check().drafts.shape == (2, 2)


def test_nan_logits_roll_the_call_back():
    """Finite inputs, NaN logits (a broken head norm): the call's rows and drafts were written;
    the error rolls them back, and the drafter then drafts exactly as a twin that never saw
    the call."""
    cfg = TINY
    model = init_random_(DeepSeekV4MTP(cfg, dtype=torch.float64, numerics=Numerics()), seed=5)
    d = programmed(Drafter(model, max_seqs=2, max_draft_tokens=3))
    twin = Drafter(model, max_seqs=2, max_draft_tokens=3, cuda_graphs=False)
    for x in (d, twin):
        x.add_sequence("a")
        h, ids, pos = rows(6, 4)
        x.propose(["a"], h, ids, pos, [6], k=3)
    norm = model.model.layers[str(cfg.num_hidden_layers)].shared_head.norm.weight
    keep = norm.clone()
    norm[0] = float("nan")
    h, ids, pos = rows(2, 5, start=6)
    d.propose(["a"], h, ids, pos, [2], k=3)
    norm.copy_(keep)
    with pytest.raises(ValueError, match="logits: hold NaN"):
        d.synchronize()
    assert d.next_position("a") == 6
    h, ids, pos = rows(3, 6, start=6)
    pa, pb = d.propose(["a"], h, ids, pos, [3], k=3), twin.propose(["a"], h, ids, pos, [3], k=3)
    assert torch.equal(pa.drafts, pb.drafts) and rel_err(pa.hidden, pb.hidden) < TOL


def test_cuda_graphs_argument():
    with pytest.raises(ValueError, match="cuda_graphs: expected None"):
        drafter().__class__(drafter().model, cuda_graphs="yes")
    with pytest.raises(ValueError, match="cuda_graphs=True: the drafter is on cpu"):
        Drafter(drafter().model, cuda_graphs=True)
    d = Drafter(drafter().model, max_seqs=2)  # the default (False): the eager path
    assert d._whole_call_graphs() is None
    d = Drafter(drafter().model, max_seqs=2, cuda_graphs=None)  # where they can: not on a CPU
    assert d._whole_call_graphs() is None


def test_a_failed_capture_falls_back_to_the_eager_path():
    """If capturing a bucket fails (with cuda_graphs=None), the call runs eagerly with a
    warning, and so do the later calls of that bucket (no second try, no second warning),
    while other buckets still run their programs; with cuda_graphs=True the error
    propagates."""

    class Failing(ProposeBuckets):
        def _make(self, program):
            if program.rows > 2:
                raise RuntimeError("operation not permitted when stream is capturing")
            return super()._make(program)

    d, eager = drafter(), drafter()
    d._proposer = Failing(d.model, d.cache, *d._buckets(), MAX_ABS_HIDDEN)
    h, ids, pos = rows(3, 0)
    for x in (d, eager):
        x.add_sequence("a")
    with pytest.warns(RuntimeWarning, match=r"propose failed .* \(1 sequences, 3 rows each"):
        p = d.propose(["a"], h, ids, pos, [3], k=2)
    assert torch.equal(p.drafts, eager.propose(["a"], h, ids, pos, [3], k=2).drafts)
    assert d.next_position("a") == 3 and d._proposer.failed == {(1, 4, 2, "greedy")}
    h, ids, pos = rows(3, 1, start=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the failed bucket is not tried again
        assert torch.equal(d.propose(["a"], h, ids, pos, [3], k=2).drafts,
                           eager.propose(["a"], h, ids, pos, [3], k=2).drafts)
        h, ids, pos = rows(1, 2, start=6)
        assert torch.equal(d.propose(["a"], h, ids, pos, [1], k=2).drafts,
                           eager.propose(["a"], h, ids, pos, [1], k=2).drafts)
    assert (1, 1, 2, "greedy") in d._proposer.made  # another bucket: its program ran
    d._cuda_graphs = True
    d._proposer = Failing(d.model, d.cache, *d._buckets(), MAX_ABS_HIDDEN)
    h, ids, pos = rows(3, 3, start=7)
    with pytest.raises(RuntimeError, match="stream is capturing"):
        d.propose(["a"], h, ids, pos, [3], k=2)
    assert d.next_position("a") == 7


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_unpack_cuts_the_packed_outputs_as_their_byte_layout_says(mode, dtype):
    """Each part of a proposal's packed copy (drafts, hidden, probs), made alone, is the
    first s sequences of its bytes at its offset read as its dtype and shape."""
    d = drafter(max_seqs=4, dtype=dtype)
    prog = ProposeProgram(d.model, d.cache, 4, 2, 3, MAX_ABS_HIDDEN, mode=mode)
    packed = torch.randint(0, 256, prog.packed.shape, dtype=torch.uint8)
    for s in (1, 3, 4):
        for i, (a, b, dt, shape) in enumerate(prog._layout):
            want = packed[a:b].view(dt).view(shape)[:s]  # (the bytes read as the part)
            got = prog.unpack_part(packed, s, i)
            assert got.shape == want.shape and got.dtype == dt and got.is_contiguous()
            assert torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8))
            assert got.data_ptr() == packed.data_ptr() + a  # a view: no copy
        assert (prog.unpack(packed, s)[2] is None) == (mode == "greedy")


def test_a_graphed_proposal_makes_only_the_tensors_read():
    """Reading a graphed proposal's drafts makes their view alone (two torch calls: each is
    host time in a decode loop), once; hidden and probs are made when read."""
    d = host_only(drafter(max_seqs=2))
    d.add_sequence(0)
    h, ids, pos = rows(1, 0)
    p = d.propose([0], h, ids, pos, [1], k=2, sampling=Sampling(temperature=1.0))
    with CountOps() as c:
        drafts = p.drafts
    # (a dtype view dispatches a detach too, under a dispatch mode)
    assert c.ops["as_strided"] == c.ops["view"] == 1 and "slice" not in c.ops
    assert p.drafts is drafts
    assert "hidden" not in vars(p) and "probs" not in vars(p)
    assert p.hidden.shape == (1, 2, TINY.hc_dim) and p.probs.shape == (1, 2, TINY.vocab_size)


def test_draw_is_the_inverse_cdf():
    """Uniforms on a grid of N points give each token exactly its share of the mass (within
    1/N), never a token of probability 0; a NaN row stays inside the vocabulary."""
    q = torch.tensor([[0.1, 0.0, 0.6, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0, 2.0],
                      [0.2, 0.2, 0.2, 0.2, 0.0]], dtype=torch.float64)  # rows need not sum to 1
    n = 10_000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    tokens = torch.stack([draw(q, u[i].expand(3)) for i in range(0, n, 7)], dim=1)
    share = torch.stack([(tokens == v).double().mean(dim=1) for v in range(5)], dim=1)
    assert (share - q / q.sum(dim=1, keepdim=True)).abs().max() < 7 / n + 1e-9
    assert not bool((share[q == 0] > 0).any())
    edge = draw(q, torch.tensor([0.0, 1 - 1e-16, 0.9999999], dtype=torch.float64))
    assert edge.tolist() == [0, 4, 3]
    nan = draw(torch.full((1, 5), float("nan"), dtype=torch.float64), torch.tensor([0.5],
               dtype=torch.float64))
    assert 0 <= int(nan) < 5


def sampled_pair(seed: int, sampling):
    """(program drafter, eager drafter, their proposals): both hold "a" (from position 2) and
    "b", and propose the same 3 + 2 rows (``rows(5, seed)``) with k = 3 and
    ``sampling(generator)``, each generator seeded 3."""
    prog, eager = programmed(drafter()), drafter()
    for d in (prog, eager):
        d.add_sequence("a", position=2)
        d.add_sequence("b")
    h, ids, _ = rows(5, seed)
    pos = torch.tensor([2, 3, 4, 0, 1])
    pp, pe = (d.propose(["a", "b"], h, ids, pos, [3, 2], k=3,
                        sampling=sampling(torch.Generator().manual_seed(3)))
              for d in (prog, eager))
    return prog, eager, pp, pe


@pytest.mark.parametrize("top_p", [1.0, 0.6])
def test_sampled_program_draws_from_the_eager_q(top_p):
    """A sampled call through the program: d_1's q equals the eager path's (the same
    arithmetic on logits within 1e-12 relative: q within 1e-8 in float64), every draft has
    q > 0 at its step (inside the nucleus), the same generator seed gives the same drafts, and
    the cache's positions and each sequence's next position agree with the eager path's."""
    runs = []
    for _ in range(2):
        prog, eager, pp, pe = sampled_pair(8, lambda g: Sampling(temperature=0.7, top_p=top_p,
                                                                 generator=g))
        assert pp.probs.shape == pe.probs.shape == (2, 3, TINY.vocab_size)
        # q moves by exp(logit difference): logits of magnitude ~1e2-1e3 within 1e-12 relative
        assert (pp.probs[:, 0] - pe.probs[:, 0]).abs().max() < 1e-8
        assert rel_err(pp.hidden[:, 0], pe.hidden[:, 0]) < TOL
        chosen = pp.probs.gather(2, pp.drafts[:, :, None])
        assert bool((chosen > 0).all())
        if top_p < 1:  # the nucleus is smaller than the vocabulary
            assert bool(((pp.probs > 0).sum(dim=-1) < TINY.vocab_size).all())
        assert torch.equal(prog.cache.pos, eager.cache.pos)
        assert [prog.next_position(s) for s in "ab"] == [eager.next_position(s) for s in "ab"]
        assert any(m == ("top_p" if top_p < 1 else "sample") for *_, m in prog._proposer.made)
        runs.append(pp.drafts)
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("temperature, top_p", [
    ([0.0, 0.7], 1.0), ([0.5, 1.3], [0.6, 1.0]), ([0.0, 0.0], 1.0), ([0.0, 0.9], [1.0, 0.5])])
def test_per_sequence_temperature_through_the_program(temperature, top_p):
    """A per-sequence temperature tensor goes through a sampled program (graphed on the GPU),
    whatever its values, all 0 included: the same q as the eager path's at d_1 (one-hot where
    the temperature is 0), a temperature-0 row's drafts are the greedy drafts, every draft
    has q > 0. Nothing of its values decides the program or whether q is returned, so
    nothing reads them at the call (``test_sampling_check_on_device_reads_nothing``)."""
    t = torch.tensor(temperature, dtype=torch.float64)
    tp = torch.tensor(top_p, dtype=torch.float64) if isinstance(top_p, list) else top_p
    prog, eager, pp, pe = sampled_pair(9, lambda g: Sampling(temperature=t, top_p=tp,
                                                             generator=g))
    assert {m for *_, m in prog._proposer.made} == {"top_p" if isinstance(top_p, list)
                                                    else "sample"}
    assert pp.probs.shape == pe.probs.shape == (2, 3, TINY.vocab_size)
    assert rel_err(pp.hidden[:, 0], pe.hidden[:, 0]) < TOL
    zero = [i for i, x in enumerate(temperature) if x == 0]
    assert torch.equal(pp.drafts[zero], pe.drafts[zero])  # argmax at every step
    if zero:  # the greedy path's drafts (the residuals within TOL: the same argmax here)
        greedy = drafter()
        greedy.add_sequence("a", position=2)
        greedy.add_sequence("b")
        h, ids, _ = rows(5, 9)
        pg = greedy.propose(["a", "b"], h, ids, torch.tensor([2, 3, 4, 0, 1]), [3, 2], k=3)
        assert torch.equal(pp.drafts[zero], pg.drafts[zero])
    assert (pp.probs[:, 0] - pe.probs[:, 0]).abs().max() < 1e-8  # as the test above
    assert bool((pp.probs.gather(2, pp.drafts[:, :, None]) > 0).all())
    assert bool((pp.probs[zero].max(dim=-1).values == 1).all())  # one-hot rows
    assert torch.equal(prog.cache.pos, eager.cache.pos)


def _valid(name: str, v: float) -> bool:
    """The range of a setting, written out: temperature finite and >= 0; 0 < top_p <= 1."""
    if name == "temperature":
        return math.isfinite(v) and v >= 0
    return 0 < v <= 1  # (False for NaN)


_SETTING = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                     st.sampled_from([0.0, -0.0, 1.0, 1e-30, 3.4e38]))


@settings(max_examples=60, deadline=None)
@given(t=st.lists(_SETTING, min_size=1, max_size=4), data=st.data())
def test_sampling_tensor_settings_are_flagged_exactly_when_out_of_range(t, data):
    """``Sampling.check_on_device``'s flag is set exactly when a tensor value is outside the
    range written out in ``_valid``; ``check`` then raises naming the first such value of the
    first setting holding one; a scalar setting is checked the same (when the Sampling is
    made)."""
    p = data.draw(st.lists(_SETTING, min_size=len(t), max_size=len(t)))
    s = Sampling(temperature=torch.tensor(t), top_p=torch.tensor(p))
    t, p = s.temperature.tolist(), s.top_p.tolist()  # the values as float32 holds them
    flag = s.check_on_device(len(t), torch.device("cpu"))
    bad_t = [v for v in t if not _valid("temperature", v)]
    bad_p = [v for v in p if not _valid("top_p", v)]
    assert flag.shape == () and bool(flag) == bool(bad_t or bad_p)
    if bad_t or bad_p:
        name, first = ("temperature", bad_t[0]) if bad_t else ("top_p", bad_p[0])
        with pytest.raises(ValueError, match=rf"Sampling\.{name}: value (\S+) is out of range"
                           ) as info:
            s.check(len(t), torch.device("cpu"))
        shown = float(str(info.value).split("value ")[1].split(" ")[0])
        assert shown == first or (shown != shown and first != first)
    else:
        s.check(len(t), torch.device("cpu"))
    for name, v in (("temperature", t[0]), ("top_p", p[0])):
        if _valid(name, v):
            Sampling(**{name: v})
        else:
            with pytest.raises(ValueError, match=re.escape(f"Sampling.{name}: {v} is out of "
                                                           "range")):
                Sampling(**{name: v})


def test_sampling_check_on_device_reads_nothing():
    """Tensor settings on the meta device, which holds no values (any read raises): the
    check runs, raises what the host knows (shapes, dtypes, devices) and returns its flag on
    the device. ``greedy`` follows the type: a temperature tensor of zeros samples."""
    meta = torch.device("meta")
    s = Sampling(temperature=torch.zeros(2, device=meta), top_p=torch.ones(2, device=meta))
    flag = s.check_on_device(2, meta)
    assert flag.device == meta and flag.dtype == torch.bool and flag.shape == ()
    assert not s.greedy and Sampling().greedy and Sampling(top_p=torch.ones(2)).greedy
    with pytest.raises(ValueError, match=r"Sampling.temperature: expected a float or a "
                                         r"floating tensor \[3\]"):
        s.check_on_device(3, meta)
    with pytest.raises(ValueError, match="Sampling.top_p: on meta, expected cpu"):
        Sampling(temperature=0.5, top_p=torch.ones(2, device=meta)).check_on_device(
            2, torch.device("cpu"))
    assert Sampling(temperature=0.5).check_on_device(2, meta) is None  # scalars: no flag
    with pytest.raises(RuntimeError, match="meta"):  # (what a read of a meta tensor does)
        bool(flag)


def test_a_drafter_call_with_tensor_settings_reads_none_of_their_values(monkeypatch):
    """With its checks on the device (CUDA's way), a sampled call with tensor settings reads
    only the previous call's error word (one ``item``) on the drafter's side (the drafter,
    the sampling, the program): no ``tolist`` / ``item`` of the settings or their flag,
    program or eager path alike. (The module's own reads are not counted: its eager forward
    checks its arguments, docs/drafter.md says so, and the reference ops' MoE reads its
    expert ids where the GPU runs kernels.)"""
    for d in (programmed(drafter()), deferred(drafter())):
        d.add_sequence("a")
        h, ids, pos = rows(2, 4)
        s = Sampling(temperature=torch.tensor([0.8]), top_p=torch.tensor([0.9]),
                     generator=torch.Generator().manual_seed(0))
        d.propose(["a"], h, ids, pos, [2], k=2, sampling=s)
        reads = []
        for name in ("tolist", "item"):
            real = getattr(torch.Tensor, name)

            def read(self, real=real, name=name, reads=reads):
                caller = os.path.basename(sys._getframe(1).f_code.co_filename)
                if caller in ("drafter.py", "sampling.py", "propose_program.py", "parallel.py"):
                    reads.append((name, caller))
                return real(self)
            monkeypatch.setattr(torch.Tensor, name, read)
        h, ids, _ = rows(1, 5)
        d.propose(["a"], h, ids, torch.tensor([2]), [1], k=2, sampling=s)
        monkeypatch.undo()
        assert reads == [("item", "drafter.py")], reads


@settings(max_examples=40, deadline=None)
@given(s=st.integers(1, 4), v=st.integers(2, 300), mode=st.sampled_from(MODES),
       data=st.data())
def test_the_nan_probe_sees_one_nan_anywhere(s, v, mode, data):
    """The program flags NaN logits from one value per row: the logit the argmax picked
    (greedy: the max of the token's own reduction) or the row's max (sampled). NaN must show
    there whenever the row holds one NaN anywhere, whatever the other values (a single NaN
    among large finite logits, at the first or the last index), and never otherwise. Greedy
    tokens are argmax's (the first maximum), NaN rows included."""
    logits = torch.randn(s, v, generator=torch.Generator().manual_seed(data.draw(
        st.integers(0, 999)))) * data.draw(st.sampled_from([1.0, 1e30]))
    bad = data.draw(st.lists(st.booleans(), min_size=s, max_size=s))
    for row in range(s):
        if bad[row]:
            logits[row, data.draw(st.integers(0, v - 1))] = float("nan")
    fake = types.SimpleNamespace(mode=mode, model=types.SimpleNamespace(ops=REFERENCE),
                                 probes=torch.zeros(3, s), temperature=torch.ones(s),
                                 top_p=torch.full((s,), 0.9), u=torch.rand(s, 3))
    picked, q = ProposeProgram._pick(fake, logits, 1)
    if mode == "greedy":
        assert q is None and torch.equal(picked, logits.argmax(dim=-1))
    assert torch.isnan(fake.probes[1]).tolist() == bad
    assert not fake.probes[[0, 2]].any()  # the step's row of the buffer alone


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_feed_through_the_program_equals_eager(seed):
    """``feed`` replays the bucket's one-step program where ``propose`` would replay graphs:
    rounds of feeds (prompts of up to W + 3 rows: the last W staged) and proposals, the same
    through the eager path: outputs and residuals within TOL, drafts, positions and the cache
    agree; the one-step buckets were used."""
    gen = torch.Generator().manual_seed(seed)
    eager, prog = twin_drafters(3, spacing=2)
    for r in range(5):
        ids, counts, h, nxt, pos = random_round(eager, gen, 3, W + 3, seed + r)
        if r % 2 == 0:
            xe, xp = (d.feed(ids, h, nxt, pos, counts) for d in (eager, prog))
            assert xp.shape == xe.shape == (len(ids), TINY.hc_dim)
            assert rel_err(xp, xe) < TOL
            assert held_kv_close(eager, prog)
        else:
            same_call(eager, prog, ids, h, nxt, pos, counts, 3)
    assert any(k == 1 for _, _, k, _ in prog._proposer.made), "no feed went through a program"


def test_a_refused_feed_through_the_program_names_feed_and_changes_nothing():
    """A feed with a token id outside the vocabulary, through the program: the call returns
    (the check runs on the device), the next call raises naming ``feed`` and the id, and the
    drafter is bitwise as before the feed."""
    d = programmed(drafter())
    d.add_sequence("a")
    h, ids, pos = rows(4, 1)
    d.propose(["a"], h, ids, pos, [4], k=2)
    before = snapshot(d)
    h, ids, pos = rows(3, 2, start=4)
    ids[1] = TINY.vocab_size
    d.feed(["a"], h, ids, pos, [3])
    with pytest.raises(ValueError, match=r"feed\(\['a'\]\)"):
        d.synchronize()
    assert_same_state(snapshot(d), before)
