"""A reference speculative-decoding loop, over a small target protocol.

What an engine's model must provide to decode with an MTP drafter (:class:`Target`): its own
per-sequence KV cache, a forward over new tokens that returns the next-token logits *and* the
pre-``hc_head`` residual rows (what the drafter's ``hidden_states`` takes), and a rollback that
drops the rejected drafts from the cache. :func:`generate` is the loop, written once:

1. ``prefill`` the prompts; the target's first token comes from the last prompt row.
2. The drafter consumes the verified rows it has not seen (catch-up: residual of row j with the
   token at j + 1) and drafts k tokens (``Drafter.propose``).
3. ``extend`` feeds, per sequence, the last emitted token and its k drafts (T = k + 1): the
   logits of those k + 1 rows verify the drafts (``mtp.verify``: greedy, or rejection sampling
   with the drafts' q), which accepts a prefix of a drafts and emits one more token.
4. ``rollback`` keeps the last token and the a accepted drafts in the cache; their residual
   rows are the next catch-up.

It is lossless: greedy output is identical, token for token, to plain greedy decoding with the
target alone (``drafter=None``), and sampled output is distributed as the target's own samples.

Example:
    >>> from mtp.drafter import Drafter
    >>> from mtp.demo import ToyTarget, matching_mtp
    >>> target = ToyTarget.random(seed=0)
    >>> drafter = Drafter(matching_mtp(target), max_seqs=2, max_draft_tokens=3)
    >>> tokens, stats = generate(target, drafter, [1, 2, 3], 24, k=3)
    >>> plain, _ = generate(target, None, [1, 2, 3], 24)
    >>> tokens == plain
    True
    >>> len(stats.acceptance_per_position), stats.mean_accepted_length > 1
    (3, True)

Shape legend: B sequences, T rows per sequence, k drafts, V vocabulary, M*D = hc_mult * hidden.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from .sampling import GREEDY, Sampling, probs, sample
from .verify import AcceptanceStats, rejection_sample, verify_greedy


@dataclass
class TargetOutput:
    """What a target returns for the tokens it was fed.

    ``logits`` [B, T, V] float32: the next-token logits after each new token.
    ``residuals`` [B, T, M*D]: the pre-``hc_head`` residual rows of those tokens (the
    drafter's ``hidden_states``).
    """

    logits: torch.Tensor
    residuals: torch.Tensor


@runtime_checkable
class Target(Protocol):
    """An engine's model with its own per-sequence KV cache, for B sequences at once."""

    hc_dim: int  # hc_mult * hidden_size of the residuals
    vocab_size: int

    def prefill(self, prompts: Sequence[Sequence[int]]) -> list[TargetOutput]:
        """Start B new sequences (dropping any earlier ones); output i holds prompt i's rows
        (logits [1, n_i, V], residuals [1, n_i, M*D])."""
        ...

    def extend(self, tokens: torch.Tensor) -> TargetOutput:
        """tokens [B, T]: append T tokens to every sequence (each at its own next position);
        returns logits [B, T, V] and residuals [B, T, M*D] of those tokens."""
        ...

    def rollback(self, lengths: Sequence[int]) -> None:
        """Sequence b keeps only its first lengths[b] tokens (the rest leave its cache)."""
        ...


@dataclass
class SpecStats:
    """Acceptance of one :func:`generate` call.

    ``k``: drafts per verification (0 without a drafter). ``verifications``: target calls that
    verified drafts, counted per sequence. ``acceptance_per_position[j]``: the fraction of
    verifications whose draft at position j + 1 was accepted. ``mean_accepted_length``: tokens
    emitted per verification (accepted drafts + the target's own token; 1.0 without drafts).
    ``target_calls``: batched target forwards after the prefill.
    """

    k: int
    verifications: int
    acceptance_per_position: list[float]
    mean_accepted_length: float
    target_calls: int = 0
    accepted_counts: list[int] = field(default_factory=list, repr=False)  # a per verification


def check_prompts(prompts, vocab_size: int) -> list[list[int]]:
    """Prompts as lists of ints in [0, vocab_size), each non-empty; a clear error otherwise."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts: expected a non-empty list of token-id lists")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, torch.Tensor):
            p = p.tolist()
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or not p:
            raise ValueError(f"prompts[{i}]: expected a non-empty list of token ids (encode text "
                             "first, e.g. mtp.demo.TOKENIZER.encode)")
        for t in p:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size:
                raise ValueError(f"prompts[{i}]: token {t!r} is not an id in [0, {vocab_size})")
        out.append(list(p))
    return out


_seq_ids = itertools.count()


def generate(target: Target, drafter, prompt_ids, max_new_tokens: int, *, k: int = 3,
             sampling: Sampling = GREEDY, generator: torch.Generator | None = None):
    """Speculative decoding of one prompt or several at once.

    Args:
        target: a :class:`Target` (e.g. ``mtp.demo.ToyTarget``, or an engine's adapter).
        drafter: a ``mtp.drafter.Drafter`` sharing the target's vocabulary, or None for plain
            decoding with the target alone. (Anything with the Drafter's ``add_sequence``,
            ``remove_sequence`` and ``propose`` works, e.g. a baseline drafter.)
        prompt_ids: list[int] (one prompt) or list[list[int]] (several, decoded as a batch).
        max_new_tokens: tokens generated per prompt (>= 1).
        k: drafts per verification (the drafter's ``max_draft_tokens`` bounds it).
        sampling: greedy (default) or temperature / top-p; drafts are sampled with the same
            settings, the target's tokens by rejection sampling.
        generator: the ``torch.Generator`` for verification and the target's own samples
            (default: ``sampling.generator``).

    Returns ``(tokens, stats)``: the new tokens (list[int], or a list of them for several
    prompts; the prompt is not repeated) and a :class:`SpecStats`.
    """
    single = isinstance(prompt_ids, Sequence) and len(prompt_ids) > 0 and \
        all(isinstance(t, int) and not isinstance(t, bool) for t in prompt_ids)
    prompts = check_prompts([prompt_ids] if single else prompt_ids, target.vocab_size)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    if not isinstance(sampling, Sampling):
        raise TypeError(f"sampling: expected a mtp.sampling.Sampling, got "
                        f"{type(sampling).__name__}")
    if drafter is not None:
        limit = getattr(drafter, "max_draft_tokens", k)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= limit:
            raise ValueError(f"k: expected an int in [1, {limit}] (the drafter's "
                             f"max_draft_tokens), got {k!r}")
        if getattr(drafter, "max_seqs", len(prompts)) < len(prompts):
            raise ValueError(f"prompt_ids: {len(prompts)} prompts, but the drafter holds at "
                             f"most {drafter.max_seqs} sequences (its max_seqs)")
    gen = generator if generator is not None else sampling.generator
    if drafter is None:
        out, stats = _plain(target, prompts, max_new_tokens, sampling, gen)
    else:
        out, stats = _speculative(target, drafter, prompts, max_new_tokens, k, sampling, gen)
    return (out[0] if single else out), stats


def _first_tokens(outs: list[TargetOutput], sampling: Sampling, gen) -> list[int]:
    last = torch.cat([o.logits[0, -1:] for o in outs])  # [B, V]
    return _sample(last, sampling, gen).tolist()


def _sample(logits: torch.Tensor, sampling: Sampling, gen) -> torch.Tensor:
    """[B, V] -> [B] with the target's settings and the verification generator."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    return sample(logits, Sampling(sampling.temperature, sampling.top_p, gen))[0]


def _plain(target: Target, prompts, max_new: int, sampling: Sampling, gen):
    outs = target.prefill(prompts)
    new = [[t] for t in _first_tokens(outs, sampling, gen)]
    calls = 0
    while len(new[0]) < max_new:
        last = torch.tensor([[n[-1]] for n in new], device=outs[0].logits.device)
        logits = target.extend(last).logits[:, -1]  # [B, V]
        calls += 1
        for n, t in zip(new, _sample(logits, sampling, gen).tolist()):
            n.append(t)
    return new, SpecStats(0, 0, [], 1.0, calls)


def _speculative(target: Target, drafter, prompts, max_new: int, k: int, sampling: Sampling,
                 gen):
    outs = target.prefill(prompts)
    device = outs[0].logits.device
    new = [[t] for t in _first_tokens(outs, sampling, gen)]
    seqs = [p + n for p, n in zip(prompts, new)]  # all tokens; the last is not in the cache
    # Rows the drafter has not consumed: residuals of positions fed .. len - 2.
    pending = [o.residuals[0] for o in outs]
    fed = [0] * len(prompts)
    ids = [("generate", next(_seq_ids), b) for b in range(len(prompts))]
    stats, counts, calls = AcceptanceStats(), [], 0
    for seq_id in ids:
        drafter.add_sequence(seq_id)
    try:
        while min(len(n) for n in new) < max_new:
            active = [len(n) < max_new for n in new]
            n_rows = [len(s) - 1 - f for s, f in zip(seqs, fed)]  # rows fed .. len - 2
            prop = drafter.propose(
                ids, torch.cat(pending).to(device),
                torch.tensor([t for s, f in zip(seqs, fed) for t in s[f + 1:]], device=device),
                torch.cat([torch.arange(f, f + n) for f, n in zip(fed, n_rows)]).to(device),
                n_rows, k=k, sampling=sampling)
            drafts = prop.drafts.to(device)  # [B, k]
            last = torch.tensor([[s[-1]] for s in seqs], device=device)
            scored = target.extend(torch.cat((last, drafts), dim=1))  # rows: last, d_1 .. d_k
            calls += 1
            if sampling.greedy:
                result = verify_greedy(scored.logits, drafts)
            else:
                q = None if prop.probs is None else prop.probs.to(device)
                result = rejection_sample(probs(scored.logits, sampling), drafts, q,
                                          generator=gen)
            accepted = result.num_accepted.tolist()
            lengths = []
            for b, a in enumerate(accepted):
                kept = len(seqs[b])  # the last token and a drafts stay: positions .. len - 1 + a
                lengths.append(kept + a)
                emitted = result.emitted(b).tolist()
                fed[b] = len(seqs[b]) - 1
                pending[b] = scored.residuals[b, :a + 1]
                seqs[b] += emitted
                new[b] += emitted
                if active[b]:
                    counts.append(a)
            target.rollback(lengths)
            stats.update(torch.tensor([a for a, on in zip(accepted, active) if on]), k=k)
    finally:
        for seq_id in ids:
            if seq_id in drafter:
                drafter.remove_sequence(seq_id)
    out = [n[:max_new] for n in new]
    if not counts:  # max_new_tokens == 1: the prefill's token, nothing verified
        return out, SpecStats(k, 0, [0.0] * k, 1.0, calls, counts)
    return out, SpecStats(k, stats.proposals, stats.rates, stats.mean_emitted, calls, counts)


__all__ = ["SpecStats", "Target", "TargetOutput", "check_prompts", "generate"]
