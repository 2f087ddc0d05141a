"""The Drafter's contract, case by case: sequences, positions, the draft loop's layer and
position bookkeeping, the accelerator hook, and refusals. The properties (incremental equals
recomputation, rollback, batching, trimming, bad input) are in test_drafter_properties.py."""

from __future__ import annotations

import pytest
import torch
from drafter_helpers import (
    TINY,
    W,
    assert_same_state,
    drafter,
    live_entries,
    model,
    rel_err,
    rows,
    same_entries,
    snapshot,
)

from mtp import KVCache
from mtp.drafter import Drafter, Proposal
from mtp.sampling import Sampling


def test_propose_shapes_and_positions():
    d = drafter(max_seqs=2)
    d.add_sequence("a")
    d.add_sequence("b", position=7)
    ha, ia, pa = rows(5, 0)
    hb, ib, pb = rows(3, 1, start=7)
    p = d.propose(["a", "b"], torch.cat((ha, hb)), torch.cat((ia, ib)), torch.cat((pa, pb)),
                  [5, 3], k=3)
    assert isinstance(p, Proposal)
    assert p.drafts.shape == (2, 3) and p.drafts.dtype == torch.int64
    assert p.probs is None  # greedy
    assert p.hidden.shape == (2, 3, TINY.hc_dim)
    assert (d.next_position("a"), d.next_position("b")) == (5, 10)
    # Draft entries sit at positions n .. n + k - 2 (the last real row is at n - 1).
    assert sorted(p for (_, p) in live_entries(d, "a")) == [0, 1, 2, 3, 4, 5, 6]
    assert sorted(p for (_, p) in live_entries(d, "b")) == [7, 8, 9, 10, 11]


def test_greedy_drafts_are_the_argmax_of_each_steps_logits():
    d = drafter()
    d.add_sequence(0)
    h, ids, pos = rows(6, 2)
    p = d.propose([0], h, ids, pos, [6], k=4)
    logits = d.model.compute_logits(p.hidden[0])  # [k, V]
    assert torch.equal(p.drafts[0], logits.argmax(-1))


def test_sampled_drafts_return_q_and_are_reproducible():
    out = []
    for _ in range(2):
        d = drafter()
        d.add_sequence(0)
        h, ids, pos = rows(6, 3)
        gen = torch.Generator().manual_seed(5)
        out.append(d.propose([0], h, ids, pos, [6], k=3,
                             sampling=Sampling(temperature=0.9, top_p=0.8, generator=gen)))
    a, b = out
    assert torch.equal(a.drafts, b.drafts) and torch.equal(a.probs, b.probs)
    assert a.probs.shape == (1, 3, TINY.vocab_size)
    # q is a distribution, and each draft was possible under it.
    assert torch.allclose(a.probs.sum(-1), torch.ones(1, 3, dtype=a.probs.dtype))
    assert bool((a.probs[0].gather(1, a.drafts[0, :, None]) > 0).all())


def test_sampling_settings_are_checked_whenever_they_may_differ_from_the_last_call():
    """A call with the last call's scalar settings skips their re-check (nothing of it depends
    on the call); a changed setting in the same object, and tensor settings, are checked at
    every call (a tensor's length against the call's sequences)."""
    d = drafter(max_seqs=2)
    d.add_sequence(0)
    d.add_sequence(1)
    sampling = Sampling(temperature=0.9, top_p=0.8, generator=torch.Generator())
    h, ids, _ = rows(2, 3)
    for i in range(2):
        d.propose([0], h[:1], ids[:1], torch.tensor([i]), [1], k=2, sampling=sampling)
    before = snapshot(d)
    object.__setattr__(sampling, "temperature", -1.0)  # (a frozen Sampling, changed anyway)
    with pytest.raises(ValueError, match=r"Sampling.temperature: -1.0 is out of range"):
        d.propose([0], h[:1], ids[:1], torch.tensor([2]), [1], k=2, sampling=sampling)
    assert_same_state(before, snapshot(d))
    per_seq = Sampling(temperature=torch.tensor([0.5, 1.0]))
    d.propose([0, 1], h, ids, torch.tensor([2, 0]), [1, 1], k=2, sampling=per_seq)
    with pytest.raises(ValueError, match=r"Sampling.temperature: expected .* \[1\]"):
        d.propose([0], h[:1], ids[:1], torch.tensor([3]), [1], k=2, sampling=per_seq)


