"""The speculative-decoding loop (mtp.speculative.generate) and the toy target's protocol.

Lossless greedy: speculative output equals plain decoding with the target alone, and both equal
an independent recomputation (the target's stateless forward over the whole sequence, argmax,
one token at a time: no KV cache, no rollback). Float64 keeps exact ties impossible in practice,
so "equal" can be asserted token for token. Sampled: the joint distribution of three generated
tokens equals the target's, by a chi-square test (the machinery of tests/test_verify.py)."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import tiny_config
from hypothesis import given
from hypothesis import strategies as st
from test_verify import P_MIN, chi_square_p_value

from mtp.demo import ToyTarget, matching_mtp
from mtp.drafter import Drafter
from mtp.sampling import Sampling
from mtp.speculative import SpecStats, Target, generate

F64 = torch.float64


def toy_pair(vocab: int | None = None, dtype=F64, max_seqs: int = 4, seed: int = 0):
    cfg = tiny_config() if vocab is None else tiny_config(vocab_size=vocab)
    target = ToyTarget.random(cfg, seed=seed, dtype=dtype)
    return target, Drafter(matching_mtp(target), max_seqs=max_seqs, max_draft_tokens=4)


@pytest.fixture(scope="module")
def pair():
    return toy_pair()


def recompute_greedy(target: ToyTarget, prompt: list[int], n: int) -> list[int]:
    """Plain greedy decoding by the stateless forward over the whole sequence each step."""
    tokens = torch.tensor(prompt)
    for _ in range(n):
        tokens = torch.cat((tokens, target(tokens)[0][-1:].argmax(-1)))
    return tokens[len(prompt):].tolist()


# ---- the target protocol ----------------------------------------------------------------------
def test_the_toy_target_implements_the_protocol():
    assert isinstance(ToyTarget.random(), Target)


def test_cached_extend_and_rollback_equal_the_stateless_forward(pair):
    """prefill, extend by several lengths, roll back (also across an earlier extend), extend
    again: every returned row equals the stateless forward over the sequence it belongs to."""
    target, _ = pair
    gen = torch.Generator().manual_seed(0)
    prompts = [[5, 6, 7], [9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]  # the last is longer than W
    seqs = [list(p) for p in prompts]
    outs = target.prefill(prompts)
    checks = [(o.logits[0], o.residuals[0], list(s)) for o, s in zip(outs, seqs)]
    for t, rollback in ((4, [1, 0, 3]), (1, [0, 0, 0]), (8, [5, 9, 2]), (3, [2, 1, 4])):
        new = torch.randint(0, target.vocab_size, (3, t), generator=gen)
        out = target.extend(new)
        for b in range(3):
            seqs[b] += new[b].tolist()
            checks.append((out.logits[b], out.residuals[b], list(seqs[b])))
        keep = [len(s) - r for s, r in zip(seqs, rollback)]
        target.rollback(keep)
        seqs = [s[:n] for s, n in zip(seqs, keep)]
        assert target.lengths == keep
    for logits, residual, seq in checks:
        ref_logits, ref_residual = target(torch.tensor(seq))
        t = logits.shape[0]
        # float64 both ways; only the order of a few reductions differs (cache vs new rows)
        torch.testing.assert_close(logits, ref_logits[-t:], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(residual, ref_residual[-t:], rtol=1e-12, atol=1e-12)


def test_the_toy_target_refuses_bad_calls_and_keeps_its_state(pair):
    target, _ = pair
    target.prefill([[1, 2, 3], [4, 5]])
    before = (list(target.lengths), target.cache.pos.clone())
    bad = [
        (lambda: target.extend(torch.tensor([[1, 2]])), "expected [B, T] = [2, 1..8]"),
        (lambda: target.extend(torch.zeros(2, 9, dtype=torch.long)), "at most max_extend"),
        (lambda: target.extend(torch.tensor([[1], [5000]])), "ids must be in [0, 1024)"),
        (lambda: target.extend(torch.ones(2, 1)), "int64 or int32"),
        (lambda: target.rollback([3]), "expected 2 lengths"),
        (lambda: target.rollback([4, 2]), "lengths[0]: expected an int in [0, 3]"),
        (lambda: target.prefill([[1], []]), "prompts[1]: expected a non-empty list"),
        (lambda: target.prefill([[1, 1024]]), "token 1024 is not an id in [0, 1024)"),
    ]
    for call, message in bad:
        with pytest.raises((ValueError, TypeError)) as info:
            call()
        assert message in str(info.value)
        assert target.lengths == before[0] and torch.equal(target.cache.pos, before[1])
    target.extend(torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"lengths\[0\]: expected an int in \[2, 11\]"):
        target.rollback([1, 10])  # 10 tokens back: the ring no longer holds what it needs


# ---- lossless greedy -------------------------------------------------------------------------
@given(prompts=st.lists(st.lists(st.integers(0, 1023), min_size=1, max_size=12), min_size=1,
                        max_size=3),
       k=st.integers(1, 4), max_new=st.integers(1, 20))
def test_greedy_speculative_equals_plain_and_recomputed_decoding(pair, prompts, k, max_new):
    target, drafter = pair
    spec, stats = generate(target, drafter, prompts, max_new, k=k)
    plain, plain_stats = generate(target, None, prompts, max_new)
    assert spec == plain
    assert [len(s) for s in spec] == [max_new] * len(prompts)
    assert spec == [recompute_greedy(target, p, max_new) for p in prompts]
    assert drafter.seq_ids == []  # released
    assert plain_stats == SpecStats(0, 0, [], 1.0, max_new - 1)
    # stats: one verification per sequence and target call while it still needed tokens
    assert stats.k == k and len(stats.acceptance_per_position) == k
    assert stats.verifications == len(stats.accepted_counts)
    if stats.verifications:
        a = torch.tensor(stats.accepted_counts, dtype=F64)
        assert stats.mean_accepted_length == pytest.approx(float(a.mean()) + 1)
        rates = [float((a > j).to(F64).mean()) for j in range(k)]
        assert stats.acceptance_per_position == pytest.approx(rates)


def test_a_single_prompt_gives_a_flat_list_and_drafts_are_accepted(pair):
    target, drafter = pair
    tokens, stats = generate(target, drafter, [7, 100, 5, 42, 9], 30, k=3)
    assert isinstance(tokens, list) and all(isinstance(t, int) for t in tokens)
    assert tokens == recompute_greedy(target, [7, 100, 5, 42, 9], 30)
    # the matching toy layer agrees with the target often: far more than chance (1/1024)
    assert stats.acceptance_per_position[0] > 0.3
    assert stats.target_calls < 29  # fewer target forwards than tokens


def test_generate_refuses_bad_arguments(pair):
    target, drafter = pair
    for kwargs, message in (
        (dict(prompt_ids=[], max_new_tokens=3), "non-empty list"),
        (dict(prompt_ids=[[1], []], max_new_tokens=3), "prompts[1]"),
        (dict(prompt_ids=[1, 2], max_new_tokens=0), "max_new_tokens"),
        (dict(prompt_ids=[1, 2], max_new_tokens=3, k=5), "k: expected an int in [1, 4]"),
        (dict(prompt_ids=[[1]] * 5, max_new_tokens=3), "at most 4 sequences"),
        (dict(prompt_ids=[1, 2], max_new_tokens=3, sampling=0.5), "sampling: expected"),
    ):
        with pytest.raises((ValueError, TypeError)) as info:
            generate(target, drafter, **kwargs)
        assert message in str(info.value)
    assert drafter.seq_ids == []


# ---- sampled: distributed as the target's own samples ----------------------------------------
def exact_joint(target: ToyTarget, prompt: list[int], n: int, temperature: float):
    """P(t_1 .. t_n | prompt) for every outcome, by the stateless forward: [V**n]."""
    v = target.vocab_size
    out = torch.zeros(v ** n, dtype=F64)
    for i, seq in enumerate(itertools.product(range(v), repeat=n)):
        logits = target(torch.tensor(prompt + list(seq)))[0][len(prompt) - 1:-1].to(F64)
        p = torch.softmax(logits / temperature, dim=-1)  # [n, V]
        out[i] = p[torch.arange(n), torch.tensor(seq)].prod()
    return out


def test_sampled_speculative_output_follows_the_target_distribution():
    """5000 copies of one prompt decoded as a batch, 3 new tokens each (the first from the
    prefill, the next two verified by rejection sampling with k = 2): the joint of the three
    tokens (3**3 = 27 outcomes) against the exact one, at two temperatures. Power: each
    temperature's samples fail the other's test by far (p < 1e-30)."""
    n, v, new = 5000, 3, 3
    target, drafter = toy_pair(vocab=v, dtype=torch.float32, max_seqs=n)
    prompt = [1, 2, 0, 2]
    outcomes, expected = {}, {}
    for temperature in (1.0, 0.6):
        expected[temperature] = exact_joint(target, prompt, new, temperature)
        gen = torch.Generator().manual_seed(0)
        sampling = Sampling(temperature=temperature, generator=gen)
        tokens, stats = generate(target, drafter, [prompt] * n, new, k=2, sampling=sampling)
        outcomes[temperature] = torch.tensor(tokens) @ torch.tensor([v * v, v, 1])
        assert chi_square_p_value(outcomes[temperature], expected[temperature]) > P_MIN
        assert 0.2 < stats.acceptance_per_position[0] < 1.0  # accepted and rejected drafts
    assert chi_square_p_value(outcomes[1.0], expected[0.6]) < 1e-30
    assert chi_square_p_value(outcomes[0.6], expected[1.0]) < 1e-30
