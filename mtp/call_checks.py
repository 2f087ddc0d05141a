"""What a :class:`~mtp.drafter.Drafter` call's arguments must be: the limits on positions and
hidden values, the checks, and the errors that name what is wrong and how to fix it.

The drafter's fast paths test the common case inline (``Drafter._plan``); on any difference
they call these, which name the argument, what was expected and what came. The value checks
(:func:`check_values`) read tensors on the host: the drafter calls them at the call on the
CPU, and on CUDA only to name what its device-side checks found (docs/drafter.md, "When each
check fires").

Shape legend: T rows, M*D = hc_mult * hidden_size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import propose_program as prog_mod
from .config import MTPConfig

MAX_POSITION = 2**31 - 1
"""The largest position a row or draft may reach: int32-safe for kernels, and far from where
int64 sums (position + rows + drafts) or RoPE angles could overflow."""

MAX_ABS_HIDDEN = 1e6
"""The largest |value| accepted in ``hidden_states``. Real pre-``hc_head`` residuals stay orders
of magnitude below it; far above it the layer's float32 sums of squares (RMS norms) and bf16
products overflow, and such a row would leave non-finite KV in the cache."""


def hidden_ok(hidden: torch.Tensor) -> torch.Tensor:
    """[T, ...] -> [T, ...] bool: which values ``hidden_states`` may hold (finite, |value| <=
    ``MAX_ABS_HIDDEN``), elementwise on the tensor's device (nothing is read on the host)."""
    return prog_mod.within_bound(hidden, MAX_ABS_HIDDEN)


def check_hidden_values(hidden: torch.Tensor, name: str = "hidden_states") -> None:
    """Refuse non-finite rows and rows with |value| > ``MAX_ABS_HIDDEN``, before any state
    changes: such a row would put non-finite KV in the cache, poisoning later calls.

    Reads the values on the host (on CUDA a synchronisation). The Drafter calls it on the CPU;
    on CUDA it tests :func:`hidden_ok` on the device instead and calls this only to name the
    row once the device has found one (docs/drafter.md, "When each check fires")."""
    ok = hidden_ok(hidden)
    if not bool(ok.all()):
        row = int((~ok).any(dim=-1).nonzero()[0])
        value = hidden[row][~ok[row]][0].item()
        raise ValueError(f"{name}: row {row} holds {value}; values must be finite with "
                         f"|value| <= {MAX_ABS_HIDDEN:g} (the target's residuals went "
                         "non-finite or were not residuals)")


def check_seq_id(seq_id: object) -> None:
    """Refuse a sequence id a dict cannot find again (unhashable, or not equal to itself)."""
    try:
        hash(seq_id)
    except TypeError:
        raise TypeError(f"sequence id: expected a hashable id (int or str), got "
                        f"{type(seq_id).__name__}") from None
    if seq_id != seq_id:  # NaN: a dict finds it only through the very same object
        raise ValueError(f"sequence id: {seq_id!r} is not equal to itself, so a later call "
                         f"could not name it; use an int or str")


def next_token_ids_arg(input_ids, next_token_ids) -> tuple[str, torch.Tensor]:
    """The [T] tokens at positions + 1, given under exactly one of its two names: (the name the
    caller used, the tensor)."""
    if (input_ids is None) == (next_token_ids is None):
        both = "both were given" if input_ids is not None else "neither was given"
        raise TypeError(f"next_token_ids: pass the token at positions[i] + 1 for each row as "
                        f"next_token_ids= (or input_ids=, vLLM's name for it), exactly one of "
                        f"the two; {both}")
    return ("next_token_ids", next_token_ids) if input_ids is None else ("input_ids", input_ids)


def flat_hidden(hidden_states, cfg: MTPConfig):
    """[T, M, D] (transformers' residual layout) -> [T, M*D]; anything else unchanged (the
    shape check that follows names what was expected)."""
    if isinstance(hidden_states, torch.Tensor) and hidden_states.layout == torch.strided \
            and hidden_states.dim() == 3 \
            and tuple(hidden_states.shape[1:]) == (cfg.hc_mult, cfg.hidden_size):
        return hidden_states.flatten(1)  # [T, M, D] -> [T, M*D]
    return hidden_states


