"""The draft KV cache: per sequence slot, a ring of ``capacity`` KV vectors per MTP layer.

Each slot remembers which position it holds (``pos``, -1 when empty), so a read can check that
a key really is the one it wants: an entry overwritten by the ring or discarded after a rejected
draft is never attended by mistake. ``capacity`` must be at least ``W + k`` for k-token drafting
(``spec/architecture.md``, "Multi-step drafting").

:func:`window_index` turns a batch of rows into gather indices over
``cat(cache entries, this call's new KV)``, so one attention routine serves the stateless
forward (no cache) and the cached one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .memory import cache_bytes, check_fits


class KVCache:
    """KV of every MTP layer for up to ``max_seqs`` sequences.

    ``kv``: [n_layers, max_seqs, capacity, Dh] in the compute dtype; ``pos``: [n_layers,
    max_seqs, capacity] int64, the position each slot holds or -1.

    Example:
        >>> cache = KVCache(n_layers=1, max_seqs=2, capacity=11, head_dim=128)
        >>> cache.kv.shape
        torch.Size([1, 2, 11, 128])
    """

    def __init__(self, n_layers: int, max_seqs: int, capacity: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        check_fits(cache_bytes(n_layers, max_seqs, capacity, head_dim, dtype), device,
                   f"the draft KV cache ({n_layers} layer(s) x max_seqs={max_seqs} x "
                   f"capacity={capacity} x head_dim={head_dim}, {dtype})",
                   "lower max_seqs, or max_draft_tokens (a Drafter's capacity is "
                   "sliding_window + max_draft_tokens)")
        self.capacity = capacity
        self.kv = torch.zeros(n_layers, max_seqs, capacity, head_dim, dtype=dtype, device=device)
        self.pos = torch.full((n_layers, max_seqs, capacity), -1, dtype=torch.int64,
                              device=device)

    @property
    def max_seqs(self) -> int:
        return self.kv.shape[1]

    def clear(self, slot: int) -> None:
        """Forget everything of one sequence slot."""
        self.pos[:, slot] = -1

    def discard_from(self, slot: int, position: int) -> None:
        """Drop every entry of ``slot`` at ``position`` or later (rejected drafts)."""
        view = self.pos[:, slot]
        view.masked_fill_(view >= position, -1)

    def snapshot(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv[:, slot].clone(), self.pos[:, slot].clone()


@dataclass
class WindowIndex:
    """Where each row finds its W keys, and which new rows to write into the cache.

    ``keys_index`` [T, W] indexes ``cat(cache.kv[layer].view(-1, Dh), new_kv)``; ``keys_valid``
    [T, W]; ``write_rows`` / ``write_slots``: the new rows kept in the cache and their flat slots
    in ``cache.kv[layer].view(-1, Dh)``.
    """

    keys_index: torch.Tensor
    keys_valid: torch.Tensor
    write_rows: torch.Tensor
    write_slots: torch.Tensor


def group_starts(seq_slots: torch.Tensor) -> torch.Tensor:
    """Index of the first row of each row's run of equal ``seq_slots`` ([T] -> [T])."""
    t = seq_slots.shape[0]
    rows = torch.arange(t, device=seq_slots.device)
    new_run = torch.ones(t, dtype=torch.bool, device=seq_slots.device)
    new_run[1:] = seq_slots[1:] != seq_slots[:-1]
    return torch.cummax(torch.where(new_run, rows, 0), dim=0).values


def run_ends(seq_slots: torch.Tensor) -> torch.Tensor:
    """Index of the last row of each row's run of equal ``seq_slots`` ([T] -> [T])."""
    t = seq_slots.shape[0]
    rows = torch.arange(t, device=seq_slots.device)
    run_end = torch.ones(t, dtype=torch.bool, device=seq_slots.device)
    run_end[:-1] = seq_slots[1:] != seq_slots[:-1]
    last = torch.where(run_end, rows, t).flip(0)
    return torch.cummin(last, dim=0).values.flip(0)


def window_index(positions: torch.Tensor, seq_slots: torch.Tensor, window: int,
                 cache_pos: torch.Tensor | None, capacity: int) -> WindowIndex:
    """Gather indices for a batch whose rows come in runs, one run per sequence, with
    consecutive positions inside a run (the caller checks that).

    Key w of a row at position p is position q = p - W + 1 + w. If q precedes the run's first
    position it is read from the cache (valid only if that slot holds exactly q), otherwise from
    this call's row ``run_start + (q - run_first_position)``.

    ``cache_pos``: the layer's [max_seqs, capacity] position table, or None (stateless: one
    sequence, nothing before its first row).
    """
    positions = positions.to(torch.int64)  # int32 positions too: the ring math is int64
    device = positions.device
    n_cached = 0 if cache_pos is None else cache_pos.numel()
    starts = group_starts(seq_slots)  # [T]
    first_pos = positions[starts]  # [T]
    q = positions[:, None] - window + 1 + torch.arange(window, device=device)[None, :]  # [T, W]
    from_new = q >= first_pos[:, None]
    new_index = starts[:, None] + (q - first_pos[:, None]) + n_cached
    if cache_pos is None:
        keys_index = torch.where(from_new, new_index, 0)
        keys_valid = from_new
    else:
        flat_slot = seq_slots[:, None] * capacity + q.remainder(capacity)  # [T, W]
        held = cache_pos.reshape(-1)[flat_slot]
        keys_index = torch.where(from_new, new_index, flat_slot)
        keys_valid = from_new | ((q >= 0) & (held == q))
    # Keep only the last `capacity` rows of each run: earlier ones would collide in the ring.
    # A run's last position is its last row's (positions rise by one inside a run); each row
    # finds its run's last row by a reversed running minimum (a scatter_reduce was ~60 us for
    # 512 rows on the GPU).
    keep = positions > positions[run_ends(seq_slots)] - capacity
    write_rows = torch.nonzero(keep).flatten()
    write_slots = seq_slots[write_rows] * capacity + positions[write_rows].remainder(capacity)
    return WindowIndex(keys_index, keys_valid, write_rows, write_slots)


def call_window(positions: torch.Tensor, seq_slots: torch.Tensor | None, window: int,
                cache: KVCache | None, layer: int) -> WindowIndex:
    """:func:`window_index` for one forward call: over ``cache``'s ``layer`` with the rows'
    slots, or stateless (no cache: the rows are one sequence)."""
    if cache is None:
        return window_index(positions, torch.zeros_like(positions), window, None,
                            max(positions.shape[0], 1))
    return window_index(positions, seq_slots, window, cache.pos[layer], cache.capacity)