def test_a_fed_sequence_drafts_like_proposing_from_its_last_row():
    """feed() then propose() of one more row equals proposing all rows at once."""
    h, ids, pos = rows(9, 4)
    a, b = drafter(), drafter()
    a.add_sequence(0)
    b.add_sequence(0)
    x = a.feed([0], h[:5], ids[:5], pos[:5], [5])
    assert x.shape == (1, TINY.hc_dim)
    pa = a.propose([0], h[5:], ids[5:], pos[5:], [4], k=2)
    pb = b.propose([0], h, ids, pos, [9], k=2)
    assert torch.equal(pa.drafts, pb.drafts)
    assert rel_err(pa.hidden, pb.hidden) < 1e-12  # float64, different row batching


def test_sequences_are_added_removed_and_slots_reused():
    d = drafter(max_seqs=2)
    d.add_sequence("x")
    d.add_sequence("y")
    with pytest.raises(ValueError, match="all 2 sequence slots are in use"):
        d.add_sequence("z")
    with pytest.raises(ValueError, match="already in the drafter"):
        d.add_sequence("x")
    h, ids, pos = rows(4, 0)
    d.propose(["x"], h, ids, pos, [4], k=2)
    slot = d.slot("x")
    d.remove_sequence("x")
    assert "x" not in d and d.seq_ids == ["y"]
    assert bool((d.cache.pos[:, slot] == -1).all())  # nothing of "x" can leak to the next user
    d.add_sequence("z", position=100)
    assert d.slot("z") == slot and d.next_position("z") == 100
    with pytest.raises(ValueError, match="unknown sequence 'x'"):
        d.remove_sequence("x")
    with pytest.raises(ValueError, match="position: expected an int in"):
        d.add_sequence("w", position=-1)
    with pytest.raises(TypeError, match="hashable"):
        d.add_sequence(["not", "hashable"])
    # before: a NaN id was added, and a later float("nan") could not name it ("unknown")
    with pytest.raises(ValueError, match="nan is not equal to itself"):
        d.add_sequence(float("nan"))
    assert d.seq_ids == ["y", "z"]


def test_a_restarted_sequence_is_independent_of_its_past():
    """remove + add at the same id and slot: drafts equal a fresh drafter's."""
    d, fresh = drafter(max_seqs=1), drafter(max_seqs=1)
    h, ids, pos = rows(6, 7)
    d.add_sequence(0)
    d.propose([0], h, ids, pos, [6], k=3)
    d.remove_sequence(0)
    h2, ids2, pos2 = rows(3, 8, start=2)
    d.add_sequence(0, position=2)
    fresh.add_sequence(0, position=2)
    assert torch.equal(d.propose([0], h2, ids2, pos2, [3], k=3).drafts,
                       fresh.propose([0], h2, ids2, pos2, [3], k=3).drafts)


def test_draft_steps_use_layer_s_mod_n_mtp():
    """With two MTP layers, step s runs layer s % 2 and its logits. Checked against the loop
    written out by hand with the module and a KVCache."""
    m = model(n_mtp=2)
    d = Drafter(m, max_seqs=1, max_draft_tokens=4)
    d.add_sequence(0)
    h, ids, pos = rows(5, 9)
    p = d.propose([0], h, ids, pos, [5], k=4)

    cache = KVCache(2, 1, W + 4, TINY.head_dim, dtype=torch.float64)
    x = m(ids, pos, h, kv_cache=cache, seq_slots=torch.zeros(5, dtype=torch.long))[-1:]
    expected = []
    for s in range(4):
        if s:
            x = m(expected[-1], torch.tensor([4 + s]), x, spec_step_idx=s, kv_cache=cache,
                  seq_slots=torch.zeros(1, dtype=torch.long))
        expected.append(m.compute_logits(x, spec_step_idx=s).argmax(-1))
    assert p.drafts[0].tolist() == torch.cat(expected).tolist()
    # Steps 1 and 3 (positions 5, 7) wrote layer 1's cache; the real rows and step 2, layer 0's.
    assert sorted(int(q) for q in d.cache.pos[1, 0] if q >= 0) == [5, 7]
    assert sorted(int(q) for q in d.cache.pos[0, 0] if q >= 0) == [0, 1, 2, 3, 4, 6]


