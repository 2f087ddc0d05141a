"""Rows whose outputs nobody reads give only their keys: ``forward(..., last_only=True)``,
``decode_step(..., logits_rows=...)`` and the drafter paths built on them (a catch-up through
the eager path and through the whole-call programs), on the CPU with the reference ops.

The MTP module is one layer, so a row's cached key depends on that row alone; a caller that
reads only each sequence's last row (the drafter) needs the other rows' keys and nothing else.

Tolerances (float64 module, every FP8 rounding step on): against the spec reference
(tests/reference.py) 1e-11 relative, as tests/test_model.py; against the full forward's last
rows 1e-12 relative (the same operations on the same values, products over fewer rows: ~3e-15
observed, not bit for bit); the cache after the call bit for bit (the keys are the same
products over the same rows).
"""

from __future__ import annotations

import pytest
import reference as ref
import torch
from conftest import checkpoint_formats, checkpoint_weights
from drafter_helpers import TINY, W, assert_same_state, drafter, model, rel_err, rows, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from test_propose_program import held_kv_close, programmed, same_call

from mtp import KVCache, ops
from mtp import model as model_mod

REF_TOL = 1e-11
TOL = 1e-12


@st.composite
def calls(draw):
    """Up to four sequences (distinct slots, any order), each with a history of 0 .. 2W + 3
    rows from an earlier call at a random first position and 1 .. 2W + 3 new rows: shorter and
    longer than the window W = 8 and than the ring's C = W + 3."""
    n = draw(st.integers(1, 4))
    slots = draw(st.permutations(range(4)))[:n]
    first = [draw(st.integers(0, 40)) for _ in range(n)]
    past = [draw(st.integers(0, 2 * W + 3)) for _ in range(n)]
    new = [draw(st.integers(1, 2 * W + 3)) for _ in range(n)]
    return slots, first, past, new


def _tensors(slots, first, counts, seed, skip=None):
    """The rows of a call: runs per slot at consecutive positions (from first[i] + skip[i])."""
    g = torch.Generator().manual_seed(seed)
    skip = skip or [0] * len(slots)
    t = sum(counts)
    seq = torch.tensor([s for s, k in zip(slots, counts) for _ in range(k)], dtype=torch.int64)
    pos = torch.tensor([p + o + i for p, o, k in zip(first, skip, counts) for i in range(k)],
                       dtype=torch.int64)
    ids = torch.randint(0, TINY.vocab_size, (t,), generator=g)
    h = torch.randn(t, TINY.hc_dim, generator=g, dtype=torch.float64)
    return ids, pos, h, seq


@settings(max_examples=10, deadline=None)
@given(case=calls(), chunk=st.sampled_from([1, 3, 7, 10**9]), seed=st.integers(0, 2**16))
def test_last_only_equals_the_reference_and_the_full_forward(case, chunk, seed):
    """Several sequences with cached history, chunked (``CHUNK_ROWS`` 1, 3, 7: chunks that cut
    runs, some holding no run's last row; or one chunk): each sequence's last row equals the
    full forward's row (and one sequence's, the spec reference's), and the cache after the
    call is bit for bit the full forward's."""
    slots, first, past, new = case
    m = model()
    held = [(s, f, k) for s, f, k in zip(slots, first, past) if k]
    warm = _tensors(*zip(*held), seed + 1) if held else None
    call = _tensors(slots, first, new, seed, skip=past)
    outs, caches = [], []
    for last_only in (False, True):
        cache = KVCache(1, 4, W + 3, TINY.head_dim, dtype=torch.float64)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(model_mod, "CHUNK_ROWS", chunk)
            if warm is not None:
                ids, pos, h, seq = warm
                m(ids, pos, h, kv_cache=cache, seq_slots=seq)
            ids, pos, h, seq = call
            outs.append(m(ids, pos, h, kv_cache=cache, seq_slots=seq, last_only=last_only))
        caches.append(cache)
    full, last = outs
    ends = torch.tensor(new).cumsum(0) - 1
    assert last.shape == (len(slots), TINY.hc_dim)
    assert rel_err(last, full[ends]) < TOL
    assert torch.equal(caches[0].pos, caches[1].pos) and torch.equal(caches[0].kv, caches[1].kv)
    weights, formats = checkpoint_weights(m), checkpoint_formats(m)
    # one sequence against the reference (~1 s per sequence: the reference loops over rows),
    # over the last W rows of its history: all that its last row's window reads
    i = seed % len(slots)
    ids_all, pos_all, h_all = (x[-W:] for x in _history(warm, call, slots, past, new, i, held))
    want = ref.mtp_layer(h_all, ids_all, pos_all, weights, TINY, True, True, formats=formats)
    assert rel_err(last[i], want[-1]) < REF_TOL


