"""A whole-call program's first step in two kernels: the device-side checks of the staged
call, the forward's inputs and the rollback of draft entries
(``mtp.propose_program.prepare``'s function, there ~45 torch launches, here a memset and two
launches inside the captured graph).

``prepare_rows_kernel``: one program per row of the bucket: is it a real row (its sequence's
block holds it and the sequence has a slot), its token id in the vocabulary, its position
where the drafter expects it, every |hidden| value within the bound (False for NaN and inf):
the failed checks OR-ed into the error word; the row's inputs (the hidden row or zeros, the id
or 0, the expected position or 0). ``prepare_seqs_kernel``, after it: one program per
sequence: reads the word, writes the rows' cache slots (-1: padding, or all when a check
failed) and the draft steps' slot, and drops the sequence's cache entries at or after its next
real position (they came from drafts). Integer logic and copies: bit-identical to the
reference (``tests/test_kernels.py``).

Shape legend: S sequences, R rows per sequence, N = M*D hidden width, L cache layers,
C cache capacity.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mtp.propose_program import ERR_HIDDEN, ERR_IDS, ERR_POSITIONS, hidden_bound

from ._common import launch_opts, pdl_enter

_BH = 2048  # hidden values per loop step of a row


@triton.jit
def prepare_rows_kernel(meta_ptr, ids_ptr, pos_ptr, hid_ptr, ids_out, pos_out, x_out, err_ptr,
                        S, R, V, MAX_ABS, N: tl.constexpr, BH: tl.constexpr,
                        E_IDS: tl.constexpr, E_POS: tl.constexpr, E_HID: tl.constexpr):
    pdl_enter()
    row = tl.program_id(0)
    i = row // R
    jj = row % R
    slot = tl.load(meta_ptr + i)
    start = tl.load(meta_ptr + S + i)
    count = tl.load(meta_ptr + 2 * S + i)
    first = R - count
    real = (jj >= first) & (slot >= 0)
    want = start + jj - first
    tok = tl.load(ids_ptr + row)
    bad_id = real & ((tok < 0) | (tok >= V))
    bad_pos = real & (tl.load(pos_ptr + row) != want)
    src = hid_ptr + row.to(tl.int64) * N
    good = tl.full([], 1, tl.int32)
    for k0 in tl.range(0, N, BH):
        offs = k0 + tl.arange(0, BH)
        v = tl.load(src + offs, mask=offs < N, other=0.0).to(tl.float32)
        good = good & tl.min((tl.abs(v) <= MAX_ABS).to(tl.int32), axis=0)  # NaN: 0
    finite = good == 1
    flags = (bad_id.to(tl.int32) * E_IDS + bad_pos.to(tl.int32) * E_POS
             + (real & ~finite).to(tl.int32) * E_HID)
    if flags != 0:
        tl.atomic_or(err_ptr, flags)
    keep = real & finite
    dst = x_out + row.to(tl.int64) * N
    for k0 in tl.range(0, N, BH):
        offs = k0 + tl.arange(0, BH)
        v = tl.load(src + offs, mask=offs < N, other=0.0)
        tl.store(dst + offs, tl.where(keep, v, tl.zeros_like(v)), mask=offs < N)
    tl.store(ids_out + row, tl.where(real & ~bad_id, tok, 0))
    tl.store(pos_out + row, tl.where(real, want, 0))


@triton.jit
def prepare_seqs_kernel(meta_ptr, err_ptr, row_slots_ptr, draft_slots_ptr, cache_pos_ptr, S, R,
                        MAX_SEQS, C, L: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    pdl_enter()
    i = tl.program_id(0)
    slot = tl.load(meta_ptr + i)
    start = tl.load(meta_ptr + S + i)
    count = tl.load(meta_ptr + 2 * S + i)
    ok = tl.load(err_ptr) == 0
    rr = tl.arange(0, BR)
    real = (rr >= R - count) & (slot >= 0)
    tl.store(row_slots_ptr + i * R + rr, tl.where(real & ok, slot, -1), mask=rr < R)
    on = (slot >= 0) & ok
    tl.store(draft_slots_ptr + i, tl.where(on, slot, -1))
    cc = tl.arange(0, BC)
    mine = (cc < C) & on  # (a padding sequence, or a failed check: nothing is dropped)
    for layer in tl.static_range(L):
        at = cache_pos_ptr + (layer * MAX_SEQS + tl.maximum(slot, 0)) * C + cc
        p = tl.load(at, mask=mine, other=-1)
        tl.store(at, tl.where(p >= start, -1, p), mask=mine)


def propose_prepare(meta: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor,
                    hidden: torch.Tensor, rows: int, max_abs_hidden: float, vocab_size: int,
                    cache_pos: torch.Tensor, pre_error: torch.Tensor | None = None):
    """``mtp.propose_program.prepare`` (same arguments, same results bit for bit) in two
    kernels. The bound on |hidden| is the reference's (``mtp.propose_program.hidden_bound``),
    rounded to the hidden dtype (where the reference compares), then compared in float32,
    which holds every bfloat16 / float16 / float32 value exactly.

    Example:
        >>> ids_in, pos_in, x_in, row_slots, draft_slots, error = propose_prepare(
        ...     prog.meta, prog.ids, prog.pos, prog.hidden, prog.rows, 1e6, V, cache.pos)
    """
    s = meta.shape[1]
    t, n = hidden.shape
    if hidden.dtype not in (torch.bfloat16, torch.float32, torch.float16):
        raise ValueError(f"propose_prepare: bfloat16, float16 or float32 hidden states, got "
                         f"{hidden.dtype}")
    bound = float(torch.tensor(hidden_bound(hidden.dtype, max_abs_hidden), dtype=hidden.dtype))
    dev = hidden.device
    ids_in = torch.empty(t, dtype=torch.int64, device=dev)
    pos_in = torch.empty(t, dtype=torch.int64, device=dev)
    x_in = torch.empty_like(hidden)
    row_slots = torch.empty(t, dtype=torch.int64, device=dev)
    draft_slots = torch.empty(s, dtype=torch.int64, device=dev)
    # the word starts from the checks made before (rows beyond their sequence's block)
    error = (torch.zeros((), dtype=torch.int32, device=dev) if pre_error is None
             else pre_error.clone())
    prepare_rows_kernel[(t,)](meta, ids, pos, hidden, ids_in, pos_in, x_in, error, s, rows,
                              vocab_size, bound, N=n, BH=min(_BH, triton.next_power_of_2(n)),
                              E_IDS=ERR_IDS, E_POS=ERR_POSITIONS, E_HID=ERR_HIDDEN,
                              num_warps=4, **launch_opts())
    n_layers, max_seqs, cap = cache_pos.shape
    prepare_seqs_kernel[(s,)](meta, error, row_slots, draft_slots, cache_pos, s, rows,
                              max_seqs, cap, L=n_layers, BR=triton.next_power_of_2(rows),
                              BC=triton.next_power_of_2(cap), num_warps=1, **launch_opts())
    return ids_in, pos_in, x_in, row_slots, draft_slots, error


__all__ = ["propose_prepare"]
