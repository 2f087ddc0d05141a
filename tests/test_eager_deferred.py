"""The Drafter's eager path with its value checks on the device (what it does on CUDA: token ids,
positions, hidden values and NaN draft logits flagged in an error word that is read at the next
synchronisation), run on the CPU by setting ``_defer_checks``; and NaN draft logits on the
host-checked path (the CPU's), refused at the call.

Every refusal must leave the drafter bitwise as before the call, and the deferred path must
compute bitwise what the host-checked path computes (the forward runs on the same values).
Each bad hidden value with each place the error can be raised: tests/test_propose_program.py,
for both paths.
"""

from __future__ import annotations

import pytest
import torch
from drafter_helpers import TINY, assert_same_state, drafter, rows, snapshot
from hypothesis import given, settings
from test_drafter_properties import BAD, _good, calls

from mtp import DeepSeekV4MTP, Numerics
from mtp.drafter import Drafter
from mtp.sampling import Sampling, nan_flag, probs, sample
from mtp.testing import init_random_


def deferred(d: Drafter) -> Drafter:
    """``d`` with the eager path's value checks on the device, read at the next
    synchronisation (CUDA's way)."""
    d._defer_checks = True
    return d


def with_history(d: Drafter) -> Drafter:
    for name, start, n in (("a", 0, 5), ("b", 1, 2), ("idle", 0, 4)):
        d.add_sequence(name, position=start)
        h, ids, pos = rows(n, 3, start)
        d.propose([name], h, ids, pos, [n], k=3)
    return d


# ---- NaN draft logits --------------------------------------------------------------------------
@pytest.fixture
def broken_head():
    """A module whose head norm holds NaN while ``broken`` is on: finite inputs, finite KV,
    NaN logits (what broken weights give)."""
    model = init_random_(DeepSeekV4MTP(TINY, dtype=torch.float64, numerics=Numerics()), seed=5)
    norm = model.model.layers[str(TINY.num_hidden_layers)].shared_head.norm.weight
    keep = norm.clone()

    class Switch:
        def __init__(self):
            self.model = model

        def __call__(self, on: bool):
            norm.copy_(keep)
            if on:
                norm[0] = float("nan")

    yield Switch()


SAMPLINGS = {"greedy": lambda: Sampling(),
             "sampled": lambda: Sampling(temperature=0.8, top_p=0.9,
                                         generator=torch.Generator().manual_seed(1))}


def _two(model) -> tuple[Drafter, Drafter]:
    """A drafter and its twin, both with the same history."""
    out = []
    for _ in range(2):
        d = Drafter(model, max_seqs=2, max_draft_tokens=3)
        d.add_sequence("a")
        h, ids, pos = rows(6, 4)
        d.propose(["a"], h, ids, pos, [6], k=3)
        out.append(d)
    return out[0], out[1]


@pytest.mark.parametrize("mode", sorted(SAMPLINGS))
def test_nan_logits_are_refused_at_the_call_and_change_nothing(broken_head, mode):
    """Regression: NaN draft logits raised inside the draft steps, which the drafter took for a
    failed forward: every sequence of the call was removed (RuntimeError). Now (host checks,
    the CPU) the call raises "logits: hold NaN" and the drafter is bitwise as before it, then
    drafts exactly as its twin that never saw the call."""
    d, twin = _two(broken_head.model)
    before = snapshot(d)
    h, ids, pos = rows(2, 5, start=6)
    broken_head(True)
    with pytest.raises(ValueError, match=r"logits: hold NaN .*propose\(\['a'\]\) changed "
                                         "nothing"):
        d.propose(["a"], h, ids, pos, [2], k=3, sampling=SAMPLINGS[mode]())
    broken_head(False)
    assert_same_state(before, snapshot(d))
    h, ids, pos = rows(3, 6, start=6)
    pa = d.propose(["a"], h, ids, pos, [3], k=3, sampling=SAMPLINGS[mode]())
    pb = twin.propose(["a"], h, ids, pos, [3], k=3, sampling=SAMPLINGS[mode]())
    assert torch.equal(pa.drafts, pb.drafts) and torch.equal(pa.hidden, pb.hidden)
    assert_same_state(snapshot(d), snapshot(twin))


