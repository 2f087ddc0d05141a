"""A whole-call program's first and last launches. First ``stage_in``: the staged record read
from the pinned host buffer where the driver maps it (``mapped_address``), the error word
begun. Then the device-side checks of the staged call, the forward's inputs and the rollback
of draft entries in two kernels (``mtp.propose_program.prepare``'s function, there ~45 torch
launches). Last ``copy_out``: the outputs into the call's own buffer, the NaN-logits bit into
the error word and the word to the host. They reach the caller's tensors through addresses
the host staged, so that one captured graph serves every call with no copy outside it.

``prepare_rows_kernel``: one program per row of the bucket, reading the caller's row it
stands for where the caller has it (``mtp.propose_program.rows_at``: no staging copy): is it
a real row (its sequence's block holds it and the sequence has a slot), its token id in the
vocabulary, its position where the drafter expects it, every |hidden| value within the bound
(False for NaN and inf): the failed checks OR-ed into the error word; the row's inputs (the
hidden row or zeros, the id or 0, the expected position or 0). ``prepare_seqs_kernel``, after
it: one program per sequence: reads the word, writes the rows' cache slots (-1: padding, or
all when a check failed) and the draft steps' slot, and drops the sequence's cache entries at
or after its next real position (they came from drafts). Integer logic and copies:
bit-identical to the reference (``tests/test_kernels.py``).

Shape legend: S sequences, R rows per sequence, N = M*D hidden width, L cache layers,
C cache capacity.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mtp.propose_program import ERR_HIDDEN, ERR_IDS, ERR_POSITIONS, hidden_bound

from ._common import launch_opts, pdl_enter

# warps of prepare_rows_kernel's program: one thread per 64 hidden values (a whole row in
# registers), 4 to 16
_VALUES_PER_THREAD = 64


@triton.jit
def _row_int(at_ptr, k: tl.constexpr, srow, real):
    """The caller's int64 or int32 value of row ``srow`` of the tensor ``rows_at`` describes
    at ``at_ptr + k`` (address, stride, int32 flag), as int64; 0 where not ``real`` (nothing
    read)."""
    base = tl.load(at_ptr + k)
    at = srow * tl.load(at_ptr + k + 1)
    if tl.load(at_ptr + k + 2) != 0:
        v = tl.load(base.to(tl.pointer_type(tl.int32)) + at, mask=real, other=0).to(tl.int64)
    else:
        v = tl.load(base.to(tl.pointer_type(tl.int64)) + at, mask=real, other=0)
    return v


@triton.jit
def prepare_rows_kernel(meta_ptr, src_ptr, at_ptr, ids_out, pos_out, x_out, err_ptr,
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
    # the caller's row this one is (rows_at: hidden's address and row stride, then ids' and
    # positions' address, stride, int32 flag); only real rows read it
    srow = tl.load(src_ptr + row)
    tok = _row_int(at_ptr, 2, srow, real)
    bad_id = real & ((tok < 0) | (tok >= V))
    bad_pos = real & (_row_int(at_ptr, 5, srow, real) != want)
    src = (tl.load(at_ptr).to(tl.pointer_type(x_out.dtype.element_ty))
           + srow * tl.load(at_ptr + 1))
    # masks as a comparison with a scalar bound (N where the row is read, else 0): a tensor
    # AND-ed with a scalar bool is a mask Triton 3.9's interpreter refuses
    n_read = tl.where(real, N, 0)
    # the whole row in one load (BH >= N): one memory round trip, not one per chunk, and its
    # copy stored from the registers that were checked
    offs = tl.arange(0, BH)
    v = tl.load(src + offs, mask=offs < n_read, other=0.0)
    good = tl.min((tl.abs(v.to(tl.float32)) <= MAX_ABS).to(tl.int32), axis=0)  # NaN: 0
    finite = good == 1
    flags = (bad_id.to(tl.int32) * E_IDS + bad_pos.to(tl.int32) * E_POS
             + (real & ~finite).to(tl.int32) * E_HID)
    if flags != 0:
        tl.atomic_or(err_ptr, flags)
    keep = real & finite
    tl.store(x_out + row.to(tl.int64) * N + offs, tl.where(keep, v, tl.zeros_like(v)),
             mask=offs < N)
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
    mine = cc < tl.where(on, C, 0)  # (a padding sequence, or a failed check: none dropped)
    for layer in tl.static_range(L):
        at = cache_pos_ptr + (layer * MAX_SEQS + tl.maximum(slot, 0)) * C + cc
        p = tl.load(at, mask=mine, other=-1)
        tl.store(at, tl.where(p >= start, -1, p), mask=mine)


def propose_prepare(meta: torch.Tensor, src: torch.Tensor, rows_at: torch.Tensor, rows: int,
                    width: int, dtype: torch.dtype, max_abs_hidden: float, vocab_size: int,
                    cache_pos: torch.Tensor, error: torch.Tensor | None = None):
    """``mtp.propose_program.prepare`` of the rows ``gather_rows`` would take from the
    caller's tensors (``src`` [S*R] each bucket row's source row; ``rows_at`` [ROWS_AT] where
    those tensors are, ``mtp.propose_program.rows_at``: hidden ``width`` wide, of ``dtype``),
    same results bit for bit, in two kernels that read the rows where they are: a captured
    graph reads each call's tensors with no copy into its buffers. Only real rows are read.
    The bound on |hidden| is the reference's (``mtp.propose_program.hidden_bound``), rounded
    to ``dtype`` (where the reference compares), then compared in float32, which holds every
    bfloat16 / float16 / float32 value exactly. ``error``: the call's int32 [] word so far
    (the reference's ``pre_error``: checks made before), the checks' bits OR-ed into it in
    place; None: a fresh word.

    Example:
        >>> ids_in, pos_in, x_in, row_slots, draft_slots, error = propose_prepare(
        ...     prog.meta, prog.src, prog.rows_at, prog.rows, N, torch.bfloat16, 1e6, V,
        ...     cache.pos)
    """
    s = meta.shape[1]
    t = src.shape[0]
    if dtype not in (torch.bfloat16, torch.float32, torch.float16):
        raise ValueError(f"propose_prepare: bfloat16, float16 or float32 hidden states, got "
                         f"{dtype}")
    bound = float(torch.tensor(hidden_bound(dtype, max_abs_hidden), dtype=dtype))
    dev = meta.device
    ids_in = torch.empty(t, dtype=torch.int64, device=dev)
    pos_in = torch.empty(t, dtype=torch.int64, device=dev)
    x_in = torch.empty(t, width, dtype=dtype, device=dev)
    row_slots = torch.empty(t, dtype=torch.int64, device=dev)
    draft_slots = torch.empty(s, dtype=torch.int64, device=dev)
    if error is None:
        error = torch.zeros((), dtype=torch.int32, device=dev)
    elif error.dtype != torch.int32 or error.numel() != 1 or error.device != dev:
        raise ValueError(f"propose_prepare: error must be an int32 [] word on {dev}, got "
                         f"{error.dtype} {list(error.shape)} on {error.device}")
    bh = triton.next_power_of_2(width)
    warps = min(16, max(4, bh // (32 * _VALUES_PER_THREAD)))
    prepare_rows_kernel[(t,)](meta, src, rows_at, ids_in, pos_in, x_in, error, s, rows,
                              vocab_size, bound, N=width, BH=bh, E_IDS=ERR_IDS,
                              E_POS=ERR_POSITIONS, E_HID=ERR_HIDDEN, num_warps=warps,
                              **launch_opts())
    n_layers, max_seqs, cap = cache_pos.shape
    prepare_seqs_kernel[(s,)](meta, error, row_slots, draft_slots, cache_pos, s, rows,
                              max_seqs, cap, L=n_layers, BR=triton.next_power_of_2(rows),
                              BC=triton.next_power_of_2(cap), num_warps=1, **launch_opts())
    return ids_in, pos_in, x_in, row_slots, draft_slots, error


@triton.jit
def stage_in_kernel(host_at, staged_ptr, n, pre_ptr, err_ptr, BLOCK: tl.constexpr):
    """Block b of the staged call's int64 record from the host buffer at address ``host_at``
    (page-locked, mapped: read over the bus); program 0 also begins the call's error word
    with the checks made before (``pre_ptr``)."""
    pdl_enter()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    src = host_at.to(tl.pointer_type(tl.int64))
    tl.store(staged_ptr + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)
    if tl.program_id(0) == 0:
        tl.store(err_ptr, tl.load(pre_ptr))


def stage_in(staged: torch.Tensor, host_at: int, pre_error: torch.Tensor,
             error: torch.Tensor) -> None:
    """``staged.copy_(host)`` and ``error.copy_(pre_error)`` in one launch, reading the host
    buffer where it is mapped (``host_at``, :func:`mapped_address`): inside a captured graph
    a kernel node instead of a copy node and the idle gap after it (~5 us on an H100).
    ``staged`` contiguous int64 [n], the host buffer as many int64; the words int32 [].

    Example:
        >>> stage_in(prog.staged, mapped_address(prog.host), prog.pre_error, prog.error)
    """
    n = staged.numel()
    if staged.dtype != torch.int64 or not staged.is_contiguous() or not host_at or any(
            w.dtype != torch.int32 or w.numel() != 1 for w in (pre_error, error)):
        raise ValueError(f"stage_in: a contiguous int64 record, a mapped host address and "
                         f"int32 [] words, got {staged.dtype} contiguous="
                         f"{staged.is_contiguous()}, address {host_at}, "
                         f"{pre_error.dtype} {error.dtype}")
    block = 1024
    stage_in_kernel[(triton.cdiv(n, block),)](host_at, staged, n, pre_error, error,
                                              BLOCK=block, num_warps=4, **launch_opts())


@triton.jit
def copy_out_kernel(src_ptr, at_ptr, n, error_ptr, probes_ptr, n_probes, bit, word_at,
                    BLOCK: tl.constexpr, PB: tl.constexpr, HAS_PROBES: tl.constexpr,
                    TO_HOST: tl.constexpr):
    pdl_enter()
    addr = tl.load(at_ptr)
    if addr != 0:  # 0: no buffer staged (a capture's warm-up)
        dst = addr.to(tl.pointer_type(src_ptr.dtype.element_ty))
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst + offs, tl.load(src_ptr + offs, mask=offs < n), mask=offs < n)
    if tl.program_id(0) == 0:  # the error word
        word = tl.load(error_ptr) if HAS_PROBES or TO_HOST else 0
        if HAS_PROBES:  # its bit where a probe is NaN
            nan = tl.zeros([PB], dtype=tl.int32)
            for p0 in range(0, n_probes, PB):
                p = p0 + tl.arange(0, PB)
                v = tl.load(probes_ptr + p, mask=p < n_probes, other=0.0)
                nan |= (v != v).to(tl.int32)
            word = tl.where(tl.max(nan, axis=0) > 0, word | bit, word)
            tl.store(error_ptr, word)
        if TO_HOST:  # over the bus, to the host's copy of the word
            tl.store(word_at.to(tl.pointer_type(tl.int32)), word)


def copy_out(packed: torch.Tensor, out_at: torch.Tensor, *, error: torch.Tensor | None = None,
             probes: torch.Tensor | None = None, bit: int = 0, word_at: int | None = None
             ) -> torch.Tensor | None:
    """Copy ``packed`` (contiguous bytes) to the buffer whose address ``out_at`` [1] int64 holds
    (read on the device: a captured graph copies to each call's own buffer; 0 copies nothing).
    The buffer must hold ``packed.numel()`` bytes (``ProposeProgram.new_out``). With ``error``
    (an int32 [] word), the same launch finishes the word: with ``probes`` (contiguous floats,
    one per row and step of the call: NaN where a step's logits row held one) ORs ``bit`` into
    it where any probe is NaN, in place; with ``word_at`` (a page-locked host int32's mapped
    address, :func:`mapped_address`) stores it there, instead of a copy node after the kernel
    -> ``error`` (None without).

    Example:
        >>> copy_out(prog.packed, prog.out_at)
    """
    words = packed.view(torch.int32) if packed.numel() % 4 == 0 else packed  # 4-byte lanes
    n = words.numel()
    block = 4096
    has = error is not None
    if (has and (error.dtype != torch.int32 or error.numel() != 1)) or (
            probes is not None and (not has or not probes.is_contiguous()
                                    or not probes.is_floating_point())) or (
            word_at is not None and (not has or not word_at)):
        raise ValueError(f"copy_out: probes (contiguous floats) and word_at (an address) need "
                         f"an int32 [] error word; got error "
                         f"{None if error is None else (error.dtype, list(error.shape))}, probes "
                         f"{None if probes is None else (probes.dtype, probes.is_contiguous())}, "
                         f"word_at {word_at}")
    n_probes = probes.numel() if probes is not None else 0
    copy_out_kernel[(max(triton.cdiv(n, block), 1),)](
        words, out_at, n, error if has else out_at, probes if probes is not None else out_at,
        n_probes, bit, word_at or 0, BLOCK=block, PB=128, HAS_PROBES=probes is not None,
        TO_HOST=word_at is not None, num_warps=4, **launch_opts())
    return error


def mapped_address(t: torch.Tensor) -> int | None:
    """The address at which a kernel reads and writes the page-locked host tensor ``t``
    (mapped into the device's address space: with unified addressing, the host address
    itself), from the CUDA driver; None where ``t`` is not page-locked or the driver maps it
    nowhere (then the caller copies instead).

    Example:
        >>> at = mapped_address(torch.zeros(4, dtype=torch.int64, pin_memory=True))
    """
    if t.device.type != "cpu" or torch.version.hip or not torch.cuda.is_available() \
            or not t.is_pinned():
        return None
    import ctypes

    from torch.cuda._utils import _get_gpu_runtime_library
    ptr = ctypes.c_uint64()
    try:
        err = _get_gpu_runtime_library().cuMemHostGetDevicePointer_v2(
            ctypes.byref(ptr), ctypes.c_void_p(t.data_ptr()), ctypes.c_uint(0))
    except (OSError, AttributeError):  # no driver library, or one without the call
        return None
    return ptr.value if err == 0 and ptr.value else None


__all__ = ["copy_out", "mapped_address", "propose_prepare", "stage_in"]
