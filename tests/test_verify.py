"""Draft sampling (mtp.sampling) and verification (mtp.verify): against straightforward
references, and rejection sampling against the target distribution with chi-square tests."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mtp.sampling import Sampling, probs, sample
from mtp.verify import PAD, AcceptanceStats, VerifyResult, rejection_sample, verify_greedy

seeds = st.integers(0, 2**31 - 1)
F64 = torch.float64


# ---- chi-square machinery ---------------------------------------------------------------------
def chi_square_p_value(tokens: torch.Tensor, expected: torch.Tensor) -> float:
    """P(X >= observed statistic) for X ~ chi-square with (support - 1) degrees of freedom:
    the probability that a correct sampler produces a fit this bad or worse. Tokens outside
    the support of ``expected`` are an outright failure (p-value 0)."""
    v = expected.shape[0]
    counts = torch.bincount(tokens, minlength=v).to(F64)
    n = counts.sum()
    support = expected > 0
    if bool((counts[~support] > 0).any()):
        return 0.0
    e = expected[support].to(F64) * n
    stat = ((counts[support] - e) ** 2 / e).sum()
    dof = int(support.sum()) - 1
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=F64), stat / 2).item()


# Each distribution test asserts p-value > 1e-6. For a correct sampler the p-value is uniform
# on [0, 1], so a test fails with probability 1e-6 per check whatever the seed; with the seed
# fixed it is deterministic. The power checks below show that the same sample sizes reject the
# classic mistakes with p-values below 1e-30, so the threshold is not what makes them pass.
P_MIN = 1e-6


def _fixed_dists(v=6, k=2, seed=0):
    """Target p [k+1, V] (with a zero, as top-p leaves) and draft q [k, V], all different."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.rand(k + 1, v, generator=gen, dtype=F64) + 0.1
    p[1, 2] = 0.0
    q = torch.rand(k, v, generator=gen, dtype=F64) ** 3 + 0.02
    return p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)


def _speculate(p, q, n, seed, greedy_drafts=False):
    gen = torch.Generator().manual_seed(seed)
    k = q.shape[0]
    if greedy_drafts:
        drafts = q.argmax(-1).expand(n, k).contiguous()
        draft_probs = None
    else:
        drafts = torch.multinomial(q.repeat(n, 1), 1, generator=gen).view(n, k)
        draft_probs = q.expand(n, k, -1)
    result = rejection_sample(p.expand(n, k + 1, -1), drafts, draft_probs, generator=gen)
    return result, drafts


@pytest.mark.parametrize("greedy_drafts", [False, True])
def test_rejection_sampling_preserves_the_target_distribution(greedy_drafts):
    """Conditional on reaching position j, the emitted token is distributed as p_j: for
    accepted drafts, corrections from normalize(max(0, p - q)) and bonus tokens alike."""
    p, q = _fixed_dists()
    n = 60_000
    result, _ = _speculate(p, q, n, seed=1, greedy_drafts=greedy_drafts)
    a = result.num_accepted
    for j in range(p.shape[0]):
        reached = a >= j
        assert int(reached.sum()) > 2_000  # enough draws at every position for the test's power
        assert chi_square_p_value(result.tokens[reached, j], p[j]) > P_MIN


def test_the_chi_square_test_rejects_the_classic_mistakes():
    """Power check with the same sizes: resampling from p (instead of max(0, p - q)) after a
    rejection, or emitting drafts as they come, fails by a wide margin."""
    p, q = _fixed_dists()
    n = 60_000
    gen = torch.Generator().manual_seed(2)
    drafts = torch.multinomial(q[0].expand(n, -1), 1, generator=gen).squeeze(1)
    accept = torch.rand(n, generator=gen, dtype=F64) * q[0][drafts] < p[0][drafts]
    from_p = torch.multinomial(p[0].expand(n, -1), 1, generator=gen).squeeze(1)
    wrong = torch.where(accept, drafts, from_p)
    assert chi_square_p_value(wrong, p[0]) < 1e-30
    assert chi_square_p_value(drafts, p[0]) < 1e-30