class CountingAccelerator:
    """Records every call, then runs the module (what a kernel path would replace)."""

    def __init__(self, module):
        self.module, self.calls = module, []

    def forward(self, *args, **kwargs):
        self.calls.append(("forward", kwargs["spec_step_idx"], args[1].tolist()))
        return self.module.forward(*args, **kwargs)

    def compute_logits(self, hidden_states, spec_step_idx=0):
        self.calls.append(("logits", spec_step_idx, hidden_states.shape[0]))
        return self.module.compute_logits(hidden_states, spec_step_idx)


def test_every_forward_and_logits_call_goes_through_the_accelerator():
    m = model()
    acc = CountingAccelerator(m)
    d, plain = Drafter(m, accelerator=acc), Drafter(m)
    for x in (d, plain):
        x.add_sequence(0)
        x.add_sequence(1, position=3)
    h, ids, _ = rows(5, 10)
    pos = torch.tensor([0, 1, 3, 4, 5])
    pa = d.propose([0, 1], h, ids, pos, [2, 3], k=3)
    pb = plain.propose([0, 1], h, ids, pos, [2, 3], k=3)
    assert torch.equal(pa.drafts, pb.drafts)
    assert acc.calls == [("forward", 0, [0, 1, 3, 4, 5]), ("logits", 0, 2),
                         ("forward", 1, [2, 6]), ("logits", 1, 2),
                         ("forward", 2, [3, 7]), ("logits", 2, 2)]


def test_an_accelerator_must_have_both_methods_and_can_be_set_later():
    half = type("A", (), {"forward": lambda *a, **k: None})()
    with pytest.raises(TypeError, match="compute_logits"):
        Drafter(model(), accelerator=half)
    d = Drafter(model())
    assert d.accelerator is d.model
    with pytest.raises(TypeError, match="compute_logits"):
        d.accelerator = half
    assert d.accelerator is d.model
    with pytest.warns(DeprecationWarning, match="backend="):  # the older hook
        d.accelerator = acc = CountingAccelerator(d.model)
    assert d.accelerator is acc
    d.accelerator = None  # back to the module: no warning
    assert d.accelerator is d.model


class FailingAccelerator(CountingAccelerator):
    def compute_logits(self, hidden_states, spec_step_idx=0):
        if spec_step_idx == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return super().compute_logits(hidden_states, spec_step_idx)


def test_a_forward_that_fails_after_the_checks_drops_the_sequences_it_touched():
    m = model()
    d = Drafter(m, accelerator=FailingAccelerator(m), max_seqs=3)
    for s in ("a", "b", "c"):
        d.add_sequence(s)
    h, ids, pos = rows(3, 11)
    d.feed(["c"], h, ids, pos, [3])
    c_state = (d.next_position("c"), live_entries(d, "c"))
    with pytest.raises(RuntimeError, match=r"forward failed .*CUDA out of memory.*\['a', 'b'\]"
                                           r" were removed"):
        d.propose(["a", "b"], torch.cat((h, h)), torch.cat((ids, ids)), torch.cat((pos, pos)),
                  [3, 3], k=2)
    assert d.seq_ids == ["c"]
    assert d.next_position("c") == c_state[0] and same_entries(live_entries(d, "c"), c_state[1])
    d.add_sequence("a")  # the slot came back


def test_constructor_refusals():
    with pytest.raises(TypeError, match="DeepSeekV4MTP"):
        Drafter(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="max_draft_tokens"):
        Drafter(model(), max_draft_tokens=0)
    with pytest.raises(ValueError, match="max_seqs"):
        Drafter(model(), max_seqs=0)
    from mtp import DeepSeekV4MTP
    with pytest.raises(ValueError, match="meta device"):
        Drafter(DeepSeekV4MTP(TINY, device="meta"))


def test_cache_is_sized_w_plus_k_and_repr_says_what_it_holds():
    d = drafter(max_seqs=3, max_draft_tokens=5)
    assert d.cache.capacity == W + 5 and d.cache.kv.shape[:2] == (1, 3)
    d.add_sequence(1)
    assert "sequences=1/3" in repr(d) and "max_draft_tokens=5" in repr(d)


