"""CUDA-graph capture of the decode draft step, one graph per batch bucket.

A draft step at small batch is a few dozen short kernels; launched one by one from Python the
gaps between them cost as much as the work. :class:`DraftStepGraphs` captures
``TritonMTP.decode_step`` (forward + logits, one row per sequence) for each bucket size and
replays it: inputs are copied into the bucket's static buffers (padding rows get slot -1: they
read and write no cache entry), outputs are views of its static outputs.

Example:
    >>> graphs = DraftStepGraphs(TritonMTP(model), cache, buckets=(1, 4, 16, 64))
    >>> hidden, logits = graphs.step(ids, positions, hidden, slots)   # T <= 64 rows
    >>> tokens = graphs.propose(ids, positions, hidden, slots, k=3)   # [T, 3] greedy drafts
"""

from __future__ import annotations

import torch

from mtp.cache import KVCache

from .model import TritonMTP


class _Bucket:
    def __init__(self, fast: TritonMTP, cache: KVCache, size: int, spec_step_idx: int,
                 pool, side: torch.cuda.Stream | None):
        cfg, dev = fast.config, fast.device
        self.size = size
        self.ids = torch.zeros(size, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(size, dtype=torch.int64, device=dev)
        self.slots = torch.full((size,), -1, dtype=torch.int64, device=dev)
        self.hidden = torch.zeros(size, cfg.hc_dim, dtype=fast.dtype, device=dev)

        def run():
            return fast.decode_step(self.ids, self.pos, self.hidden, self.slots, cache,
                                    spec_step_idx, side_stream=side)

        stream = torch.cuda.Stream(device=dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):  # warm-up: compiles kernels, fills lazy caches
            for _ in range(2):
                run()
        torch.cuda.current_stream(dev).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out_hidden, self.out_logits = run()


class DraftStepGraphs:
    """Captured decode steps of a :class:`TritonMTP` over one :class:`~mtp.KVCache`.

    Args:
        fast: the fast path.
        kv_cache: the cache the steps read and write (its tensors must stay the same objects).
        buckets: batch sizes to capture; a call with T rows replays the smallest bucket >= T.
        spec_step_idx: which MTP layer (``spec_step_idx % n_mtp``) the graphs use.
        overlap: run the shared expert on a second stream beside the routed experts (a fork
            and join inside the graph; same result).

    Capturing runs each bucket twice eagerly first: with padding rows only (slot -1), so the
    cache is not touched.
    """

    def __init__(self, fast: TritonMTP, kv_cache: KVCache,
                 buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256),
                 spec_step_idx: int = 0, overlap: bool = True):
        if kv_cache.kv.shape[1] < 1:
            raise ValueError("kv_cache has no sequence slots")
        self.fast = fast
        self.cache = kv_cache
        self.spec_step_idx = spec_step_idx
        pool = torch.cuda.graph_pool_handle()
        # the shared expert's branch in the graph, beside the routed experts
        side = torch.cuda.Stream(device=fast.device) if overlap else None
        self.buckets = {b: _Bucket(fast, kv_cache, b, spec_step_idx, pool, side)
                        for b in sorted(set(buckets))}

    def _bucket(self, t: int) -> _Bucket:
        for size, b in self.buckets.items():
            if size >= t:
                return b
        raise ValueError(f"{t} rows: more than the largest captured bucket "
                         f"({max(self.buckets)}); capture a larger one")

    def check(self, input_ids, positions, hidden_states, seq_slots) -> None:
        """Validate a step's inputs (one host synchronisation); :meth:`step` assumes them."""
        cfg = self.fast.config
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
                                   "decode step; use TritonMTP.forward for several rows")):
            if flag:
                raise ValueError(msg)

    def step(self, input_ids: torch.Tensor, positions: torch.Tensor,
             hidden_states: torch.Tensor, seq_slots: torch.Tensor, *, check: bool = True):
        """One draft step for T <= max bucket sequences -> (hidden [T, M*D], logits [T, V]),
        views of the bucket's static outputs (valid until the next replay of that bucket)."""
        if check:
            self.check(input_ids, positions, hidden_states, seq_slots)
        t = positions.shape[0]
        b = self._bucket(t)
        b.ids[:t].copy_(input_ids)
        b.pos[:t].copy_(positions)
        b.hidden[:t].copy_(hidden_states)
        b.slots[:t].copy_(seq_slots)
        if t < b.size:
            b.slots[t:].fill_(-1)
        b.graph.replay()
        return b.out_hidden[:t], b.out_logits[:t]

    def propose(self, input_ids, positions, hidden_states, seq_slots, k: int, *,
                check: bool = True) -> torch.Tensor:
        """k greedy draft tokens per sequence -> [T, k] int64 (no host synchronisation)."""
        tokens = []
        ids, pos, hid = input_ids, positions, hidden_states
        for s in range(k):
            hid, logits = self.step(ids, pos, hid, seq_slots, check=check and s == 0)
            ids = logits.argmax(dim=-1)
            tokens.append(ids)
            pos = pos + 1
        return torch.stack(tokens, dim=1)
