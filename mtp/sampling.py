"""Draft sampling: greedy, or temperature + top-p with a ``torch.Generator``.

A sampled draft is only half the story: exact speculative rejection sampling needs the
distribution q the draft was drawn from (``mtp.verify.rejection_sample``), so :func:`sample`
returns it. Greedy drafts are deterministic; their q is the one-hot of the argmax, and the
verifier takes ``None`` for it (no [S, V] tensor is built).

Greedy drafting while the target samples at temperature > 0 is still *exact* when verified with
q = one-hot (the verifier then accepts d with probability p(d)), but it accepts far less often
than sampling the drafts from the draft model's own distribution (10% vs 49% on V4-Flash in one
public measurement): sample drafts with the target's settings.

Shape legend: S rows (one per sequence), V vocabulary.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """How to pick a token from logits.

    ``temperature``: 0 is greedy (argmax); > 0 samples from softmax(logits / temperature).
    ``top_p``: keep the smallest set of most probable tokens whose mass reaches ``top_p``
    (1.0 keeps all), then renormalise. Both are a float, or a tensor [S] with one value per
    row (per sequence) on the logits' device; a row with temperature 0 is greedy.
    ``generator``: the ``torch.Generator`` every random draw uses (on the logits' device), for
    reproducible runs; None uses torch's global one.

    Example:
        >>> logits = torch.tensor([[0.0, 2.0, 1.0]])
        >>> sample(logits, Sampling())  # greedy: no q
        (tensor([1]), None)
        >>> gen = torch.Generator().manual_seed(0)
        >>> tokens, q = sample(logits, Sampling(temperature=1.0, top_p=0.7, generator=gen))
        >>> q  # top-p 0.7 keeps token 1 (0.665) and token 2 (0.245), renormalised
        tensor([[0.0000, 0.7311, 0.2689]])
    """

    temperature: float | torch.Tensor = 0.0
    top_p: float | torch.Tensor = 1.0
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        # What can be checked without knowing the rows: scalars' ranges, the generator's type.
        # Tensors [S] are checked against the logits by check().
        for name in ("temperature", "top_p"):
            if not isinstance(getattr(self, name), torch.Tensor):
                _check_scalar(name, getattr(self, name))
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise TypeError(f"Sampling.generator: expected a torch.Generator, got "
                            f"{type(self.generator).__name__}")

    @property
    def greedy(self) -> bool:
        """True when ``temperature`` is the number 0: argmax, no randomness, no q. A
        temperature tensor samples even when every row is 0 (those rows take their argmax, q
        one-hot): whether q is returned follows from the settings' types, never from a
        tensor's values, so nothing has to wait for the device to read them."""
        t = self.temperature
        return not isinstance(t, torch.Tensor) and t == 0

    def check(self, rows: int, device: torch.device) -> None:
        """Raise a clear error if these settings cannot apply to ``rows`` rows on ``device``.
        Tensor settings' values are read (on CUDA one host synchronisation; none for scalar
        settings): :meth:`check_on_device` checks the same without reading them."""
        bad = self.check_on_device(rows, device)
        if bad is not None and bool(bad):
            raise self.value_error()

    def check_on_device(self, rows: int, device: torch.device) -> torch.Tensor | None:
        """:meth:`check` without reading a tensor's values: raises for what the host knows
        (types, shapes, devices, scalars' ranges, the generator) and returns whether a tensor
        setting holds a value out of range, as a bool tensor [] on ``device`` (None for scalar
        settings); :meth:`value_error` names the value. A value out of range does no harm
        downstream: a row it makes NaN draws a token inside the vocabulary (``sample`` with
        ``check_nan=False``), so the flag can be read whenever the result is."""
        ok = None
        for name, value in (("temperature", self.temperature), ("top_p", self.top_p)):
            if isinstance(value, torch.Tensor):
                if value.dim() != 1 or value.shape[0] != rows or not value.is_floating_point():
                    raise ValueError(f"Sampling.{name}: expected a float or a floating tensor "
                                     f"[{rows}] (one per sequence), got shape "
                                     f"{list(value.shape)} ({value.dtype})")
                if value.device != device:
                    raise ValueError(f"Sampling.{name}: on {value.device}, expected {device}")
                in_range = _in_range(name, value).all()
                ok = in_range if ok is None else ok & in_range
            else:
                _check_scalar(name, value)
        gen = self.generator
        if gen is not None:
            if not isinstance(gen, torch.Generator):
                raise TypeError(f"Sampling.generator: expected a torch.Generator, got "
                                f"{type(gen).__name__}")
            if gen.device.type != device.type:
                raise ValueError(f"Sampling.generator: on {gen.device}, but the logits are on "
                                 f"{device}; create it with torch.Generator(device=...)")
        return None if ok is None else ~ok

    def value_error(self) -> ValueError | None:
        """The error naming the first tensor setting's value out of range (reads the
        tensors), or None when every value is in range."""
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                bad = ~_in_range(name, value)
                if bool(bad.any()):
                    return ValueError(f"Sampling.{name}: value {value[bad][0].item()} is out "
                                      f"of range ({_RANGES[name]})")
        return None


def _in_range(name: str, value):
    """Whether ``value`` (a float, or elementwise a tensor) is a valid ``name``: temperature
    finite and >= 0, 0 < top_p <= 1. A comparison with NaN is False, so each test refuses it;
    the one rule for scalars (:func:`_check_scalar`) and tensors."""
    if name == "temperature":
        big = torch.finfo(value.dtype).max if isinstance(value, torch.Tensor) else _FLOAT_MAX
        return (value >= 0) & (value <= big)
    return (value > 0) & (value <= 1)


_FLOAT_MAX = sys.float_info.max


def _check_scalar(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"Sampling.{name}: expected a float, got {type(value).__name__}")
    if not _in_range(name, float(value)):
        raise ValueError(f"Sampling.{name}: {value} is out of range ({_RANGES[name]})")


def nan_flag(x: torch.Tensor) -> torch.Tensor:
    """Whether ``x`` holds NaN, as a bool tensor [] on ``x``'s device: computed without
    reading it, so it never synchronises; read it (``bool(flag)``) when the result is needed
    anyway. What :meth:`mtp.drafter.Drafter.propose` keeps for its draft steps' logits on CUDA,
    and what a decode loop that passes ``check_nan=False`` to :func:`sample` can keep too.

    Example:
        >>> nan_flag(torch.tensor([[0.0, float("nan")]]))
        tensor(True)
    """
    return torch.isnan(x).any()


def refuse_nan(x: torch.Tensor, name: str) -> None:
    """Refuse logits holding NaN (argmax and softmax would pick garbage silently), naming the
    argument. +-inf is kept: -inf masks a token, and argmax of +inf is well defined.

    The one place this check lives. It reads :func:`nan_flag` at once: on CUDA one host
    synchronisation (the callers' results are read right after anyway). The Drafter does not
    call it: it keeps the flag on the device and raises at its next synchronisation."""
    if bool(nan_flag(x)):
        raise nan_error(name)


def nan_error(name: str) -> ValueError:
    """The error :func:`refuse_nan` raises for ``name``."""
    return ValueError(f"{name}: holds NaN (the model's output went non-finite); refusing to "
                      "pick tokens from it")


def _describe(x) -> str:
    return f"{list(x.shape)} ({x.dtype})" if isinstance(x, torch.Tensor) else type(x).__name__


_RANGES = {"temperature": "0 for greedy, or a finite value > 0", "top_p": "0 < top_p <= 1"}

GREEDY = Sampling()


def probs(logits: torch.Tensor, sampling: Sampling = GREEDY, *,
          check_nan: bool = True) -> torch.Tensor:
    """The distribution ``sampling`` draws from: [..., V] logits -> [..., V] probabilities.

    Rows at temperature 0 get the one-hot of their argmax (the first one on ties). Also the
    right way to turn *target* logits into the p of ``mtp.verify.rejection_sample``: the target
    must be verified under the same settings it samples with. A per-row ``temperature`` /
    ``top_p`` tensor [S] applies to the first dim of ``logits`` ([S, V] or [S, k, V]).

    NaN in ``logits`` raises ``ValueError`` (:func:`refuse_nan`: on CUDA one synchronisation);
    ``check_nan=False`` skips that check, for a caller that keeps :func:`nan_flag` and reads it
    later (rows holding NaN then give NaN probabilities).
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1 \
            or not logits.is_floating_point():
        raise ValueError(f"logits: expected a floating-point tensor [..., V], got "
                         f"{_describe(logits)}")
    if not isinstance(sampling, Sampling):
        raise TypeError(f"sampling: expected a mtp.sampling.Sampling, got "
                        f"{type(sampling).__name__}")
    sampling.check(logits.shape[0] if logits.dim() > 1 else 1, logits.device)
    if check_nan:
        refuse_nan(logits, "logits")
    return _probs(logits, sampling)


def _probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """:func:`probs` on checked arguments."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    lead = x.shape[:-1]

    def per_row(value) -> torch.Tensor | float:
        if not isinstance(value, torch.Tensor):
            return float(value)
        return value.to(x.dtype).view(value.shape[0], *([1] * len(lead)))  # [S, 1(, 1)]

    temperature, top_p = per_row(sampling.temperature), per_row(sampling.top_p)
    greedy_rows = temperature == 0
    if isinstance(greedy_rows, bool) and greedy_rows:
        return _one_hot_argmax(x)
    t = torch.where(greedy_rows, 1.0, temperature) if isinstance(temperature, torch.Tensor) \
        else temperature
    p = torch.softmax(x / t, dim=-1)
    if isinstance(top_p, torch.Tensor) or top_p < 1.0:
        p = _top_p(p, top_p)
    if isinstance(greedy_rows, torch.Tensor):
        p = torch.where(greedy_rows, _one_hot_argmax(x), p)
    return p


def _one_hot_argmax(x: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    return out.scatter_(-1, x.argmax(dim=-1, keepdim=True), 1.0)


def _top_p(p: torch.Tensor, top_p) -> torch.Tensor:
    """Keep the most probable tokens until their mass reaches top_p (nucleus sampling): token i
    of the descending order stays if the mass before it is < top_p, so the first always stays."""
    sorted_p, order = p.sort(dim=-1, descending=True, stable=True)
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    keep_sorted = mass_before < top_p
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    kept = p * keep
    return kept / kept.sum(dim=-1, keepdim=True)


def sample(logits: torch.Tensor, sampling: Sampling = GREEDY, *, check_nan: bool = True
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pick one token per row: [S, V] logits -> (tokens [S] int64, q [S, V] or None).

    q is the distribution the tokens were drawn from: None when ``sampling.greedy``
    (temperature the number 0); a temperature tensor's rows at 0 get their argmax, q one-hot.

    NaN in ``logits`` raises ``ValueError`` naming ``logits``, on every device (on CUDA the
    check reads one flag: a host synchronisation). A decode loop that must not wait passes
    ``check_nan=False`` and keeps ``nan_flag(logits)`` to read with its next result: a row
    holding NaN then still gets a token inside the vocabulary (meaningless; its q row is NaN)
    instead of failing inside ``torch.multinomial`` (greedy rows need no draw; a sampled draw
    may still read its input on the host inside torch). Tensor settings' ranges are read too
    (``Sampling.check``; ``Sampling.check_on_device`` is the flag without the read).

    Example:
        >>> sample(torch.tensor([[1.0, 3.0], [5.0, 0.0]]))[0]
        tensor([1, 0])
        >>> logits = torch.tensor([[1.0, float("nan")]])
        >>> flag = nan_flag(logits)  # on the device, nothing waits
        >>> tokens, _ = sample(logits, check_nan=False)
        >>> bool(flag)  # read when the tokens are read
        True
    """
    if logits.dim() != 2:
        raise ValueError(f"logits: expected [S, V], got shape {list(logits.shape)}")
    sampling.check(logits.shape[0], logits.device)
    if check_nan:
        refuse_nan(logits, "logits")
    return _sample(logits, sampling, nan_rows=not check_nan)


def sample_checked(logits: torch.Tensor, sampling: Sampling
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`sample` with ``check_nan=False`` on settings checked by the caller (the
    Drafter's, on the device: ``Sampling.check_on_device``): nothing here reads a value (a
    sampled draw's ``torch.multinomial`` may, inside torch). A row made NaN by NaN logits or
    by a setting out of range draws token 0."""
    return _sample(logits, sampling, nan_rows=True)


def _sample(logits: torch.Tensor, sampling: Sampling, *, nan_rows: bool
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The draw on checked settings; ``nan_rows``: q may hold NaN rows (unchecked logits or
    settings), which draw token 0 instead of failing in ``torch.multinomial``."""
    if sampling.greedy:
        return logits.argmax(dim=-1), None  # a NaN row: argmax stays inside the vocabulary
    q = _probs(logits, sampling)
    drawn = q
    if nan_rows:  # torch.multinomial refuses a NaN row (it may read its input to say so)
        nan = torch.isnan(q).any(dim=-1, keepdim=True)  # [S, 1]
        drawn = torch.where(nan, _one_hot_argmax(torch.zeros_like(q)), q)
    tokens = torch.multinomial(drawn, 1, generator=sampling.generator).squeeze(1)
    return tokens, q


__all__ = ["GREEDY", "Sampling", "nan_flag", "probs", "refuse_nan", "sample", "sample_checked"]
