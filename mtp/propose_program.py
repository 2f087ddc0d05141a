"""One ``Drafter.propose`` call as a fixed-shape program of tensor operations, the unit
a CUDA graph captures (``mtp_kernels.ProposeGraphs``); eager elsewhere (the CPU tests run it
with the reference ops).

A program serves a bucket: up to S sequences with up to R new rows each, k drafts. The
bucket's rows [S * R] hold sequence i's n_i rows at the *end* of its block of R (so its last
row is always row i * R + R - 1); the rows before them and the sequences past the call's are
padding (cache slot -1: they read and write nothing). Rows are not copied in: the host stages
each bucket row's source row and where the caller's tensors are (``rows_at``), and the
program's first step reads them there (``TritonOps.propose_prepare``; elsewhere gathered,
``gather_rows``). A sequence may bring more rows than R when R is the window W: its last W
rows are staged (no later row ever attends the earlier ones), and the earlier ones are only
checked.

Only each sequence's last row's output is read (the real-row step's draft and hidden), so the
real-row step runs ``decode_step(..., logits_rows=...)``: every row writes its key to the
cache, the last rows alone run the attention, the MoE and the head (a catch-up of R rows costs
the experts of one row per sequence).

Nothing in it synchronises with the host, so the values the host cannot see without waiting
are checked on the device: token ids in the vocabulary, positions where the drafter expects
them, |hidden| finite and <= ``MAX_ABS_HIDDEN``, NaN logits (and, made by the drafter before
the call, per-sequence sampling settings in range). Each failed check sets a bit of
the int32 error word (``ERR_*``), and an input error turns every cache write of the call off
(every slot -1: the cache stays bit for bit as it was); the drafter reads the word at the next
synchronisation and raises there. Bad values never reach a memory access: ids are clamped,
bad and padding rows zeroed, positions taken from what the host knows.

Shape legend: S sequences (bucket), R rows per sequence (bucket), k drafts, M*D = hc_mult *
hidden_size, V vocabulary.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from .cache import KVCache
from .model import DeepSeekV4MTP
from .ops import REFERENCE
from .sampling import _one_hot_argmax, _top_p

ERR_IDS = 1
"""A token id outside the vocabulary (``next_token_ids`` / ``input_ids``)."""
ERR_POSITIONS = 2
"""A row's position differs from where the drafter expects it."""
ERR_HIDDEN = 4
"""A ``hidden_states`` value non-finite or above ``MAX_ABS_HIDDEN`` in magnitude."""
ERR_LOGITS = 8
"""NaN in a draft step's logits (finite inputs, non-finite output: the weights)."""
ERR_SAMPLING = 16
"""A per-sequence ``temperature`` / ``top_p`` value out of range (``Sampling.check_on_device``)."""
INPUT_ERRORS = ERR_IDS | ERR_POSITIONS | ERR_HIDDEN | ERR_SAMPLING

_NO_LIMIT = 2**62  # "drop no entry" in the rollback's per-slot position limit

MODES = ("greedy", "sample", "top_p")
"""How a program picks its drafts: argmax; from softmax(logits / temperature); the same
restricted to the top-p nucleus (``mtp.sampling.probs``' arithmetic, per-sequence settings)."""