def test_a_refused_call_changes_nothing_even_after_drafting():
    """One hand-picked case of the property in test_drafter_properties.py, readable alone."""
    d = drafter()
    d.add_sequence(0)
    h, ids, pos = rows(6, 12)
    d.propose([0], h, ids, pos, [6], k=3)
    before = snapshot(d)
    with pytest.raises(ValueError, match="going backwards"):
        d.propose([0], h[:2], ids[:2], pos[4:6], [2], k=3)
    assert_same_state(before, snapshot(d))


def test_from_pretrained_loads_through_the_loader_and_drafts_like_the_module(tmp_path):
    """The real path: a checkpoint in the official format, loaded by mtp.loader; the drafts
    equal those of a Drafter around the module that was written (the round trip is exact).
    Shared embedding and head tensors are used in place, and their shard is not opened."""
    from mtp.demo import write_tiny_checkpoint

    folder = write_tiny_checkpoint(tmp_path, seed=3)
    written = model(torch.float32, seed=3)
    h, ids, pos = rows(7, 13, dtype=torch.float32)
    loaded = Drafter.from_pretrained(folder, dtype=torch.float32, max_seqs=2,
                                     max_draft_tokens=3)
    assert loaded.load_report.tensors > 0 and loaded.max_seqs == 2
    embed = written.model.embed_tokens.weight.detach().clone()
    head = written.layer(0).shared_head.head.weight.detach().clone()
    shared = Drafter.from_pretrained(folder, dtype=torch.float32, embed_tokens=embed, head=head)
    assert shared.model.model.embed_tokens.weight.data_ptr() == embed.data_ptr()
    assert "model-00001-of-00004.safetensors" in shared.load_report.shards_skipped
    reference = Drafter(written)
    for d in (reference, loaded, shared):
        d.add_sequence(0)
    want = reference.propose([0], h, ids, pos, [7], k=3)
    for d in (loaded, shared):
        got = d.propose([0], h, ids, pos, [7], k=3)
        assert torch.equal(got.drafts, want.drafts) and torch.equal(got.hidden, want.hidden)


# ---- the token convention and the residual layout ------------------------------------------
def test_next_token_ids_is_input_ids_under_a_name_that_says_what_it_is():
    """next_token_ids= and input_ids= (vLLM's name) are the same argument; exactly one of the
    two, and a refusal changes nothing."""
    h, ids, pos = rows(6, 3)
    by_name, by_vllm = drafter(), drafter()
    for d in (by_name, by_vllm):
        d.add_sequence("a")
    pa = by_name.propose(["a"], h, positions=pos, num_rows_per_seq=[6], k=3,
                         next_token_ids=ids)
    pb = by_vllm.propose(["a"], h, ids, pos, [6], k=3)
    assert torch.equal(pa.drafts, pb.drafts) and torch.equal(pa.hidden, pb.hidden)
    h2, ids2, pos2 = rows(1, 4, start=6)
    xa = by_name.feed(["a"], h2, next_token_ids=ids2, positions=pos2, num_rows_per_seq=[1])
    assert torch.equal(xa, by_vllm.feed(["a"], h2, ids2, pos2, [1]))

    before = snapshot(by_name)
    h3, ids3, pos3 = rows(1, 5, start=7)
    with pytest.raises(TypeError, match="exactly one of the two; both were given"):
        by_name.propose(["a"], h3, ids3, pos3, [1], k=1, next_token_ids=ids3)
    with pytest.raises(TypeError, match="exactly one of the two; neither was given"):
        by_name.feed(["a"], h3, positions=pos3, num_rows_per_seq=[1])
    with pytest.raises(TypeError, match="positions: required"):
        by_name.feed(["a"], h3, next_token_ids=ids3, num_rows_per_seq=[1])
    with pytest.raises(ValueError, match=r"next_token_ids: expected \[T\] = \[1\]"):
        by_name.feed(["a"], h3, next_token_ids=ids, positions=pos3, num_rows_per_seq=[1])
    assert_same_state(before, snapshot(by_name))


