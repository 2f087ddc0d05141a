"""CUDA-graph capture of the decode draft step, one graph per batch bucket.

A draft step at small batch is a few dozen short kernels; launched one by one from Python the
gaps between them cost as much as the work. :class:`DraftStepGraphs` captures the module's own
``DeepSeekV4MTP.decode_step`` (forward + logits, one row per sequence) with its triton
backend, for each bucket size, and replays it: inputs are copied into the bucket's static
buffers (padding rows get slot -1: they read and write no cache entry), outputs are views of its
static outputs.

Example:
    >>> graphs = DraftStepGraphs(model, cache, buckets=(1, 4, 16, 64))  # model.ops: triton
    >>> hidden, logits = graphs.step(ids, positions, hidden, slots)   # T <= 64 rows
    >>> tokens = graphs.propose(ids, positions, hidden, slots, k=3)   # [T, 3] greedy drafts
"""

from __future__ import annotations

import gc

import torch
import triton
import triton.language as tl

from mtp.cache import KVCache
from mtp.model import DeepSeekV4MTP

from . import _common
from .backend import TritonMTP, TritonOps

# Buckets up to this many rows are captured with programmatic dependent launch (each kernel's
# launch and prologue overlap its predecessor's tail): it pays where the step is a chain of
# short kernels and costs from 8 rows, where early blocks waiting in griddepcontrol.wait hold
# SM room (measurements: kernels/NOTES.md, round 4 v20 and round 5).
PDL_ROWS = 4


# Nothing that varies between a bucket's calls is specialised on (the row count, the inputs'
# alignment), so one compiled kernel serves every call and _Bucket can keep its runner.
@triton.jit(do_not_specialize=["T", "N_HID"],
            do_not_specialize_on_alignment=["ids_ptr", "pos_ptr", "slots_ptr", "hid_ptr"])
def stage_inputs_kernel(ids_ptr, pos_ptr, slots_ptr, hid_ptr, ids_dst, pos_dst, slots_dst,
                        hid_dst, T, SIZE, N_HID, BS: tl.constexpr, BH: tl.constexpr):
    """A step's inputs into a bucket's static buffers: program 0 the ids, positions and slots
    (slot -1 on the padding rows T..SIZE-1), every program one block of the hidden rows."""
    pid = tl.program_id(0)
    if pid == 0:
        r = tl.arange(0, BS)
        m = r < T
        tl.store(ids_dst + r, tl.load(ids_ptr + r, mask=m), mask=m)
        tl.store(pos_dst + r, tl.load(pos_ptr + r, mask=m), mask=m)
        tl.store(slots_dst + r, tl.load(slots_ptr + r, mask=m, other=-1), mask=r < SIZE)
    offs = pid * BH + tl.arange(0, BH)
    hm = offs < N_HID
    tl.store(hid_dst + offs, tl.load(hid_ptr + offs, mask=hm), mask=hm)


_STAGE_BH = 4096


def capture(run, device: torch.device, pool, pdl: bool):
    """Warm ``run`` up twice on a side stream (compiles kernels, fills lazy caches), then
    capture it into a CUDA graph in ``pool``, with programmatic dependent launch as ``pdl``
    says -> (graph, what the captured ``run`` returned: static outputs each replay rewrites)."""
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream(device))
    was = _common.PDL
    _common.PDL = pdl  # read by every Triton launch: recorded into the graph's nodes
    try:
        with torch.cuda.stream(stream):
            for _ in range(2):
                run()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # No garbage collection inside the capture: one there can finalise dead cycles' CUDA
        # objects (a dropped drafter's graphs, kernels, streams) while the stream captures; the
        # GPU tests' process aborted inside such a collection (test_cli's bench, after earlier
        # tests dropped their drafters). torch no longer collects before a capture by default.
        collecting = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(graph, pool=pool):
                out = run()
        finally:
            if collecting:
                gc.enable()
    finally:
        _common.PDL = was
    return graph, out