def _history(warm, call, slots, past, new, i, held):
    """Sequence i's rows from its first position: its warm rows, then the call's."""
    parts = []
    if past[i]:
        j = [s for s, _, _ in held].index(slots[i])
        a = sum(k for _, _, k in held[:j])
        parts.append(tuple(x[a:a + past[i]] for x in warm[:3]))
    a = sum(new[:i])
    parts.append(tuple(x[a:a + new[i]] for x in call[:3]))
    ids, pos, h = (torch.cat(x) for x in zip(*parts))
    return ids, pos, h


def test_last_only_without_a_cache_is_the_last_row():
    """Without a cache the rows are one sequence: its last row, through a scratch ring of one
    window (here 20 rows, longer than the window)."""
    m = model()
    ids, pos, h, _ = _tensors([0], [100], [20], seed=3)
    full = m(ids, pos, h)
    last = m(ids, pos, h, last_only=True)
    assert last.shape == (1, TINY.hc_dim) and rel_err(last, full[-1:]) < TOL
    assert m(ids[:0], pos[:0], h[:0], last_only=True).shape == (0, TINY.hc_dim)


STAGES = {"attn_prep": "keys", "q_prep": "queries", "moe": "moe", "head": "head"}


def _counted(name: str, stage: str):
    def method(self, x, *args, **kwargs):
        self.seen[stage].append(x.shape[0])
        return getattr(ops.ReferenceOps, name)(self, x, *args, **kwargs)
    return method


class RowCounts(ops.ReferenceOps):
    """The reference ops, recording how many rows reach each stage: the keys (``attn_prep``),
    the queries (``q_prep``), the MoE and the head."""

    def __init__(self):
        self.seen: dict[str, list[int]] = {stage: [] for stage in STAGES.values()}


for _name, _stage in STAGES.items():
    setattr(RowCounts, _name, _counted(_name, _stage))


def test_only_the_last_rows_run_past_their_keys():
    """Three sequences of 10, 1 and 6 rows: every row's key, but the queries (attention) and
    the MoE for the 3 last rows only; decode_step with logits_rows likewise, the head
    included."""
    m = model()
    ids, pos, h, seq = _tensors([2, 0, 1], [0, 5, 9], [10, 1, 6], seed=4)
    cache = KVCache(1, 4, W + 3, TINY.head_dim, dtype=torch.float64)
    counting = RowCounts()
    with m.using(counting):
        m(ids, pos, h, kv_cache=cache, seq_slots=seq, last_only=True)
    assert counting.seen == {"keys": [17], "queries": [3], "moe": [3], "head": []}
    counting = RowCounts()
    last = torch.tensor([9, 10, 16])
    with m.using(counting):
        m.decode_step(ids, pos + 20, h, seq, cache, logits_rows=last)
    assert counting.seen == {"keys": [17], "queries": [3], "moe": [3], "head": [3]}


class WithoutTakeRows:
    """An ops object of the reference's methods but ``take_rows`` (written before it existed)."""

    def __getattr__(self, name):
        if name == "take_rows":
            raise AttributeError(name)
        return getattr(ops.REFERENCE, name)


def test_an_ops_object_without_take_rows_still_runs_a_catch_up():
    """``take_rows`` is optional on an ops object (as ``argmax_rows``): without it the module
    picks each sequence's last rows with the reference's, so the outputs and the cache are the
    reference's bit for bit."""
    m = model()
    ids, pos, h, seq = _tensors([2, 0, 1], [0, 5, 9], [10, 1, 6], seed=5)
    out = []
    for ops_ in (ops.REFERENCE, WithoutTakeRows()):
        cache = KVCache(1, 4, W + 3, TINY.head_dim, dtype=torch.float64)
        with m.using(ops_):
            out.append((m(ids, pos, h, kv_cache=cache, seq_slots=seq, last_only=True),
                        cache.kv, cache.pos))
    for a, b in zip(*out):
        assert torch.equal(a, b)