def test_acceptance_rate_is_the_overlap_of_p_and_q():
    """P(draft 1 accepted) = sum_x min(p(x), q(x)); within 6 binomial standard deviations
    (a correct sampler misses with probability ~2e-9)."""
    p, q = _fixed_dists()
    n = 60_000
    result, _ = _speculate(p, q, n, seed=3)
    expected = torch.minimum(p[0], q[0]).sum().item()
    rate = (result.num_accepted >= 1).double().mean().item()
    assert abs(rate - expected) < 6 * (expected * (1 - expected) / n) ** 0.5


def test_rejection_sampling_edge_cases():
    v = 5
    p = torch.softmax(torch.randn(2, 4, v, dtype=F64), -1)  # S=2, k=3
    gen = torch.Generator().manual_seed(0)
    drafts = torch.multinomial(p[:, :3].reshape(-1, v), 1, generator=gen).view(2, 3)
    # q == p: every draft accepted, the bonus token comes from p's last row.
    r = rejection_sample(p, drafts, p[:, :3], generator=gen)
    assert r.num_accepted.tolist() == [3, 3]
    assert torch.equal(r.tokens[:, :3], drafts)
    # p(d) = 0: always rejected, and the correction never repeats the rejected draft.
    p0 = p.clone()
    p0[:, 0].scatter_(1, drafts[:, :1], 0.0)
    p0 = p0 / p0.sum(-1, keepdim=True)
    for seed in range(20):
        r = rejection_sample(p0, drafts, None, generator=torch.Generator().manual_seed(seed))
        assert r.num_accepted.tolist() == [0, 0]
        assert bool((r.tokens[:, 0] != drafts[:, 0]).all())
        assert bool((r.tokens[:, 1:] == PAD).all())
    # q = None with p one-hot on the drafts: deterministic drafts always accepted.
    onehot = torch.nn.functional.one_hot(torch.cat((drafts, drafts[:, :1]), 1), v).to(F64)
    r = rejection_sample(onehot, drafts, None)
    assert r.num_accepted.tolist() == [3, 3]
    assert r.emitted(0).tolist() == drafts[0].tolist() + [int(drafts[0, 0])]


def test_rejection_sampling_refuses_bad_input():
    p = torch.full((1, 3, 4), 0.25, dtype=F64)
    d = torch.tensor([[0, 1]])
    q = torch.full((1, 2, 4), 0.25, dtype=F64)
    with pytest.raises(ValueError, match="pass probabilities"):
        rejection_sample(torch.randn(1, 3, 4), d, q)
    with pytest.raises(ValueError, match=r"drafts: expected \[S, k\] = \[1, 2\]"):
        rejection_sample(p, d[:, :1], q)
    with pytest.raises(ValueError, match=r"draft_probs: expected \[S, k, V\] = \[1, 2, 4\]"):
        rejection_sample(p, d, q[:, :1])
    with pytest.raises(ValueError, match="not drawn from q"):
        rejection_sample(p, d, torch.tensor([[[0.0, 0.5, 0.5, 0.0], [0.25] * 4]], dtype=F64))
    with pytest.raises(ValueError, match=r"outside|\[0, 4\)"):
        rejection_sample(p, torch.tensor([[0, 4]]), q)
    with pytest.raises(TypeError, match="drafts: expected int64"):
        rejection_sample(p, d.float(), q)
    with pytest.raises(ValueError, match=r"target_probs: expected \[S, k\+1, V\]"):
        rejection_sample(p[0], d, q)


# ---- greedy verification -----------------------------------------------------------------------
def _greedy_reference(logits, drafts):
    """One sequence at a time, one position at a time."""
    tokens, accepted = [], []
    for s in range(drafts.shape[0]):
        out = []
        for j in range(drafts.shape[1] + 1):
            best = int(logits[s, j].argmax())
            if j < drafts.shape[1] and int(drafts[s, j]) == best:
                out.append(best)
                continue
            out.append(best)
            break
        accepted.append(len(out) - 1)
        tokens.append(out + [PAD] * (drafts.shape[1] + 1 - len(out)))
    return tokens, accepted