class _Bucket:
    def __init__(self, model: DeepSeekV4MTP, ops: TritonOps, cache: KVCache, size: int,
                 spec_step_idx: int, pool, side: torch.cuda.Stream | None, pdl: bool):
        cfg, dev = model.config, ops.device
        self.pdl = pdl and bool(_common.PDL_ARCH)
        self.size = size
        self.ids = torch.zeros(size, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(size, dtype=torch.int64, device=dev)
        self.slots = torch.full((size,), -1, dtype=torch.int64, device=dev)
        self.hidden = torch.zeros(size, cfg.hc_dim, dtype=model.dtype, device=dev)
        self.device = dev
        self._stage_grid = (max(1, triton.cdiv(size * cfg.hc_dim, _STAGE_BH)), 1, 1)
        self._stage_bs = triton.next_power_of_2(size)
        self._stage_run = self._stage_runner()

        def run():
            with model.using(ops):
                return model.decode_step(self.ids, self.pos, self.hidden, self.slots, cache,
                                         spec_step_idx, side_stream=side)

        self.graph, (self.out_hidden, self.out_logits) = capture(run, dev, pool, self.pdl)

    def _stage_args(self, ids, pos, hidden, slots, t) -> tuple:
        """stage_inputs_kernel's arguments, its two constexprs (BS, BH) last."""
        return (ids, pos, slots, hidden, self.ids, self.pos, self.slots, self.hidden, t,
                self.size, t * self.hidden.shape[1], self._stage_bs, _STAGE_BH)

    def _stage_launch(self, args) -> object:
        """Triton's usual launch of the staging kernel; returns the compiled kernel."""
        return stage_inputs_kernel[self._stage_grid[:1]](*args[:-2], BS=args[-2], BH=args[-1],
                                                         num_warps=4)

    def _stage_runner(self):
        """The staging kernel's compiled runner, for :meth:`stage` to call directly: Triton's
        launch path binds and specialises the arguments again on every call, host time that a
        decode loop synchronising each step waits for (kernels/NOTES.md round 6 has the
        figures). The runner is a Triton
        internal: probed here on known inputs (before any capture) and not used where it is
        missing or disagrees with the usual launch. Leaves the buffers as they were (zeros,
        slot -1)."""
        n, dev, width = self.size, self.device, self.hidden.shape[1]
        # known values (no random draw: the caller's RNG state stays as it was); the hidden
        # rows are small integers, exact in any compute dtype
        probe = (torch.arange(n, device=dev) + 7, torch.arange(n, device=dev) + 3,
                 (torch.arange(n * width, device=dev) % 251 - 125).to(self.hidden.dtype)
                 .view(n, width),  # [n * width] -> [n, width]
                 torch.arange(n, device=dev))
        t = max(1, n - 1)  # with two rows or more, the last one is padding (slot -1)
        run = None
        try:
            run = self._stage_launch(self._stage_args(*probe, n))[self._stage_grid]
            self.slots.fill_(-2)
            run(*self._stage_args(*(x[:t] for x in probe), t))
            ok = (torch.equal(self.ids[:t], probe[0][:t])
                  and torch.equal(self.pos[:t], probe[1][:t])
                  and torch.equal(self.hidden[:t], probe[2][:t])
                  and torch.equal(self.slots[:t], probe[3][:t])
                  and bool((self.slots[t:] == -1).all()))
        except Exception:  # noqa: BLE001 - whatever the internal raises: the usual launch
            ok = False
        for buf in (self.ids, self.pos, self.hidden):
            buf.zero_()
        self.slots.fill_(-1)
        return run if ok else None

    def stage(self, ids, pos, hidden, slots) -> None:
        """Copy T <= size rows of inputs in; padding rows get slot -1. One kernel where the
        inputs are contiguous, on this device and of the buffers' dtypes (a step's copies
        precede every replay: one launch instead of four copies and a fill), else copies."""
        t = pos.shape[0]
        src, dst = (ids, pos, hidden, slots), (self.ids, self.pos, self.hidden, self.slots)
        if all(s.device == self.device and s.dtype == d.dtype and s.is_contiguous()
               for s, d in zip(src, dst)):
            args = self._stage_args(ids, pos, hidden, slots, t)
            if self._stage_run is not None:
                self._stage_run(*args)
            else:
                self._stage_launch(args)
            return
        for s, d in zip(src, dst):
            d[:t].copy_(s)
        if t < self.size:
            self.slots[t:].fill_(-1)


class DraftStepGraphs:
    """Captured decode steps of a :class:`~mtp.DeepSeekV4MTP` over one :class:`~mtp.KVCache`.

    Args:
        model: the module; its backend must resolve to :class:`TritonOps` (``"auto"`` on CUDA
            in the released format, or ``"triton"``). The deprecated ``TritonMTP`` view is
            accepted too (its ops are captured).
        kv_cache: the cache the steps read and write (its tensors must stay the same objects).
        buckets: batch sizes to capture; a call with T rows replays the smallest bucket >= T.
        spec_step_idx: which MTP layer (``spec_step_idx % n_mtp``) the graphs use.
        overlap: run the shared expert on a second stream beside the routed experts (a fork
            and join inside the graph; same result).
        pdl_rows: buckets of at most this many rows are captured with programmatic dependent
            launch where the GPU has it (sm_90+; same result); default ``PDL_ROWS``, 0 for
            none.

    Capturing runs each bucket twice eagerly first: with padding rows only (slot -1), so the
    cache is not touched.
    """

    def __init__(self, model: DeepSeekV4MTP | TritonMTP, kv_cache: KVCache,
                 buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256),
                 spec_step_idx: int = 0, overlap: bool = True, pdl_rows: int = PDL_ROWS):
        if isinstance(model, TritonMTP):
            model, ops = model.model, model.ops
        elif isinstance(model, DeepSeekV4MTP):
            ops = model.ops
        else:
            raise TypeError(f"DraftStepGraphs captures a DeepSeekV4MTP, got "
                            f"{type(model).__name__}")
        if not isinstance(ops, TritonOps):
            raise ValueError(f"DraftStepGraphs: the model's backend runs {ops.name!r} ops; CUDA "
                             "graphs capture the triton backend (backend='triton' or 'auto' on "
                             "CUDA in the released format)")
        if kv_cache.kv.shape[1] < 1:
            raise ValueError("kv_cache has no sequence slots")
        if model.tp.sharded:  # the collectives are captured too: NCCL can be, gloo cannot
            import torch.distributed as dist

            if dist.get_backend(model.tp.group) != "nccl":
                raise ValueError(f"DraftStepGraphs: a tensor-parallel model's collectives are "
                                 f"captured in the graphs, which needs an NCCL process group; "
                                 f"this one is {dist.get_backend(model.tp.group)!r} (run it "
                                 f"eagerly, without graphs)")
        self.model, self.ops = model, ops
        self.cache = kv_cache
        self.spec_step_idx = spec_step_idx
        pool = torch.cuda.graph_pool_handle()
        # the shared expert's branch in the graph, beside the routed experts
        side = torch.cuda.Stream(device=ops.device) if overlap else None
        self.buckets = {b: _Bucket(model, ops, kv_cache, b, spec_step_idx, pool, side,
                                   b <= pdl_rows)
                        for b in sorted(set(buckets))}

    def _bucket(self, t: int) -> _Bucket:
        for size, b in self.buckets.items():
            if size >= t:
                return b
        raise ValueError(f"{t} rows: more than the largest captured bucket "
                         f"({max(self.buckets)}); capture a larger one")

    def check(self, input_ids, positions, hidden_states, seq_slots) -> None:
        """Validate a step's inputs (one host synchronisation); :meth:`step` assumes them."""
        cfg = self.model.config
        t = positions.shape[0]
        if input_ids.shape != (t,) or seq_slots.shape != (t,) or \
                tuple(hidden_states.shape) != (t, cfg.hc_dim):
            raise ValueError(f"expected input_ids [{t}], seq_slots [{t}], hidden_states "
                             f"[{t}, {cfg.hc_dim}]; got {list(input_ids.shape)}, "
                             f"{list(seq_slots.shape)}, {list(hidden_states.shape)}")
        bad = torch.stack([(input_ids < 0).any() | (input_ids >= cfg.vocab_size).any(),
                           (positions < 0).any(),
                           (seq_slots < 0).any() | (seq_slots >= self.cache.max_seqs).any(),
                           torch.unique(seq_slots).numel() != seq_slots.new_tensor(t)]).tolist()
        for flag, msg in zip(bad, ("input_ids: a token id is outside the vocabulary",
                                   "positions: must be >= 0",
                                   f"seq_slots: slots must be in [0, {self.cache.max_seqs})",
                                   "seq_slots: one row per sequence (distinct slots) in a "
                                   "decode step; use the model's forward for several rows")):
            if flag:
                raise ValueError(msg)

    def step(self, input_ids: torch.Tensor, positions: torch.Tensor,
             hidden_states: torch.Tensor, seq_slots: torch.Tensor, *, check: bool = True):
        """One draft step for T <= max bucket sequences -> (hidden [T, M*D], logits [T, V]
        or, tensor-parallel, the rank's [T, V/w]), views of the bucket's static outputs (valid
        until the next replay of that bucket). Tensor-parallel: every rank replays its graph
        with the same inputs (the captured collectives pair up across the ranks)."""
        if check:
            self.check(input_ids, positions, hidden_states, seq_slots)
        t = positions.shape[0]
        b = self._bucket(t)
        b.stage(input_ids, positions, hidden_states, seq_slots)
        b.graph.replay()
        return b.out_hidden[:t], b.out_logits[:t]

    def propose(self, input_ids, positions, hidden_states, seq_slots, k: int, *,
                check: bool = True) -> torch.Tensor:
        """k greedy draft tokens per sequence -> [T, k] int64 (no host synchronisation;
        tensor-parallel: the logits are the rank's vocabulary slice, one [T, 2] all-gather
        per step picks the token)."""
        tokens = []
        ids, pos, hid = input_ids, positions, hidden_states
        for s in range(k):
            hid, logits = self.step(ids, pos, hid, seq_slots, check=check and s == 0)
            ids = self.model.tp.argmax(logits)
            tokens.append(ids)
            pos = pos + 1
        return torch.stack(tokens, dim=1)
