"""Verification of drafts against the target, on batches, and acceptance statistics.

The target scores the last real token and the k drafts in one forward, giving k + 1
distributions per sequence: row j predicts the token after draft j (row 0: after the last real
token, i.e. where draft 1 goes; row k: the bonus token after the last draft).

- :func:`verify_greedy`: accept drafts while they equal the target's argmax; then emit the
  target's argmax (the correction, or the bonus token when all k are accepted).
- :func:`rejection_sample`: speculative rejection sampling (Leviathan et al. 2023, Chen et al.
  2023): accept draft x with probability min(1, p(x) / q(x)); at the first rejection sample from
  normalize(max(0, p - q)); if all k are accepted, sample the bonus token from p. The emitted
  tokens are distributed exactly as if the target had sampled them one by one.
- :class:`AcceptanceStats`: acceptance rate per draft position and mean accepted length.

Both verifiers return a :class:`VerifyResult`: ``tokens`` [S, k+1] (the accepted drafts, then
the target's token, then -1 padding) and ``num_accepted`` [S] (a in 0..k; a + 1 tokens emitted).

Shape legend: S sequences, k drafts per sequence, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .sampling import refuse_nan

PAD = -1  # fills ``VerifyResult.tokens`` after the emitted ones


@dataclass
class VerifyResult:
    """``tokens`` [S, k+1] int64: accepted drafts, then the target's token, then ``PAD``;
    ``num_accepted`` [S] int64: drafts accepted (the sequence grows by num_accepted + 1)."""

    tokens: torch.Tensor
    num_accepted: torch.Tensor

    def emitted(self, i: int) -> torch.Tensor:
        """The tokens sequence i gains, [num_accepted[i] + 1]."""
        return self.tokens[i, : int(self.num_accepted[i]) + 1]


def _check_drafts(drafts: torch.Tensor, s: int, k: int, vocab: int) -> None:
    if not isinstance(drafts, torch.Tensor) or drafts.dim() != 2 or tuple(drafts.shape) != (s, k):
        raise ValueError(f"drafts: expected [S, k] = [{s}, {k}] (one row of k drafts per "
                         f"sequence), got {_describe(drafts)}")
    if drafts.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"drafts: expected int64 or int32 token ids, got {drafts.dtype}")
    if drafts.numel() and (int(drafts.min()) < 0 or int(drafts.max()) >= vocab):
        raise ValueError(f"drafts: token ids must be in [0, {vocab}) (the target's vocabulary)")


def _check_target(x: torch.Tensor, name: str) -> tuple[int, int, int]:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] < 1:
        raise ValueError(f"{name}: expected [S, k+1, V] (the target's k+1 rows per sequence: "
                         f"after the last real token and after each draft), got {_describe(x)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    return x.shape[0], x.shape[1] - 1, x.shape[2]


def _accepted_length(accept: torch.Tensor) -> torch.Tensor:
    """[S, k] bool per position -> [S] length of the accepted prefix."""
    return accept.to(torch.int64).cumprod(dim=1).sum(dim=1)


def _assemble(drafts: torch.Tensor, num_accepted: torch.Tensor, last: torch.Tensor
              ) -> VerifyResult:
    """tokens[:, j] = drafts[:, j] for j < a, last at j = a, PAD after."""
    s, k = drafts.shape
    tokens = torch.full((s, k + 1), PAD, dtype=torch.int64, device=drafts.device)
    j = torch.arange(k + 1, device=drafts.device)[None, :]
    a = num_accepted[:, None]
    tokens[:, :k] = torch.where(j[:, :k] < a, drafts.to(torch.int64), PAD)
    tokens.scatter_(1, a, last[:, None].to(torch.int64))
    return VerifyResult(tokens, num_accepted)


def verify_greedy(target_logits: torch.Tensor, drafts: torch.Tensor) -> VerifyResult:
    """Greedy (temperature 0) verification.

    Args:
        target_logits: [S, k+1, V]; row j predicts the token after draft j (row 0: where
            draft 1 goes).
        drafts: [S, k] token ids.

    NaN in ``target_logits`` raises ``ValueError`` (``mtp.sampling.refuse_nan``), on CUDA
    too: the check reads one flag there, a host synchronisation, as the drafts' range check
    does; the result is read right after by the caller anyway.

    Example:
        >>> logits = torch.eye(4)[None, [2, 3, 1]]  # target argmax: 2, then 3, then 1
        >>> r = verify_greedy(logits, torch.tensor([[2, 0]]))
        >>> r.num_accepted, r.tokens                 # draft 2 accepted, 0 rejected -> 3
        (tensor([1]), tensor([[ 2,  3, -1]]))
    """
    s, k, v = _check_target(target_logits, "target_logits")
    _check_drafts(drafts, s, k, v)
    refuse_nan(target_logits, "target_logits")
    choice = target_logits.argmax(dim=-1)  # [S, k+1]
    a = _accepted_length(choice[:, :k] == drafts)
    return _assemble(drafts, a, choice.gather(1, a[:, None]).squeeze(1))


def rejection_sample(target_probs: torch.Tensor, drafts: torch.Tensor,
                     draft_probs: torch.Tensor | None, *,
                     generator: torch.Generator | None = None) -> VerifyResult:
    """Speculative rejection sampling on a batch.

    Args:
        target_probs: p, [S, k+1, V], the target's distributions under its sampling settings
            (``mtp.sampling.probs(target_logits, sampling)``).
        drafts: [S, k] token ids, drawn from ``draft_probs``.
        draft_probs: q, [S, k, V], the distributions the drafts were drawn from
            (``Proposal.probs``), or None for deterministic (greedy) drafts, whose q is one-hot:
            the draft is then accepted with probability p(x).
        generator: the ``torch.Generator`` for every draw (on the probabilities' device).

    Example:
        >>> p = torch.tensor([[[0.5, 0.5], [1.0, 0.0]]])          # S=1, k=1, V=2
        >>> gen = torch.Generator().manual_seed(0)
        >>> r = rejection_sample(p, torch.tensor([[1]]), None, generator=gen)
        >>> r.emitted(0).tolist()        # draft 1 accepted with p(1) = 0.5 (here: it was)
        [1, 0]
    """
    s, k, v = _check_target(target_probs, "target_probs")
    _check_drafts(drafts, s, k, v)
    _check_probs(target_probs, "target_probs")
    d = drafts.to(torch.int64)[:, :, None]  # [S, k, 1]
    p_draft = target_probs[:, :k].gather(2, d).squeeze(2)  # p(x_j), [S, k]
    if draft_probs is None:
        q_draft = torch.ones_like(p_draft)
    else:
        if not isinstance(draft_probs, torch.Tensor) or tuple(draft_probs.shape) != (s, k, v):
            raise ValueError(f"draft_probs: expected [S, k, V] = [{s}, {k}, {v}], got "
                             f"{_describe(draft_probs)}")
        _check_probs(draft_probs, "draft_probs")
        q_draft = draft_probs.gather(2, d).squeeze(2).to(p_draft.dtype)
        if bool((q_draft <= 0).any()):
            raise ValueError("draft_probs: a draft has probability 0 under its own q, so it "
                             "was not drawn from q; pass the q that sampled these drafts")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    if generator is not None and generator.device.type != target_probs.device.type:
        raise ValueError(f"generator: on {generator.device}, but the probabilities are on "
                         f"{target_probs.device}")

    u = torch.rand(p_draft.shape, generator=generator, dtype=p_draft.dtype,
                   device=p_draft.device)
    # u < p/q, written without dividing: accepts with probability min(1, p/q) for u ~ U[0, 1).
    a = _accepted_length(u * q_draft < p_draft)  # [S]

    # The last token's distribution: normalize(max(0, p - q)) at the first rejection, p itself
    # (the bonus token) when all k were accepted.
    rows = torch.arange(s, device=p_draft.device)
    p_last = target_probs[rows, a]  # [S, V]
    if draft_probs is None:  # q = one-hot of the rejected draft; nothing after the last one
        padded = torch.cat((drafts.to(torch.int64), drafts.new_zeros(s, 1, dtype=torch.int64)),
                           dim=1)  # [S, k+1]
        q_last = F.one_hot(padded[rows, a], v).to(p_last.dtype) * (a < k)[:, None]
    else:
        q_pad = torch.cat((draft_probs.to(p_last.dtype),
                           torch.zeros_like(p_last)[:, None]), dim=1)  # [S, k+1, V]; row k: 0
        q_last = q_pad[rows, a]
    residual = (p_last - q_last).clamp_min(0)
    mass = residual.sum(dim=-1, keepdim=True)
    # mass is 0 only when p == q on the draft's support, where rejection has probability 0;
    # rounding can still get here, and p is then the right distribution.
    dist = torch.where(mass > 0, residual, p_last)
    last = torch.multinomial(dist, 1, generator=generator).squeeze(1)
    return _assemble(drafts, a, last)


def _check_probs(x: torch.Tensor, name: str) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected floating-point probabilities, got {x.dtype}")
    if bool((~torch.isfinite(x)).any()) or bool((x < 0).any()):
        raise ValueError(f"{name}: probabilities must be finite and >= 0 (pass probabilities, "
                         "e.g. mtp.sampling.probs(logits, sampling), not logits)")
    sums = x.double().sum(dim=-1)
    # Each row must be a distribution; 1e-3 leaves room for bf16/fp32 softmax rounding.
    off = (sums - 1).abs().flatten()
    if bool((off > 1e-3).any()):
        worst = sums.flatten()[off.argmax()].item()
        raise ValueError(f"{name}: every row must sum to 1 (found a row summing to "
                         f"{worst:.6g}); pass probabilities, not logits")


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"shape {list(x.shape)} ({x.dtype})"
    return "None" if x is None else repr(type(x).__name__)


class AcceptanceStats:
    """Running acceptance statistics over verification steps.

    ``rates[i]``: the fraction of proposals whose draft i+1 was accepted (the acceptance rate
    per draft position); ``conditional_rates[i]``: the same among proposals whose draft i was
    accepted; ``mean_accepted``: drafts accepted per proposal (the mean accepted length);
    ``mean_emitted`` = mean_accepted + 1, the tokens each target forward yields.

    Example:
        >>> stats = AcceptanceStats()
        >>> stats.update(torch.tensor([0, 2, 3, 3]), k=3)
        >>> stats.rates, stats.mean_accepted
        ([0.75, 0.75, 0.5], 2.0)
    """

    def __init__(self) -> None:
        self.proposals = 0
        self.accepted_total = 0
        self._proposed_at: list[int] = []  # proposals that had a draft at position i
        self._accepted_at: list[int] = []  # ... whose draft at position i was accepted

    def update(self, num_accepted: torch.Tensor | VerifyResult, k: int | None = None) -> None:
        """Add one verification step: ``num_accepted`` [S] (or a :class:`VerifyResult`) with
        k drafts per sequence (inferred from a VerifyResult)."""
        if isinstance(num_accepted, VerifyResult):
            k = num_accepted.tokens.shape[1] - 1 if k is None else k
            num_accepted = num_accepted.num_accepted
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k: expected the number of drafts per sequence (>= 1), got {k!r}")
        raw = torch.as_tensor(num_accepted).flatten().cpu()
        if raw.is_floating_point() and not bool((raw == raw.round()).all()):
            raise ValueError(f"num_accepted: expected whole numbers of accepted drafts, got "
                             f"{raw[raw != raw.round()][0].item()}")
        if raw.dtype == torch.bool or raw.is_complex():
            raise TypeError(f"num_accepted: expected integer counts, got {raw.dtype}")
        a = raw.to(torch.int64)
        if a.numel() and (int(a.min()) < 0 or int(a.max()) > k):
            raise ValueError(f"num_accepted: values must be in [0, {k}]")
        while len(self._proposed_at) < k:
            self._proposed_at.append(0)
            self._accepted_at.append(0)
        for i in range(k):
            self._proposed_at[i] += a.numel()
            self._accepted_at[i] += int((a > i).sum())
        self.proposals += a.numel()
        self.accepted_total += int(a.sum())

    @property
    def rates(self) -> list[float]:
        return [acc / max(prop, 1) for acc, prop in zip(self._accepted_at, self._proposed_at)]

    @property
    def conditional_rates(self) -> list[float]:
        out, prev = [], None
        for i, acc in enumerate(self._accepted_at):
            base = self._proposed_at[i] if i == 0 else prev
            out.append(acc / base if base else float("nan"))
            prev = acc
        return out

    @property
    def mean_accepted(self) -> float:
        return self.accepted_total / self.proposals if self.proposals else float("nan")

    @property
    def mean_emitted(self) -> float:
        return self.mean_accepted + 1

    def __str__(self) -> str:
        per = " ".join(f"{r:.2f}" for r in self.rates)
        return (f"{self.proposals} proposals: acceptance per draft position [{per}], "
                f"mean accepted {self.mean_accepted:.2f}, tokens per target step "
                f"{self.mean_emitted:.2f}")


__all__ = ["PAD", "AcceptanceStats", "VerifyResult", "rejection_sample", "verify_greedy"]