@given(s=st.integers(1, 5), k=st.integers(1, 5), v=st.integers(2, 9), seed=seeds)
def test_verify_greedy_matches_a_loop(s, k, v, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(s, k + 1, v, generator=gen)
    # Drafts that mostly agree with the target, so every accepted length shows up.
    drafts = logits[:, :k].argmax(-1)
    wrong = torch.rand(s, k, generator=gen) < 0.3
    drafts = torch.where(wrong, torch.randint(0, v, (s, k), generator=gen), drafts)
    r = verify_greedy(logits, drafts)
    tokens, accepted = _greedy_reference(logits, drafts)
    assert r.tokens.tolist() == tokens and r.num_accepted.tolist() == accepted


def test_verify_greedy_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"drafts: expected \[S, k\] = \[2, 3\]"):
        verify_greedy(torch.randn(2, 4, 7), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="floating-point"):
        verify_greedy(torch.zeros(2, 4, 7, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))


# ---- sampling ------------------------------------------------------------------------------------
def _top_p_reference(p: list[float], top_p: float) -> list[float]:
    order = sorted(range(len(p)), key=lambda i: -p[i])
    kept, mass = [], 0.0
    for i in order:
        if mass >= top_p:
            break
        kept.append(i)
        mass += p[i]
    total = sum(p[i] for i in kept)
    return [p[i] / total if i in kept else 0.0 for i in range(len(p))]


@given(v=st.integers(1, 12), temperature=st.floats(0.1, 5.0), top_p=st.floats(0.01, 1.0),
       seed=seeds)
def test_probs_match_softmax_with_temperature_and_top_p(v, temperature, top_p, seed):
    logits = torch.randn(3, v, generator=torch.Generator().manual_seed(seed), dtype=F64)
    got = probs(logits, Sampling(temperature=temperature, top_p=top_p))
    for row in range(3):
        p = torch.softmax(logits[row] / temperature, -1).tolist()
        # float64 softmax/cumsum differ from the loop's Python sums by ~1e-16; 1e-12 covers it.
        assert torch.allclose(got[row], torch.tensor(_top_p_reference(p, top_p), dtype=F64),
                              atol=1e-12, rtol=0)


def test_per_sequence_settings_equal_row_by_row_calls():
    logits = torch.randn(4, 10)
    temperature = torch.tensor([0.0, 0.5, 1.0, 2.0])
    top_p = torch.tensor([1.0, 0.9, 0.3, 1.0])
    got = probs(logits, Sampling(temperature=temperature, top_p=top_p))
    for i in range(4):
        row = probs(logits[i:i + 1], Sampling(temperature=float(temperature[i]),
                                              top_p=float(top_p[i])))
        assert torch.allclose(got[i], row[0], atol=1e-7)  # float32 softmax, same arithmetic
    assert got[0].tolist() == torch.nn.functional.one_hot(logits[0].argmax(), 10).float().tolist()


def test_greedy_sampling_is_the_argmax_without_q():
    logits = torch.randn(5, 11)
    tokens, q = sample(logits)
    assert q is None and torch.equal(tokens, logits.argmax(-1))


def test_a_temperature_tensor_samples_with_one_hot_rows_where_it_is_zero():
    """What is returned follows from the settings' types: a temperature tensor gives q even
    when every row is 0 (one-hot of the argmax: the same tokens, and q verifies as greedy),
    so whether q exists never waits for the tensor's values; the number 0 gives None."""
    logits = torch.randn(3, 7, generator=torch.Generator().manual_seed(2))
    one_hot = torch.nn.functional.one_hot(logits.argmax(-1), 7).float()
    for t in (torch.zeros(3), torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64)):
        s = Sampling(temperature=t, generator=torch.Generator().manual_seed(0))
        assert not s.greedy
        tokens, q = sample(logits, s)
        assert torch.equal(tokens, logits.argmax(-1)) and torch.equal(q, one_hot)
    assert Sampling(temperature=0.0).greedy and sample(logits, Sampling())[1] is None
    tokens, q = sample(logits, Sampling(temperature=torch.tensor([0.0, 1.0, 0.0]),
                                        generator=torch.Generator().manual_seed(1)))
    assert torch.equal(q[[0, 2]], one_hot[[0, 2]]) and tokens[[0, 2]].tolist() == \
        logits.argmax(-1)[[0, 2]].tolist()
    assert torch.allclose(q[1], torch.softmax(logits[1], -1))