def test_residuals_in_transformers_layout_t_m_d_draft_like_flattened_ones():
    h, ids, pos = rows(5, 6)
    flat, stacked = drafter(), drafter()
    for d in (flat, stacked):
        d.add_sequence(0)
    p_flat = flat.propose([0], h, ids, pos, [5], k=2)
    h3 = h.view(5, TINY.hc_mult, TINY.hidden_size)  # [T, M*D] -> [T, M, D]
    p_stacked = stacked.propose([0], h3, next_token_ids=ids, positions=pos,
                                num_rows_per_seq=[5], k=2)
    assert torch.equal(p_flat.drafts, p_stacked.drafts)
    assert torch.equal(p_flat.hidden, p_stacked.hidden)
    with pytest.raises(ValueError, match=r"or \[T, hc_mult, hidden_size\] = \[1, 4, 256\]"):
        stacked.feed([0], h3[:1, :2], ids[:1], torch.tensor([5]), [1])


def test_int32_positions_and_ids_draft_like_int64_ones():
    """Regression: int32 positions (documented as accepted) failed inside the forward, which
    then removed every sequence of the call."""
    h, ids, pos = rows(10, 8)
    wide, narrow = drafter(), drafter()
    for d in (wide, narrow):
        d.add_sequence(0)
    pw = wide.propose([0], h, ids, pos, [10], k=3)
    pn = narrow.propose([0], h, ids.int(), pos.int(), [10], k=3)
    assert torch.equal(pw.drafts, pn.drafts) and torch.equal(pw.hidden, pn.hidden)
    assert narrow.seq_ids == [0] and narrow.next_position(0) == 10
    # the module itself, without the drafter, with a cache (the path that failed)
    m = model()
    assert torch.equal(m(ids.int(), pos.int(), h), m(ids, pos, h))


class _Tagged(torch.Tensor):
    """A tensor subclass (as a framework's wrapper tensors are): accepted like a tensor."""


class _K(int):
    """An int subclass (an IntEnum's kind): accepted as k."""


def test_arguments_off_the_checks_fast_paths_are_accepted_alike():
    """The argument checks take a fast path for plain lists, ints and tensors of exactly the
    expected type; anything else the full checks accept (tensor subclasses, a tuple of ids,
    counts as a tuple or tensor, an int subclass for k, [T, M, D] rows, input_ids= or
    next_token_ids=) drafts exactly as the plain call."""
    h, ids, _ = rows(6, 12)
    plain, other = drafter(max_seqs=2), drafter(max_seqs=2)
    for d in (plain, other):
        d.add_sequence("a")
        d.add_sequence("b")
    positions = torch.tensor([0, 1, 2, 3, 0, 1])  # a at 0..3, b at 0..1
    pp = plain.propose(["a", "b"], h, ids, positions, [4, 2], k=3)
    po = other.propose(("a", "b"), h.as_subclass(_Tagged).view(6, TINY.hc_mult, -1),
                       next_token_ids=ids.as_subclass(_Tagged),
                       positions=positions.as_subclass(_Tagged),
                       num_rows_per_seq=torch.tensor([4, 2]), k=_K(3))
    assert torch.equal(pp.drafts, po.drafts) and torch.equal(pp.hidden, po.hidden)
    assert other.next_position("a") == 4 and other.next_position("b") == 2
    po = other.propose(["a"], h[:1], ids[:1], torch.tensor([4]), (1,), k=2)
    pp = plain.propose(["a"], h[:1], next_token_ids=ids[:1], positions=torch.tensor([4]),
                       num_rows_per_seq=[1], k=2)
    assert torch.equal(pp.drafts, po.drafts) and torch.equal(pp.hidden, po.hidden)


# ---- checks that keep the forward from failing, and bad values out of the cache ----------
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e38])
def test_non_finite_or_huge_hidden_states_are_refused_before_the_cache_changes(value):
    """Regression: NaN/Inf/1e38 rows drafted [[0, 0, 0]] and left bad KV in the window, so the
    next valid call was still non-finite."""
    d, clean = drafter(), drafter()
    for x in (d, clean):
        x.add_sequence(0)
    h, ids, pos = rows(4, 21)
    bad = h.clone()
    bad[2, 5] = value
    before = snapshot(d)
    with pytest.raises(ValueError, match=r"hidden_states: row 2 holds .*\|value\| <= 1e\+06"):
        d.propose([0], bad, ids, pos, [4], k=3)
    assert_same_state(before, snapshot(d))
    pa, pb = d.propose([0], h, ids, pos, [4], k=3), clean.propose([0], h, ids, pos, [4], k=3)
    assert torch.equal(pa.drafts, pb.drafts) and torch.equal(pa.hidden, pb.hidden)


