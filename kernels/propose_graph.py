"""A whole ``Drafter.propose`` call as one CUDA graph replay, captured lazily per bucket.

:class:`ProposeGraphs` captures one :class:`mtp.propose_program.ProposeProgram` per bucket of
(sequences, rows per sequence, k, greedy or sampled) the first time a call needs it: the real
rows' step, the k - 1 draft steps, the argmaxes or draws, the rollback of draft entries and
the device-side input checks, all in one replay. Padding (sequences past the call's, rows
before a sequence's first) has cache slot -1 and writes nothing.

Example:
    >>> graphs = ProposeGraphs(model, cache, (1, 2, 4), (1, 2, 4), max_abs_hidden=1e6)
    >>> captured = graphs.get(seqs=3, rows=2, k=3)   # bucket (4, 2, 3), captured on first use
"""

from __future__ import annotations

import torch

from mtp.cache import KVCache
from mtp.model import DeepSeekV4MTP
from mtp.propose_program import ProposeBuckets, ProposeProgram, StaticProposal

from . import _common
from .backend import TritonOps
from .graph import PDL_ROWS, capture

# Which rows decide a bucket's programmatic dependent launch: the sequences S (True: the rows
# past a catch-up's keys-only prefix; every draft step and the last rows' layer run on S rows)
# or all of them, S * R (False). Kept for Flash's catch-ups, 1.5-2.3% less GPU time
# (ab_drafter.py's "pdl-seqs" / "pdl-rows"; kernels/NOTES.md, "The greedy pick")
PDL_BY_SEQS = True


class CapturedProposal(StaticProposal):
    """One bucket's program and its graph; ``error``: the device's error word (rewritten by
    every replay). The graph ends with the outputs' copy into the staged call's buffer and
    the error word's to the host (one kernel where the host's word is mapped) and the record of
    ``done`` (an external event, so that a replay records it: the host launches one graph per
    call and nothing else)."""

    def __init__(self, program: ProposeProgram, pool, pdl: bool):
        self.program = program
        self.pdl = pdl and bool(_common.PDL_ARCH)
        dev = program.cache.kv.device
        program.clear()  # capture and warm-up on padding only: the cache is not touched
        self.done, self._record_after = external_event()
        self.graph, out = capture(
            lambda: program.run_call(None if self._record_after else self.done), dev, pool,
            self.pdl)
        self.error = out[-1]

    def replay(self) -> None:
        self.graph.replay()
        if self._record_after:
            self.done.record()


def external_event() -> tuple[torch.cuda.Event, bool]:
    """An event a graph capture records as a node -> (event, False); where this torch cannot
    make one, a plain event and True (the caller records it after each replay)."""
    try:
        return torch.cuda.Event(external=True), False
    except TypeError:
        return torch.cuda.Event(), True


class ProposeGraphs(ProposeBuckets):
    """:class:`~mtp.propose_program.ProposeBuckets` whose programs are CUDA graphs, captured on
    first use, over one :class:`~mtp.KVCache` (its tensors must stay the same objects).

    Args (beyond the base class's): ``overlap``: the shared expert on a second stream (as
    :class:`DraftStepGraphs`); ``pdl_rows``: buckets of at most this many rows (S * R) use
    programmatic dependent launch where the GPU has it.
    """

    def __init__(self, model: DeepSeekV4MTP, kv_cache: KVCache, seq_buckets: tuple[int, ...],
                 row_buckets: tuple[int, ...], max_abs_hidden: float, overlap: bool = True,
                 pdl_rows: int = PDL_ROWS, max_rows: int | None = None):
        if not isinstance(model, DeepSeekV4MTP) or not isinstance(model.ops, TritonOps):
            raise ValueError("ProposeGraphs: the module's backend must run the triton ops "
                             "(backend='triton' or 'auto' on CUDA in the released format)")
        if model.tp.sharded:
            raise ValueError("ProposeGraphs: an unsplit module only (the drafts are picked "
                             "from the whole vocabulary's logits)")
        side = torch.cuda.Stream(device=kv_cache.kv.device) if overlap else None
        super().__init__(model, kv_cache, seq_buckets, row_buckets, max_abs_hidden, side,
                         max_rows)
        self.pdl_rows = pdl_rows
        self.pool = torch.cuda.graph_pool_handle()

    def _make(self, program: ProposeProgram) -> CapturedProposal:
        rows = program.seqs if PDL_BY_SEQS else program.seqs * program.rows
        return CapturedProposal(program, self.pool, rows <= self.pdl_rows)


__all__ = ["CapturedProposal", "ProposeGraphs", "external_event"]