@pytest.mark.parametrize("n", [1, 4, W])
def test_decode_step_logits_rows_equals_the_full_forward(n):
    """``decode_step(..., logits_rows=)`` as the whole-call program lays rows out (blocks of R
    rows per sequence, real rows at the end, padding rows with slot -1 before them and a padding
    sequence), up to R = W rows per sequence: each sequence's last row's hidden and logits equal
    the full forward's plus compute_logits over the real rows alone, and so does the cache
    (positions bit for bit; KV within 1e-12: its products ran over other rows' company)."""
    m = model()
    r = W
    counts = [n, max(1, n - 1), 0]  # the third sequence is padding
    slots_of = [3, 1, -1]
    starts = [20, 2, 0]
    seq, pos, real = [], [], []
    for s, c, p0 in zip(slots_of, counts, starts):
        seq += [-1] * (r - c) + [s] * c
        pos += [0] * (r - c) + list(range(p0, p0 + c))
        real += [False] * (r - c) + [True] * c
    seq, pos, real = torch.tensor(seq), torch.tensor(pos), torch.tensor(real)
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, TINY.vocab_size, (3 * r,), generator=g)
    h = torch.randn(3 * r, TINY.hc_dim, generator=g, dtype=torch.float64)
    h[~real] = 0
    caches = [KVCache(1, 4, W + 3, TINY.head_dim, dtype=torch.float64) for _ in range(2)]
    for c in caches:  # history: slot 3 holds positions 12..19
        hist = _tensors([3], [12], [8], seed=7)
        m(*hist[:3], kv_cache=c, seq_slots=hist[3])
    last = torch.arange(3) * r + r - 1
    x, logits = m.decode_step(ids, pos, h, seq, caches[0], logits_rows=last)
    assert x.shape == (3, TINY.hc_dim) and logits.shape == (3, TINY.vocab_size)
    full = m(ids[real], pos[real], h[real], kv_cache=caches[1], seq_slots=seq[real])
    ends = torch.tensor(counts[:2]).cumsum(0) - 1
    assert rel_err(x[:2], full[ends]) < TOL
    assert rel_err(logits[:2], m.compute_logits(full[ends])) < TOL
    assert torch.equal(caches[0].pos, caches[1].pos)
    assert rel_err(caches[0].kv, caches[1].kv) < TOL


# ---- the drafter: catch-up through the eager path and the whole-call programs --------------
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), data=st.data())
def test_program_catch_up_equals_eager(seed, data):
    """Rounds of calls with 1 .. 2W new rows per sequence (catch-ups up to and beyond the
    window: more than W rows take the W bucket, their earlier rows checked but not staged) and
    k + 1-sized ones, sequences at random positions: the program path's drafts equal the eager
    path's, residuals and cache within 1e-12 (cache positions exactly)."""
    eager, prog = drafter(), programmed(drafter())
    for d in (eager, prog):
        for s in range(4):
            d.add_sequence(s, position=data.draw(st.integers(0, 50), label="start") if d is eager
                           else eager.next_position(s))
    for r in range(3):
        ids = data.draw(st.permutations(range(4)), label="order")[:data.draw(
            st.integers(1, 4), label="seqs")]
        counts = [data.draw(st.integers(1, 2 * W), label="rows") for _ in ids]
        h, nxt, _ = rows(sum(counts), seed + r)
        pos = torch.cat([torch.arange(eager.next_position(s), eager.next_position(s) + n)
                         for s, n in zip(ids, counts)])
        same_call(eager, prog, ids, h, nxt, pos, counts, data.draw(st.integers(1, 4),
                                                                   label="k"))
    assert prog._proposer.made, "no call went through the programs"


def test_a_catch_up_longer_than_the_window_replays_the_window_bucket():
    """2W + 3 rows of one sequence and 3 of another: the (2, W) bucket, equal to the eager
    path; the cache holds the same entries."""
    eager, prog = drafter(), programmed(drafter())
    for d in (eager, prog):
        d.add_sequence("a", position=4)
        d.add_sequence("b")
    h, nxt, _ = rows(2 * W + 6, 9)
    pos = torch.cat((torch.arange(4, 4 + 2 * W + 3), torch.arange(3)))
    pe, pp = (d.propose(["a", "b"], h, nxt, pos, [2 * W + 3, 3], k=3) for d in (eager, prog))
    assert list(prog._proposer.made) == [(2, W, 3, "greedy")]
    assert torch.equal(pe.drafts, pp.drafts) and rel_err(pp.hidden, pe.hidden) < TOL
    assert held_kv_close(eager, prog)


@pytest.mark.parametrize("bad", ["hidden", "id", "position"])
def test_a_bad_value_in_a_row_before_the_last_window_is_refused(bad):
    """The rows before a sequence's last W are not computed, but checked: a bad value there
    refuses the call (at the next synchronisation, naming the input), the drafter bitwise as
    before."""
    d = programmed(drafter())
    d.add_sequence("a")
    h, nxt, pos = rows(3, 1)
    d.propose(["a"], h, nxt, pos, [3], k=2)
    before = snapshot(d)
    n = 2 * W
    h, nxt, pos = rows(n, 2, start=3)
    if bad == "hidden":
        h[1, 5] = float("nan")
    elif bad == "id":
        nxt[2] = TINY.vocab_size
    else:
        pos = pos.clone()
        pos[0] = 2  # the row before the window starts going backwards
    d.propose(["a"], h, nxt, pos, [n], k=2)
    assert (1, W, 2, "greedy") in d._proposer.made
    name = {"hidden": "hidden_states", "id": "input_ids", "position": "positions"}[bad]
    with pytest.raises(ValueError, match=name) as info:
        d.synchronize()
    assert "changed nothing" in str(info.value)
    assert_same_state(before, snapshot(d))
    h, nxt, pos = rows(n, 2, start=3)
    assert d.propose(["a"], h, nxt, pos, [n], k=2).check().drafts.shape == (1, 2)