def check_values(ids_name: str, ids: torch.Tensor, positions: torch.Tensor,
                 hidden: torch.Tensor, seq_ids: list, starts: list[int], counts: list[int],
                 vocab_size: int) -> None:
    """Refuse a call by the values of its tensors (reads them: on CUDA, synchronisations)."""
    check_hidden_values(hidden)
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        bad = ids[(ids < 0) | (ids >= vocab_size)][0].item()
        raise ValueError(f"{ids_name}: token id {bad} is outside the vocabulary "
                         f"[0, {vocab_size})")
    pos = positions.detach().to("cpu", torch.int64)
    expected = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, counts)])
    if not torch.equal(pos, expected):
        explain_positions(seq_ids, starts, counts, pos)


INTS = {int}  # the set of types of a list of plain ints (a bool is an int too: not in it)


def row_counts(num_rows_per_seq, s: int) -> list[int]:
    """``num_rows_per_seq`` for ``s`` sequences -> a new list of ints >= 1 (a CUDA tensor is
    read: a synchronisation)."""
    if type(num_rows_per_seq) is list and len(num_rows_per_seq) == s \
            and set(map(type, num_rows_per_seq)) == INTS and min(num_rows_per_seq) >= 1:
        return list(num_rows_per_seq)  # the common case: a list of ints (a copy: kept)
    if isinstance(num_rows_per_seq, torch.Tensor):
        if num_rows_per_seq.dim() != 1 or num_rows_per_seq.is_floating_point():
            raise ValueError(f"num_rows_per_seq: expected a 1-D integer tensor, got shape "
                             f"{list(num_rows_per_seq.shape)} ({num_rows_per_seq.dtype})")
        counts = num_rows_per_seq.tolist()
    elif isinstance(num_rows_per_seq, Sequence):
        counts = list(num_rows_per_seq)
    else:
        raise TypeError(f"num_rows_per_seq: expected a list of ints, got "
                        f"{type(num_rows_per_seq).__name__}")
    if len(counts) != s:
        raise ValueError(f"num_rows_per_seq: {len(counts)} counts for {s} sequences in seq_ids")
    for i, n in enumerate(counts):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"num_rows_per_seq[{i}]: expected an int >= 1 (a call gives every "
                             f"sequence at least its newest row), got {n!r}")
    return counts


def check_tensor(x, name: str, shape: tuple, expected, device: torch.device,
                 floating: bool) -> None:
    """``expected``: what the message says was expected (a function making it: most calls
    pass, and never format it)."""
    if isinstance(x, torch.Tensor) and x.layout != torch.strided:
        raise ValueError(f"{name}: a {x.layout} tensor; pass a dense one (x.to_dense())")
    if not isinstance(x, torch.Tensor) or x.shape != shape:
        got = f"shape {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected {expected()}, got {got}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    if not floating and x.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: expected int64 or int32, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name}: on {x.device}, but the drafter is on {device}")


def explain_positions(ids, starts, counts, pos: torch.Tensor):
    """Raise the error naming the first sequence whose rows are not at ``starts`` onwards
    (``pos`` [T] on the host differs from the expected positions)."""
    offset = 0
    for seq_id, start, n in zip(ids, starts, counts):
        got = pos[offset:offset + n]
        offset += n
        first = int(got[0])
        if first < start:
            raise ValueError(
                f"positions: sequence {seq_id!r} starts at position {first}, going backwards: "
                f"the drafter has consumed it up to {start - 1} and expects {start} next "
                "(rows with real residuals are fed once; drafts are rolled back automatically)")
        if first > start:
            raise ValueError(
                f"positions: sequence {seq_id!r} starts at position {first}, leaving a gap: the "
                f"drafter expects {start} next; feed the rows from {start} (or remove and re-add "
                "the sequence at a later position)")
        if not torch.equal(got, torch.arange(start, start + n)):
            raise ValueError(f"positions: the rows of sequence {seq_id!r} are not consecutive "
                             f"({short(got.tolist())}); expected {start}..{start + n - 1}")
    raise AssertionError("unreachable: positions differ but no sequence disagrees")


def short(items: list, n: int = 8) -> str:
    """``items`` for a message: its first ``n`` and "..." beyond them."""
    return repr(items) if len(items) <= n else repr(items[:n])[:-1] + ", ...]"


__all__ = ["INTS", "MAX_ABS_HIDDEN", "MAX_POSITION", "check_hidden_values", "check_seq_id",
           "check_tensor", "check_values", "explain_positions", "flat_hidden", "hidden_ok",
           "next_token_ids_arg", "row_counts", "short"]