def draw(q: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of q [S, V] (probabilities) from uniforms u [S] in [0, 1): the token
    whose cumulative interval holds u * (total mass), i.e. token i with probability q_i /
    sum(q); a token with q_i = 0 is never drawn (its interval is empty). Inverse-CDF sampling:
    the uniforms come from the caller's generator outside the captured region."""
    cdf = q.cumsum(dim=-1)  # [S, V]
    target = (u * cdf[:, -1]).unsqueeze(1)  # [S, 1], < the total mass
    token = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return token.clamp_(max=q.shape[-1] - 1)  # (a NaN row: flagged, kept in range)


def hidden_bound(dtype: torch.dtype, max_abs_hidden: float) -> float:
    """The largest |value| a hidden state of ``dtype`` may hold: ``max_abs_hidden`` within the
    dtype's range (float16: 1e6 would round to inf)."""
    return min(max_abs_hidden, torch.finfo(dtype).max)


def within_bound(hidden: torch.Tensor, max_abs_hidden: float) -> torch.Tensor:
    """Elementwise: |value| <= :func:`hidden_bound` (False for NaN and inf). The one definition
    of a hidden value the drafter accepts (``Drafter``'s checks, ``prepare``, the rows a
    program does not stage; ``TritonOps.propose_prepare`` compares against the same bound)."""
    return hidden.abs() <= hidden_bound(hidden.dtype, max_abs_hidden)


def bad_values(ids: torch.Tensor, positions: torch.Tensor, want: torch.Tensor,
               hidden: torch.Tensor, vocab_size: int, max_abs_hidden: float):
    """Per row (any leading shape [...], ``hidden`` [..., N]): (the id outside the
    vocabulary, the position not ``want``, a hidden value outside :func:`within_bound`)."""
    return ((ids < 0) | (ids >= vocab_size), positions.to(torch.int64) != want,
            ~within_bound(hidden, max_abs_hidden).all(dim=-1))


def error_word(bad_ids: torch.Tensor, bad_pos: torch.Tensor, bad_hid: torch.Tensor
               ) -> torch.Tensor:
    """The failed input checks as an error word [] int32 (``ERR_*`` bits)."""
    return (bad_ids.any().to(torch.int32) * ERR_IDS + bad_pos.any().to(torch.int32)
            * ERR_POSITIONS + bad_hid.any().to(torch.int32) * ERR_HIDDEN)


def prepare(meta: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor, hidden: torch.Tensor,
            rows: int, max_abs_hidden: float, vocab_size: int, cache_pos: torch.Tensor,
            pre_error: torch.Tensor | None = None):
    """A call's device-side checks, the forward's inputs and the rollback, from the staged
    buffers: meta [3, S] (slots, next real positions, row counts), ids / pos [S*R] and hidden
    [S*R, M*D] (sequence i's rows at the end of its block of R). Rolls back ``cache_pos``
    ([L, max_seqs, C]) in place: every entry at or after a checked sequence's next real
    position came from a draft. -> (ids_in, pos_in [S*R] int64, x_in [S*R, M*D], row_slots
    [S*R], draft_slots [S] (-1: padding, or every one when a check failed), error word []
    int32). ``pre_error`` [] int32: failed checks found before (the rows of a sequence beyond
    its block), OR-ed into the word: the call is refused likewise. Torch operations (~45
    launches on CUDA); ``TritonOps.propose_prepare`` computes the same, bit for bit, in two
    kernels."""
    s = meta.shape[1]
    slots, starts, counts = meta[0], meta[1], meta[2]
    j = torch.arange(rows, device=meta.device)
    first = rows - counts  # [S] the block's first real row
    real = (j[None, :] >= first[:, None]) & (slots[:, None] >= 0)  # [S, R]
    want = starts[:, None] + j[None, :] - first[:, None]  # [S, R] positions
    ids = ids.view(s, rows)
    hid = hidden.view(s, rows, -1)  # [S*R, M*D] -> [S, R, M*D]
    bad_ids, bad_pos, bad_hid = (real & bad for bad in bad_values(
        ids, pos.view(s, rows), want, hid, vocab_size, max_abs_hidden))
    error = error_word(bad_ids, bad_pos, bad_hid)
    if pre_error is not None:
        error = error | pre_error
    ok = error == 0
    seq_on = (slots >= 0) & ok  # [S] sequences whose cache this call may change
    row_slots = torch.where(real & ok, slots[:, None], -1).flatten()  # [S*R]
    x_in = torch.where((real & ~bad_hid)[..., None], hid, 0).flatten(0, 1)
    ids_in = torch.where(real & ~bad_ids, ids, 0).flatten()
    pos_in = torch.where(real, want, 0).flatten()
    # the rollback: per slot the first position to drop (padding sequences: the extra last)
    limit = torch.full((cache_pos.shape[1] + 1,), _NO_LIMIT, dtype=torch.int64,
                       device=meta.device)
    limit.scatter_(0, torch.where(seq_on, slots, cache_pos.shape[1]), starts)
    cache_pos.masked_fill_(cache_pos >= limit[:-1].view(1, -1, 1), -1)
    return ids_in, pos_in, x_in, row_slots, torch.where(seq_on, slots, -1), error


ROWS_AT = 8
"""Length of a call's row-source record (:func:`rows_at`), staged after the meta and the
row sources."""


def rows_at(hidden: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor) -> list[int]:
    """Where a call's rows are, as ints a kernel reads them by: (hidden's address, its row
    stride, ids' address, stride, 1 if int32 (else int64), positions' the same three), strides
    in elements. ``hidden`` [T, N] with unit stride along N; ``ids`` / ``positions`` [T]
    int64 or int32. A graph captures a kernel reading these, not the addresses themselves:
    each call brings its own tensors, with no copy into the graph's buffers."""
    return [hidden.data_ptr(), hidden.stride(0),
            ids.data_ptr(), ids.stride(0), int(ids.dtype == torch.int32),
            positions.data_ptr(), positions.stride(0), int(positions.dtype == torch.int32)]


def gather_rows(src: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor,
                hidden: torch.Tensor, dtype: torch.dtype):
    """The bucket's rows from the caller's: row b is the caller's row ``src[b]`` -> (ids,
    positions [S*R] int64, hidden [S*R, N] ``dtype``). What ``TritonOps.propose_prepare``
    reads through :func:`rows_at` (its reference: ``prepare`` of these)."""
    return (ids.index_select(0, src).to(torch.int64),
            positions.index_select(0, src).to(torch.int64),
            hidden.index_select(0, src).to(dtype))


class ProposeProgram:
    """Static buffers for one bucket and :meth:`run`, the call's computation on them.

    Args:
        model: the module (its backend runs the ops).
        cache: the drafter's KV cache (its tensors are read and written in place).
        seqs, rows, k: the bucket: S sequences, R rows per sequence (R <= min(capacity, W):
            every row's key is written before the last rows read, in distinct ring entries;
            more rows than W are never attended), k drafts.
        max_abs_hidden: the bound on |hidden_states|.
        side_stream: a CUDA stream for the shared expert (``decode_step``'s), or None.
        mode: one of ``MODES``; sampled programs read ``temperature`` / ``top_p`` [S] and the
            uniforms ``u`` [S, k] from their buffers (staged per call).
    """

    def __init__(self, model: DeepSeekV4MTP, cache: KVCache, seqs: int, rows: int, k: int,
                 max_abs_hidden: float, side_stream=None, mode: str = "greedy"):
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        cfg, dev = model.config, cache.kv.device
        if rows > min(cache.capacity, cfg.sliding_window):
            raise ValueError(f"rows: {rows} per sequence do not fit the ring (capacity "
                             f"{cache.capacity}) or exceed the window {cfg.sliding_window}")
        self.model, self.cache = model, cache
        self.seqs, self.rows, self.k, self.mode = seqs, rows, k, mode
        self.max_abs_hidden = max_abs_hidden
        self.side_stream = side_stream
        n = seqs * rows
        # A call's inputs in one buffer, staged by one copy: meta [3, S] (per sequence: cache
        # slot (-1: padding), next real position, new rows (0: padding)), then per row of the
        # bucket the caller's row it is read from (``src``), then where the caller's rows are
        # (``rows_at``): the rows themselves are read where the caller has them, not copied
        self.staged = torch.zeros(3 * seqs + n + ROWS_AT + 1, dtype=torch.int64, device=dev)
        self.meta = self.staged[:3 * seqs].view(3, seqs)  # [3 * S] -> [3, S]
        self.meta[0] = -1
        self.src = self.staged[3 * seqs:3 * seqs + n]
        self.rows_at = self.staged[3 * seqs + n:-1]
        # last: the address of the call's own output buffer (0: none, capture and warm-up),
        # which the program's last step fills from ``packed``
        self.out_at = self.staged[-1:]
        # its host side (pinned on CUDA: copies are queued, the host does not wait), written
        # through a numpy view; a captured graph's first node reads it in (a kernel where it is
        # mapped, else a copy), so it is never replaced (``after_failure``)
        self.host = torch.zeros(self.staged.shape, dtype=torch.int64, pin_memory=dev.type == "cuda")
        self._host_np = self.host.numpy()
        self.host_meta = self.host[:3 * seqs].view(3, seqs)  # the staged call's meta
        self.host_src = self.host[3 * seqs:3 * seqs + n]
        self._host_np[:seqs] = -1  # every sequence padding until a call is staged
        self._iota = np.arange(n)
        self._src_in_order = False  # host_src holds _iota (a call that filled the bucket)
        # the slots and row counts of the call the host buffer holds, with their source rows
        # (empty: none known), and where a sequence brings more rows than R the counts and
        # offsets its rows' checks take (else None); a call of the same ones writes only its
        # starts
        self._staged_as: tuple[list[int], list[int], tuple | None] = [], [], None
        # the staged call's tensors (as the program reads them: the int and hidden dtypes it
        # takes), held until the next call is staged: a replay reads them by address
        blank = torch.zeros(1, dtype=torch.int64, device=dev)
        self._blank = (torch.zeros(1, cfg.hc_dim, dtype=model.dtype, device=dev), blank, blank)
        self.caller = self._blank
        self.result: torch.Tensor | None = None  # the staged call's output buffer
        # The error word's host copy: written by every call at its end (in a captured graph, by
        # the graph itself) and read only after waiting for that call's event, so it is never
        # replaced (a graph holds its address)
        pin = dev.type == "cuda"
        self.error_host = torch.zeros((), dtype=torch.int32, pin_memory=pin)
        self._j_host = np.arange(rows)
        self._last = torch.arange(seqs, device=dev) * rows + rows - 1  # [S]
        self._ahead = torch.arange(max(k - 1, 0), device=dev)[:, None]  # [k-1, 1]
        self.temperature = torch.ones(seqs, dtype=torch.float32, device=dev)
        self.top_p = torch.ones(seqs, dtype=torch.float32, device=dev)
        self._held: list[float | None] = [1.0, 1.0]  # the scalar each holds in every row
        self.u = torch.zeros(seqs, k, dtype=torch.float32, device=dev)
        # the checks of the rows a call brings beyond a block (not staged): ERR_* bits, OR-ed
        # into the program's own before anything is written
        self.pre_error = torch.zeros((), dtype=torch.int32, device=dev)
        self._pre_error_set = False
        # the call's error word on the device: ``pre_error``'s bits, then the program's checks'
        self.error = torch.zeros((), dtype=torch.int32, device=dev)
        # where a backend's kernels reach the host buffer and the host's error word (page-
        # locked memory mapped into the device's address space), or None: copies instead
        mapped = getattr(model.ops, "mapped_address", None)
        self._host_at = mapped(self.host) if mapped is not None else None
        self._error_host_at = mapped(self.error_host) if mapped is not None else None
        # The outputs in one byte buffer, drafts | hidden | probs: the program's last step
        # copies it whole into the call's own buffer (``stage``'s ``out``: one allocation per
        # call, not one per tensor), which a proposal cuts into the three when read (``unpack``)
        wide = torch.float64 if model.dtype == torch.float64 else torch.float32  # logits'
        parts = [(torch.int64, (seqs, k)), (model.dtype, (seqs, k, cfg.hc_dim))]
        if mode != "greedy":
            parts.append((wide, (seqs, k, cfg.vocab_size)))
        sizes = [math.prod(shape) * dt.itemsize for dt, shape in parts]
        self.packed = torch.empty(sum(sizes), dtype=torch.uint8, device=dev)
        self._layout = [(a, a + n, dt, shape) for (dt, shape), n, a
                        in zip(parts, sizes, np.cumsum([0] + sizes[:-1]).tolist())]
        self.out = self.unpack(self.packed, seqs)  # drafts, hidden, probs (None): static views
        # each step's NaN probe per sequence [k, S] (``_pick``), read by the call's last launch
        self.probes = torch.empty(k, seqs, dtype=wide, device=dev)

    def after_failure(self) -> None:
        """After a call that failed between its staging and its end: its reads of the host
        buffer (a copy, or the first kernel of a replay) may still be in flight, so wait for
        the device before the buffer is written again. The call's own error is what the
        caller raises; a device too broken to synchronise raises it again at the next call."""
        if self.host.is_pinned():
            try:
                torch.cuda.synchronize(self.staged.device)
            except Exception:  # noqa: BLE001 - the failed call's error is the one to report
                pass

    def stage(self, slots: list[int], starts: list[int], counts: list[int], ids: torch.Tensor,
              positions: torch.Tensor, hidden: torch.Tensor, out: torch.Tensor) -> None:
        """Stage a call: s <= S sequences' cache slots, next real positions and row counts
        (more than R only when R = W: the last R rows are staged, the earlier ones checked
        into ``pre_error``), their T rows (``ids`` / ``positions`` [T], ``hidden`` [T, M*D]),
        and ``out``, a byte buffer of ``packed``'s size the call's outputs go to (``unpack``
        cuts it; :meth:`new_out` makes one): the program fills it at its end, so the outputs
        need no copy after the call.

        Host work only (but for a hidden dtype other than the module's, or a layout a kernel
        cannot read, converted here): the meta, each bucket row's source row (sequence i's
        last rows at the end of its block; padding rows repeat a real row and are never read)
        and where the caller's tensors are go into the pinned host buffer ``host``, which
        :meth:`run_call` reads in first (``_stage_in``; in a captured graph: its first node);
        the program then reads the rows where they are. The caller guarantees that the
        previous call's reads of ``host`` are done (``Drafter`` waits for each graphed call's event
        before the next call) and keeps the tensors unchanged until the call has run (the
        program holds them until the next call is staged)."""
        big, r = self.seqs, self.rows
        s = len(slots)
        pad = big - s
        if self._pre_error_set:  # the last call's word
            self.pre_error.zero_()
            self._pre_error_set = False
        host = self._host_np
        at = 3 * big
        held_slots, held_counts, over = self._staged_as
        if held_slots == slots and held_counts == counts:
            # the sequences and row counts the buffer holds (a decode loop's usual call): only
            # their starts moved, and each bucket row's source row is the same
            host[big:big + s] = starts
        else:
            self._staged_as = [], [], None  # (nothing known while it is rewritten)
            host[:at] = slots + [-1] * pad + starts + [0] * pad + counts + [0] * pad
            over = None  # (only when R = W: a catch-up of more rows than a block holds)
            if pad == 0 and min(counts) == r == max(counts):  # the bucket's rows, in order
                if not self._src_in_order:
                    host[at:at + big * r] = self._iota
                    self._src_in_order = True
            else:  # bucket row (i, j) <- the caller's row off_i + j - (R - n_i), the first before
                n = np.asarray(counts)
                off = np.cumsum(n) - n
                src = np.maximum(self._j_host[None, :] - r + n[:, None], 0) + off[:, None]  # [s, R]
                host[at:at + s * r] = src.reshape(-1)
                host[at + s * r:at + big * r] = 0
                self._src_in_order = False
                if n.max() > r:
                    over = n, off
            self._staged_as = list(slots), list(counts), over
        if over is not None:
            self._check_unstaged(*over, starts, ids, positions, hidden)
        if hidden.dtype != self.model.dtype or hidden.stride(-1) != 1:
            hidden = hidden.to(self.model.dtype).contiguous()
        host[at + big * r:-1] = rows_at(hidden, ids, positions)
        host[-1] = out.data_ptr()
        self.caller = (hidden, ids, positions)
        self.result = out

    def new_out(self) -> torch.Tensor:
        """An output buffer for one call (``stage``'s ``out``): an allocation, no launch."""
        return torch.empty(self.packed.shape, dtype=torch.uint8, device=self.packed.device)

    def _check_unstaged(self, n, off, starts: list[int], ids, positions, hidden) -> None:
        """The value checks of the rows before each sequence's last R (not staged: never
        attended again), on the device, into ``pre_error``: the call is refused as if a staged
        row were bad."""
        r, over = self.rows, n > self.rows
        rows = np.concatenate([np.arange(o, o + c - r) for o, c in zip(off[over], n[over])])
        want = np.concatenate([np.arange(p, p + c - r)
                               for p, c in zip(np.asarray(starts)[over], n[over])])
        pin = self.staged.device.type == "cuda"
        host = torch.from_numpy(np.stack((rows, want)))  # [2, dropped rows]
        both = (host.pin_memory() if pin else host).to(self.staged.device, non_blocking=True)
        idx = both[0]
        self.pre_error.copy_(error_word(*bad_values(
            ids.index_select(0, idx), positions.index_select(0, idx), both[1],
            hidden.index_select(0, idx), self.model.config.vocab_size, self.max_abs_hidden)))
        self._pre_error_set = True

    def refuse_if(self, flag: torch.Tensor, bit: int) -> None:
        """Refuse the staged call where ``flag`` (bool [] on the device: a check the caller
        made there, the sampling settings' ranges) is set: ``bit`` OR-ed into ``pre_error``,
        as :meth:`_check_unstaged` does. After :meth:`stage`, which clears the last call's."""
        self.pre_error.bitwise_or_(flag.to(torch.int32) * bit)
        self._pre_error_set = True

    def stage_sampling(self, sampling, s: int) -> None:
        """A sampled call's settings (scalars or [s] tensors) and fresh uniforms from its
        generator (every row of the bucket: the generator advances by S * k draws). A scalar
        the buffer already holds (the last call's, nothing else writes it) is not written
        again."""
        for i, (buf, value) in enumerate(((self.temperature, sampling.temperature),
                                          (self.top_p, sampling.top_p))):
            if isinstance(value, torch.Tensor):
                self._held[i] = None
                buf[:s].copy_(value)
            elif self._held[i] != float(value):
                self._held[i] = None  # (unknown if the fill raises)
                buf.fill_(float(value))
                self._held[i] = float(value)
        torch.rand(self.u.shape, generator=sampling.generator, device=self.u.device,
                   out=self.u)

    def clear(self) -> None:
        """Every sequence padding (what capture and warm-up run on: nothing is written, and no
        caller's row is read)."""
        self._host_np[:] = 0
        self._host_np[:self.seqs] = -1
        self._src_in_order = False
        self._staged_as = [], [], None
        self.caller = self._blank
        self.result = None
        self.staged.copy_(self.host)

    def _pick(self, logits: torch.Tensor, step: int):
        """Draft tokens [S] and their q [S, V] (None when greedy) from one step's logits; the
        step's NaN probe into ``probes[step]`` [S]: NaN exactly where a row of ``logits`` holds
        one (greedy: the value its own reduction picked, the max propagating NaN; sampled: the
        row's max, one launch instead of a NaN mask's two)."""
        probe = self.probes[step]
        if self.mode == "greedy":
            # the index of the first maximum, NaN counting as the largest: the backend's,
            # torch.max's pick (a foreign backend without it: torch.max)
            pick = getattr(self.model.ops, "argmax_rows", REFERENCE.argmax_rows)
            return pick(logits, top=probe)[1], None
        torch.amax(logits, dim=-1, out=probe)
        x = logits if logits.dtype == torch.float64 else logits.float()
        t = self.temperature.to(x.dtype)[:, None]  # [S, 1]
        greedy_rows = t == 0
        p = torch.softmax(x / torch.where(greedy_rows, 1.0, t), dim=-1)
        if self.mode == "top_p":
            p = _top_p(p, self.top_p.to(x.dtype)[:, None])
        p = torch.where(greedy_rows, _one_hot_argmax(x), p)
        return draw(p, self.u[:, step].to(x.dtype)), p

    def run(self):
        """The call on the staged buffers -> (drafts [S, k] int64, hidden [S, k, M*D], q
        [S, k, V] or None (greedy), error word [] int32), the three outputs also copied into
        the staged call's buffer and the word to ``error_host``. No host synchronisation."""
        model, cache = self.model, self.cache
        cfg = model.config
        r = self.rows
        starts, counts = self.meta[1], self.meta[2]
        fused = getattr(model.ops, "propose_prepare", None)
        if fused is not None:  # a backend's kernels, reading the caller's rows by address
            ids_in, pos_in, x_in, row_slots, draft_slots, error = fused(
                self.meta, self.src, self.rows_at, r, cfg.hc_dim, model.dtype, self.max_abs_hidden,
                cfg.vocab_size, cache.pos, error=self.error)
        else:  # the definition, on the rows gathered from the tensors the call staged
            hidden, ids, pos = self.caller
            ids_in, pos_in, x_in, row_slots, draft_slots, error = prepare(
                self.meta, *gather_rows(self.src, ids, pos, hidden, model.dtype), r,
                self.max_abs_hidden, cfg.vocab_size, cache.pos, pre_error=self.error)

        # every row's key into the cache; each sequence's last row alone goes on -> x [S, M*D]
        last_rows = None if r == 1 else self._last
        x, logits = model.decode_step(ids_in, pos_in, x_in, row_slots, cache, 0,
                                      side_stream=self.side_stream, logits_rows=last_rows)
        # the draft steps' positions, all at once: step s at the last row's position + s
        draft_pos = (starts + counts) + self._ahead  # [k-1, S]
        hidden, drafts, qs = [x], [], []
        token, q = self._pick(logits, 0)
        for step in range(1, self.k):
            drafts.append(token)
            qs.append(q)
            x, logits = model.decode_step(token, draft_pos[step - 1], x, draft_slots, cache,
                                          step, side_stream=self.side_stream)
            hidden.append(x)
            token, q = self._pick(logits, step)
        drafts.append(token)
        qs.append(q)
        out_drafts, out_hidden, out_probs = self.out
        torch.stack(drafts, dim=1, out=out_drafts)
        torch.stack(hidden, dim=1, out=out_hidden)
        if out_probs is not None:
            torch.stack(qs, dim=1, out=out_probs)
        return out_drafts, out_hidden, out_probs, self._finish(error)

    def _finish(self, error: torch.Tensor) -> torch.Tensor:
        """The NaN probes' bit (``ERR_LOGITS``) into the error word, the outputs copied into
        the staged call's own buffer (``stage``'s ``out``), the word copied to
        ``error_host`` -> the call's error word. A backend's ``finish_call`` does it in one
        launch, reading the buffer's address where the host staged it (a graph replay copies
        to each call's own) and storing the word where ``error_host`` is mapped; elsewhere
        torch operations, into the buffer held, and a copy."""
        finish = getattr(self.model.ops, "finish_call", None)
        if finish is not None:
            error = finish(self.packed, self.out_at, error, self.probes, ERR_LOGITS,
                           self._error_host_at)
            if self._error_host_at is not None:  # (stored there by the same launch)
                return error
        else:
            nan = torch.isnan(self.probes).any()  # NaN where a step's row held one
            error = torch.add(error, nan, alpha=ERR_LOGITS)  # (one launch: int32 + bool * bit)
            if self.result is not None:
                self.result.copy_(self.packed)
        self.error_host.copy_(error, non_blocking=True)
        return error

    def _stage_in(self) -> None:
        """The staged call copied in from ``host``, and its error word begun with
        ``pre_error``'s bits: a backend's ``stage_in``, one launch that reads ``host`` where it
        is mapped; elsewhere two copies."""
        stage = getattr(self.model.ops, "stage_in", None)
        if stage is not None and self._host_at is not None:
            stage(self.staged, self._host_at, self.pre_error, self.error)
        else:
            self.staged.copy_(self.host, non_blocking=True)
            self.error.copy_(self.pre_error)

    def run_call(self, done=None):
        """The staged call copied in from ``host`` (``_stage_in``), :meth:`run` (which ends
        with the outputs' copy into the call's output buffer and the error word's to
        ``error_host``: ``_finish``), then ``done`` (an event, or None) recorded: all a call
        does on the device, in one unit a graph can capture (with an external event, the
        record becomes its last node: the host launches the graph and nothing else)."""
        self._stage_in()
        out = self.run()
        if done is not None:
            done.record()
        return out

    def unpack(self, packed: torch.Tensor, s: int) -> tuple:
        """``packed`` (``self.packed`` or a call's output buffer) -> the first ``s``
        sequences' (drafts [s, k] int64, hidden [s, k, M*D], probs [s, k, V] or None): views,
        no copy."""
        return tuple(self.unpack_part(packed, s, i) for i in range(3))

    def unpack_part(self, packed: torch.Tensor, s: int, i: int) -> torch.Tensor | None:
        """One of :meth:`unpack`'s three (0 drafts, 1 hidden, 2 probs): a proposal makes only
        what its caller reads. Two torch calls (each ~1-3 us of host time): the part's first
        ``s`` rows as bytes, then viewed as its dtype."""
        parts = self._byte_parts
        if i >= len(parts):
            return None  # (greedy: no probs)
        offset, dt, row, strides = parts[i]
        return packed.as_strided((s, *row), strides, packed.storage_offset() + offset).view(dt)

    @functools.cached_property
    def _byte_parts(self) -> list[tuple]:
        """Per part of ``packed`` (``_layout``): (its byte offset, dtype, one row's shape with
        the last dimension in bytes, the contiguous byte strides of [rows, *that shape])."""
        parts = []
        for a, _, dt, shape in self._layout:
            row = (*shape[1:-1], shape[-1] * dt.itemsize)  # [S, ..., N] -> [..., N bytes]
            strides = [1]
            for n in reversed(row):
                strides.insert(0, strides[0] * n)
            parts.append((a, dt, row, tuple(strides)))
        return parts


class StaticProposal:
    """Base of a bucket's runner: :meth:`replay` runs the call (``ProposeProgram.run_call``):
    its outputs into the staged call's own buffer, its error word into
    ``program.error_host`` and, on CUDA, the event ``done`` recorded after both (None
    elsewhere: the copies are done when replay returns). Set by the subclass: ``program``,
    ``done``, ``error`` (the device's error word)."""

    program: ProposeProgram
    done: object = None
    error: torch.Tensor


class EagerProposal(StaticProposal):
    """A bucket's program run eagerly at each :meth:`replay` (what a captured graph replays)."""

    def __init__(self, program: ProposeProgram):
        self.program = program
        self.done = torch.cuda.Event() if program.packed.is_cuda else None

    def replay(self) -> None:
        self.error = self.program.run_call(self.done)[-1]


class ProposeBuckets:
    """The buckets of (sequences, rows per sequence, k) and their programs, made on first use.
    Here the programs run eagerly (any device, any backend: for tests);
    ``mtp_kernels.ProposeGraphs`` captures each in a CUDA graph instead.

    Args:
        model, cache: as :class:`ProposeProgram`.
        seq_buckets: sequence counts; a call with S sequences uses the smallest bucket >= S.
        row_buckets: new rows per sequence (each <= min(capacity, W)); a call whose longest
            sequence has n rows uses the smallest bucket >= n.
        max_abs_hidden: the bound on |hidden_states| checked on the device.
        max_rows: the most rows (S * R) of a bucket (its buffers and intermediates grow
            with them); a call needing a larger one gets None from :meth:`bucket`. None: no
            bound.
    """

    def __init__(self, model: DeepSeekV4MTP, cache: KVCache, seq_buckets: tuple[int, ...],
                 row_buckets: tuple[int, ...], max_abs_hidden: float, side_stream=None,
                 max_rows: int | None = None):
        self.model, self.cache = model, cache
        self.seq_buckets = tuple(sorted(set(seq_buckets)))
        self.row_buckets = tuple(sorted(set(row_buckets)))
        self.max_rows = max_rows
        self.max_abs_hidden = max_abs_hidden
        self.side_stream = side_stream
        self.made: dict[tuple[int, int, int, str], object] = {}  # (S, R, k, mode) -> runner
        self.failed: set[tuple[int, int, int, str]] = set()  # buckets whose making raised
        # a call's (sequences, longest row count[, k, mode]) -> its bucket, its runner: calls
        # that fit a bucket only, so at most max(seq_buckets) x max(row_buckets) (x k x modes)
        self._sizes: dict[tuple[int, int], tuple[int, int]] = {}
        self._calls: dict[tuple[int, int, int, str], object] = {}

    def bucket(self, seqs: int, rows: int) -> tuple[int, int] | None:
        """(S, R) of the smallest buckets holding a call, or None (too large for any)."""
        found = self._sizes.get((seqs, rows))
        if found is None:
            s = next((b for b in self.seq_buckets if b >= seqs), None)
            r = next((b for b in self.row_buckets if b >= rows), None)
            if s is None or r is None or (self.max_rows is not None and s * r > self.max_rows):
                return None
            found = self._sizes[(seqs, rows)] = (s, r)  # only sizes a bucket holds: bounded
        return found

    def get(self, seqs: int, rows: int, k: int, mode: str = "greedy"):
        """The bucket's runner for a call (made now if it is the bucket's first call); None if
        no bucket holds the call (:meth:`bucket`) or making its runner failed before (the
        error was raised then)."""
        runner = self._calls.get((seqs, rows, k, mode))  # a call of this size ran before
        if runner is not None:
            return runner
        found = self.bucket(seqs, rows)
        if found is None:
            return None
        s, r = found
        key = (s, r, k, mode)
        runner = self.made.get(key)
        if runner is None and key not in self.failed:
            program = ProposeProgram(self.model, self.cache, s, r, k, self.max_abs_hidden,
                                     side_stream=self.side_stream, mode=mode)
            try:
                runner = self.made[key] = self._make(program)
            except BaseException:
                self.failed.add(key)
                raise
        if runner is not None:
            self._calls[(seqs, rows, k, mode)] = runner
        return runner

    def _make(self, program: ProposeProgram):
        return EagerProposal(program)


__all__ = ["ERR_HIDDEN", "ERR_IDS", "ERR_LOGITS", "ERR_POSITIONS", "ERR_SAMPLING", "INPUT_ERRORS",
           "MODES", "ROWS_AT", "EagerProposal", "ProposeBuckets", "ProposeProgram",
           "StaticProposal", "draw", "gather_rows", "rows_at"]