def test_sampled_tokens_follow_q_and_use_only_the_generator():
    logits = torch.tensor([[0.5, 1.0, -1.0, 2.0, 0.0]]).expand(50_000, -1)
    state = torch.get_rng_state()
    tokens, q = sample(logits, Sampling(temperature=0.7, top_p=0.9,
                                        generator=torch.Generator().manual_seed(4)))
    assert torch.equal(state, torch.get_rng_state())  # the global generator is untouched
    assert chi_square_p_value(tokens, q[0].double()) > P_MIN
    again, _ = sample(logits, Sampling(temperature=0.7, top_p=0.9,
                                       generator=torch.Generator().manual_seed(4)))
    assert torch.equal(tokens, again)


def test_sampling_refuses_bad_settings():
    logits = torch.randn(2, 5)
    # scalars and the generator's type are refused when the Sampling is built, tensors [S]
    # when it meets the logits
    for bad, message in ((lambda: Sampling(temperature=float("nan")), "temperature: nan"),
                         (lambda: Sampling(temperature=1.0, top_p=1.5), "top_p: 1.5"),
                         (lambda: Sampling(temperature="hot"), "expected a float"),
                         (lambda: Sampling(temperature=torch.ones(2, 1)), r"\[2\]"),
                         (lambda: Sampling(temperature=torch.tensor([1.0, -1.0])),
                          "temperature: value -1"),
                         (lambda: Sampling(temperature=1.0, generator=0), "torch.Generator")):
        with pytest.raises((ValueError, TypeError), match=message):
            sample(logits, bad())


# ---- acceptance statistics ---------------------------------------------------------------------
def test_acceptance_statistics():
    stats = AcceptanceStats()
    stats.update(torch.tensor([0, 2, 3, 3]), k=3)
    stats.update(VerifyResult(torch.zeros(2, 4, dtype=torch.long), torch.tensor([1, 3])))
    # accepted lengths 0, 2, 3, 3, 1, 3 (k = 3): draft i+1 accepted when length > i
    assert stats.rates == [5 / 6, 4 / 6, 3 / 6]
    assert stats.conditional_rates == [5 / 6, 4 / 5, 3 / 4]
    assert stats.mean_accepted == 12 / 6 and stats.mean_emitted == 3.0
    assert "6 proposals" in str(stats) and "0.83 0.67 0.50" in str(stats)
    with pytest.raises(ValueError, match=r"num_accepted: values must be in \[0, 3\]"):
        stats.update(torch.tensor([4]), k=3)
    with pytest.raises(ValueError, match="k: expected"):
        stats.update(torch.tensor([1]))


def test_bad_sampling_and_verification_inputs_are_refused():
    """Regression: each of these was accepted and gave garbage or inverted distributions."""
    for value in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="Sampling.temperature"):
            Sampling(temperature=value)
    for value in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="Sampling.top_p"):
            Sampling(temperature=1.0, top_p=value)
    with pytest.raises(TypeError, match="Sampling.generator: expected a torch.Generator"):
        Sampling(temperature=1.0, generator=42)
    nan_logits = torch.tensor([[float("nan"), 1.0, 0.0]])
    with pytest.raises(ValueError, match="logits: holds NaN"):
        sample(nan_logits)
    with pytest.raises(ValueError, match="logits: holds NaN"):
        probs(nan_logits, Sampling(temperature=1.0))
    with pytest.raises(ValueError, match="target_logits: holds NaN"):
        verify_greedy(nan_logits[:, None].expand(1, 2, 3), torch.tensor([[1]]))
    p = torch.full((1, 2, 3), 1 / 3)
    with pytest.raises(TypeError, match="generator: expected a torch.Generator"):
        rejection_sample(p, torch.tensor([[1]]), None, generator=42)
    stats = AcceptanceStats()
    with pytest.raises(ValueError, match="k: expected"):
        stats.update(torch.tensor([1]), k=True)
    with pytest.raises(ValueError, match="num_accepted: expected whole numbers"):
        stats.update(torch.tensor([0.5, 1.0]), k=2)
    assert stats.proposals == 0