@pytest.mark.parametrize("how", ["next call", "Proposal.check", "synchronize"])
@pytest.mark.parametrize("mode", sorted(SAMPLINGS))
def test_nan_logits_deferred_raise_at_the_next_synchronisation(broken_head, mode, how):
    """The eager path on CUDA: NaN draft logits are flagged on the device, nothing waits; the
    call's cache writes are put back on the device, and the next synchronisation raises
    "logits: hold NaN" with next positions put back: the drafter is bitwise as before the
    call (as the whole-call graphs, which drop the call's entries instead)."""
    d, twin = _two(broken_head.model)
    deferred(d)
    before = snapshot(d)
    h, ids, pos = rows(2, 5, start=6)
    broken_head(True)
    p = d.propose(["a"], h, ids, pos, [2], k=3, sampling=SAMPLINGS[mode]())  # returns
    assert d.next_position("a") == 8 and p.drafts.shape == (1, 3)
    assert bool(((p.drafts >= 0) & (p.drafts < TINY.vocab_size)).all())  # in range, void
    broken_head(False)
    h2, ids2, pos2 = rows(3, 6, start=6)
    with pytest.raises(ValueError, match=r"logits: hold NaN .*found on the GPU after "
                                         r"propose\(\['a'\]\) returned") as info:
        if how == "next call":
            d.propose(["a"], h2, ids2, pos2, [3], k=3)
        elif how == "Proposal.check":
            p.check()
        else:
            d.synchronize()
    assert "changed nothing" in str(info.value)
    assert_same_state(before, snapshot(d))
    p.check()  # raised once
    pa = d.propose(["a"], h2, ids2, pos2, [3], k=3, sampling=SAMPLINGS[mode]()).check()
    pb = twin.propose(["a"], h2, ids2, pos2, [3], k=3, sampling=SAMPLINGS[mode]())
    assert torch.equal(pa.drafts, pb.drafts) and torch.equal(pa.hidden, pb.hidden)
    assert_same_state(snapshot(d), snapshot(twin))


# ---- input values ------------------------------------------------------------------------------
DEFERRED = {  # checked on the device: the call returns, the next one raises
    "position going backwards", "gap", "not consecutive", "id outside the vocabulary",
    "float16 row that rounds to inf", "bad temperature", "bad top_p"}


@pytest.mark.parametrize("case", sorted(BAD))
def test_refusals_with_device_checks_change_nothing(case):
    """Every refusal of the eager path with its value checks on the device: the host's checks
    raise at the call; the value checks at the next call with the message the host checks
    give; either way the drafter is bitwise as before the refused call."""
    d = deferred(with_history(drafter()))
    break_call, error, message = BAD[case]
    before = snapshot(d)
    if case in DEFERRED:
        d.propose(**break_call(_good()))  # returns: nothing was read
        with pytest.raises(error, match=message) as info:
            d.propose(**_good())
        assert "found on the GPU after propose(['a', 'b']) returned" in str(info.value)
    else:
        with pytest.raises(error, match=message):
            d.propose(**break_call(_good()))
    assert_same_state(before, snapshot(d))
    assert d.propose(**_good()).check().drafts.shape == (2, 2)


def test_feed_with_device_checks_refuses_at_the_next_call():
    d = deferred(with_history(drafter()))
    before = snapshot(d)
    h, ids, _ = rows(2, 8)
    d.feed(["a"], h, ids, torch.tensor([6, 7]), [2])  # a gap: "a" is at 5
    assert d.next_position("a") == 7
    with pytest.raises(ValueError, match=r"'a' starts at position 6, leaving a gap.*found on "
                                         r"the GPU after feed\(\['a'\]\) returned; that "
                                         "call's output is void"):
        d.synchronize()
    assert_same_state(before, snapshot(d))