def test_positions_that_could_overflow_and_sparse_tensors_are_refused_in_the_checks():
    """Regression: add_sequence(position=2**63 - 2) and sparse hidden_states passed the checks,
    then the forward failed and removed the call's sequences."""
    from mtp.drafter import MAX_POSITION
    d = drafter()
    for position in (2**63 - 2, 10**20, MAX_POSITION - 3):  # max_draft_tokens = 4
        with pytest.raises(ValueError, match="position: expected an int in"):
            d.add_sequence("far", position=position)
    d.add_sequence("far", position=MAX_POSITION - 4)
    d.add_sequence("near")
    h, ids, _ = rows(2, 22)
    before = snapshot(d)
    with pytest.raises(ValueError, match="'far' would reach position 2147483648"):
        d.propose(["far"], h, ids, torch.tensor([MAX_POSITION - 4, MAX_POSITION - 3]), [2], k=1)
    with pytest.raises(ValueError, match="hidden_states: a torch.sparse_coo tensor"):
        d.propose(["near"], h.to_sparse(), ids, torch.arange(2), [2], k=1)
    assert_same_state(before, snapshot(d))
    p = d.propose(["far"], h[:1], ids[:1], torch.tensor([MAX_POSITION - 4]), [1], k=4)
    assert torch.isfinite(p.hidden).all()  # RoPE at the largest positions stays finite


def test_a_wrong_num_rows_per_seq_is_named():
    d = drafter()
    d.add_sequence(0)
    h, ids, pos = rows(3, 23)
    with pytest.raises(ValueError, match=r"num_rows_per_seq: the counts \[2\] sum to 2, but "
                                         r"hidden_states has 3 rows"):
        d.propose([0], h, ids, pos, [2], k=1)


def test_the_duplicate_sequence_check_is_linear():
    """Regression: 20,000 ids took 6 s (list.count per id). 200,000 ids with the duplicate
    last: a quadratic check needs ~10^10 comparisons (minutes); linear takes milliseconds, so
    a 5 s bound holds on a slow shared CI machine and still fails a quadratic check."""
    import time
    d = drafter()
    ids = list(range(200_000)) + [7]
    h, tok, pos = rows(1, 0)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="sequence 7 appears twice"):
        d.propose(ids, h, tok, pos, [1] * len(ids), k=1)
    assert time.perf_counter() - t0 < 5.0


def test_threads_take_turns_and_leave_a_serial_state():
    """Regression: two threads feeding the same sequence both succeeded and left a cache that
    matched neither order; propose racing remove_sequence lost an unrelated sequence. With the
    lock one feed wins and the other is refused (its rows go backwards); the result equals the
    serial run of the winner, and the unrelated sequence is untouched."""
    import threading
    h0, ids0, pos0 = rows(3, 30)
    feeds = [rows(2, 31 + i, start=3) for i in range(2)]
    serial = []
    for i in range(2):
        ref = drafter()
        ref.add_sequence("a")
        ref.feed(["a"], h0, ids0, pos0, [3])
        ref.feed(["a"], *feeds[i], [2])
        serial.append(live_entries(ref, "a"))
    for trial in range(20):
        d = drafter()
        for s in ("a", "other", "gone"):
            d.add_sequence(s)
        d.feed(["a"], h0, ids0, pos0, [3])
        d.feed(["other"], h0, ids0, pos0, [3])
        other = live_entries(d, "other")
        barrier, outcome = threading.Barrier(3), {}

        def feed(i, d=d, barrier=barrier, outcome=outcome):
            barrier.wait()
            try:
                d.feed(["a"], *feeds[i], [2])
                outcome[i] = "ok"
            except ValueError as exc:
                outcome[i] = str(exc)

        def remove(d=d, barrier=barrier):
            barrier.wait()
            d.remove_sequence("gone")

        threads = [threading.Thread(target=feed, args=(i,)) for i in range(2)]
        threads.append(threading.Thread(target=remove))
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        winners = [i for i in range(2) if outcome.get(i) == "ok"]
        assert len(winners) == 1, (trial, outcome)
        assert "going backwards" in outcome[1 - winners[0]]
        assert same_entries(live_entries(d, "a"), serial[winners[0]])
        assert d.seq_ids == ["a", "other"] and same_entries(live_entries(d, "other"), other)