def test_device_checks_compute_what_host_checks_compute():
    """The deferred path runs the forward on its stand-in tensors (ids, rows, positions where
    the drafter expects them): on good calls bitwise the host-checked path's drafts, residuals
    and cache, over a loop with catch-ups (longer than the window), feeds and int32 inputs."""
    host, dev = with_history(drafter()), deferred(with_history(drafter()))
    for r in range(5):
        counts = [r + 1, 2 * r + 1] if r != 3 else [TINY.sliding_window + 3, 1]
        h, ids, _ = rows(sum(counts), 40 + r)
        pos = torch.cat([torch.arange(host.next_position(s), host.next_position(s) + n)
                         for s, n in zip(["a", "b"], counts)])
        if r == 2:
            outs = [d.feed(["a", "b"], h, ids.int(), pos.int(), counts) for d in (host, dev)]
            assert torch.equal(outs[0], outs[1])
            continue
        s = Sampling(temperature=0.7, generator=torch.Generator().manual_seed(r)) if r == 4 \
            else Sampling()
        ph = host.propose(["a", "b"], h, ids, pos, counts, k=3, sampling=s)
        s = Sampling(temperature=0.7, generator=torch.Generator().manual_seed(r)) if r == 4 \
            else Sampling()
        pd = dev.propose(["a", "b"], h, ids, pos, counts, k=3, sampling=s).check()
        assert torch.equal(ph.drafts, pd.drafts) and torch.equal(ph.hidden, pd.hidden)
        assert (ph.probs is None) == (pd.probs is None)
        assert_same_state(snapshot(host), snapshot(dev))


@settings(max_examples=60, deadline=None)
@given(call=calls())
def test_random_calls_with_device_checks_run_or_are_refused_with_nothing_changed(call):
    """Whatever a caller passes, with the value checks on the device: the call is refused at
    once, or it runs and the next synchronisation either passes or raises a ValueError naming
    the problem; after a refusal the drafter is bitwise as before the call. Never the failure
    path (sequences removed)."""
    method, kwargs = call
    d = deferred(with_history(drafter()))
    before = snapshot(d)
    try:
        getattr(d, method)(**kwargs)
        try:
            d.synchronize()
        except ValueError as e:
            assert "found on the GPU after" in str(e), e
            assert_same_state(before, snapshot(d))
    except (ValueError, TypeError) as e:
        assert str(e) and "removed" not in str(e), e
        assert_same_state(before, snapshot(d))
    assert set(d.seq_ids) == {"a", "b", "idle"}


# ---- the sampling functions --------------------------------------------------------------------
def test_sample_without_the_nan_check_keeps_nan_rows_inside_the_vocabulary():
    """``check_nan=False`` (what the Drafter uses, keeping ``nan_flag`` on the device): a NaN
    row still gets a token in [0, V) (token 0 for a sampled row: torch.multinomial refuses NaN),
    the other rows are drawn as usual; with the check (the default) the call raises."""
    logits = torch.tensor([[0.0, 2.0, 1.0], [float("nan"), 0.0, 0.0], [5.0, 0.0, 1.0]])
    assert bool(nan_flag(logits)) and not bool(nan_flag(logits[[0, 2]]))
    greedy, _ = sample(logits, Sampling(), check_nan=False)
    assert greedy[[0, 2]].tolist() == [1, 0] and 0 <= int(greedy[1]) < 3
    tokens, q = sample(logits, Sampling(temperature=1.0, top_p=0.9,
                                        generator=torch.Generator().manual_seed(0)),
                       check_nan=False)
    assert int(tokens[1]) == 0 and torch.isnan(q[1]).all()
    assert bool((q[[0, 2]].gather(1, tokens[[0, 2], None]) > 0).all())  # drawn from their q
    for s in (Sampling(), Sampling(temperature=1.0)):
        with pytest.raises(ValueError, match="logits: holds NaN"):
            sample(logits, s)
    assert torch.isnan(probs(logits, Sampling(temperature=1.0), check_nan=False)[1]).all()


def test_device_checks_read_no_value_on_the_host(monkeypatch):
    """With the checks on the device, a good call never runs the host checks (each a read of
    the values: on CUDA a wait for the GPU); they run only to name the row once the device has
    found one."""
    import mtp.drafter as drafter_module

    def host_read(*args, **kwargs):
        raise AssertionError("a value check read the tensors on the host")

    d = deferred(with_history(drafter()))
    monkeypatch.setattr(drafter_module, "check_values", host_read)
    monkeypatch.setattr(drafter_module, "check_hidden_values", host_read)
    call = _good()
    d.propose(**call).check()
    h, ids, _ = rows(1, 9)
    d.feed(["a"], h, ids, torch.tensor([7]), [1])
    d.synchronize()
    assert d.next_position("a") == 8
