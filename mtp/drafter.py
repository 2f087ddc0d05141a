"""Drafter: the MTP layer in a speculative-decoding loop, with a per-sequence draft KV cache.

For a sequence with n tokens so far (positions are the target's), after the target produced
its pre-``hc_head`` residuals h_j (j < n) and sampled t_n:

1. catch-up: the drafter consumes the rows (h_j, t_{j+1}, position j) it has not seen yet;
2. propose: the last row's output gives draft d_1; draft step s (1 <= s < k) feeds the previous
   step's own output residual and d_s at position n - 1 + s (layer ``s % n_mtp``) and gives
   d_{s+1};
3. the target verifies t_n, d_1 .. d_k (``mtp.verify``), accepts a drafts, samples one more;
4. the next call re-feeds the verified rows j = n .. n + a with the target's real residuals,
   first discarding every cache entry at position >= n (all of them draft-derived).

Per sequence the drafter tracks its *next real position* (n after step 1): the rows of a call
must start exactly there. Only the last W positions are ever attended (sliding window), so a
call feeds at most the last W rows of each sequence to the layer; the result equals feeding all
of them. The cache keeps W + ``max_draft_tokens`` entries per sequence and layer (spec,
"Multi-step drafting": a ring of exactly W cannot be rolled back).

Every argument is checked before any state changes: a call that raises on bad input leaves
every sequence's cache and position exactly as they were.

Shape legend: S sequences in a call, T rows (all sequences' rows, flattened in ``seq_ids``
order, as engines lay them out), k drafts, V vocabulary, M*D = hc_mult * hidden_size.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import threading
import warnings
from collections.abc import Hashable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from . import model as model_mod
from . import propose_program as prog_mod
from .cache import KVCache
from .call_checks import (
    INTS,
    MAX_ABS_HIDDEN,
    MAX_POSITION,
    check_hidden_values,
    check_seq_id,
    check_tensor,
    check_values,
    flat_hidden,
    hidden_ok,
    next_token_ids_arg,
    row_counts,
    short,
)
from .config import MTPConfig
from .model import DeepSeekV4MTP
from .propose_program import (
    ERR_HIDDEN,
    ERR_IDS,
    ERR_LOGITS,
    ERR_POSITIONS,
    ERR_SAMPLING,
    INPUT_ERRORS,
)
from .sampling import GREEDY, Sampling, nan_flag


def _locked(method):
    """Run a state-changing method under the drafter's lock (one call at a time)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper


_set_grad_enabled = torch._C._set_grad_enabled  # (what torch.set_grad_enabled calls, without
# making its context object)


def _locked_no_grad(method):
    """:func:`_locked` under ``torch.no_grad()``, switched directly (the decorator's context
    object costs ~2 us more per call); nothing switched when grad is off already."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            if not torch.is_grad_enabled():
                return method(self, *args, **kwargs)
            _set_grad_enabled(False)
            try:
                return method(self, *args, **kwargs)
            finally:
                _set_grad_enabled(True)
    return wrapper


@dataclass
class Proposal:
    """What :meth:`Drafter.propose` returns.

    ``drafts`` [S, k] int64: the draft tokens, d_1 .. d_k (d_1 goes at position n + 1).
    ``probs`` [S, k, V]: the distributions q the drafts were drawn from (for
    ``mtp.verify.rejection_sample``); None when ``sampling.greedy`` (temperature the number
    0; a temperature tensor's rows at 0 have a one-hot q).
    ``hidden`` [S, k, M*D]: the MTP residual each draft came from (``hidden[:, 0]``: the last
    real row's output; ``hidden[:, s]``: draft step s's).

    All three stay on the drafter's device. On CUDA some argument checks finish on the GPU
    after the call returns (docs/drafter.md, "When each check fires"): :meth:`check` waits
    for this proposal's and raises if its call was refused (the drafter's next call would).
    """

    drafts: torch.Tensor
    probs: torch.Tensor | None
    hidden: torch.Tensor
    _deferred: Any = field(default=None, repr=False, compare=False)

    def check(self) -> Proposal:
        """Raise the error of this proposal's call if its device-side checks failed (then its
        drafts are void and the drafter is as before the call); returns self. Waits for the
        call's GPU work only; a no-op on CPU and once checked."""
        if self._deferred is not None:
            self._deferred.drafter._settle_if(self._deferred)
        return self


class _PackedProposal(Proposal):
    """A whole-call graph's proposal: one device buffer holding drafts, hidden and probs (the
    graph's last step copies its outputs into it), each of the three cut from it (a view) when
    first read: the call itself pays one allocation, and a caller reading the drafts alone
    makes their view alone."""

    def __init__(self, packed: torch.Tensor, program: Any, s: int, deferred: _Deferred):
        self._packed, self._program, self._s, self._deferred = packed, program, s, deferred

    def _part(name: str, i: int):  # noqa: N805 - (a property maker, run in the class body)
        """The property ``name``: part ``i`` of ``ProposeProgram.unpack``'s three, made on
        first read and kept (settable, as a :class:`Proposal`'s fields are). A property, not
        ``__getattr__``: that runs only after a failed lookup has raised (~0.4 us more)."""
        def get(self):
            value = self.__dict__.get(name, _NONE)
            if value is _NONE:
                value = self.__dict__[name] = self._program.unpack_part(self._packed, self._s,
                                                                        i)
            return value

        def set_(self, value):
            self.__dict__[name] = value
        return property(get, set_)

    drafts = _part("drafts", 0)
    hidden = _part("hidden", 1)
    probs = _part("probs", 2)
    del _part


@dataclass(slots=True)  # (read and set by every call: slots are faster)
class _Seq:
    slot: int
    next_position: int


@dataclass(slots=True)
class _Plan:
    """A validated call: per sequence its slot, first position and row count; which rows the
    layer sees (the last W of each sequence)."""

    seq_ids: list[Hashable]
    slots: list[int]
    starts: list[int]
    counts: list[int]
    kept_counts: list[int]
    keep: torch.Tensor | None  # [T'] row indices kept, None when every row is
    hidden: torch.Tensor  # [T, M*D] (a [T, M, D] argument flattened)
    next_ids: torch.Tensor  # [T]: next_token_ids or input_ids, whichever was given
    positions: torch.Tensor  # [T] int64 or int32 as given
    ids_name: str  # the name next_ids was given under
    seqs: list[_Seq]  # each sequence's record
    rows: int  # the most rows a sequence brings to the layer: max(kept_counts)


@dataclass(slots=True)
class _Deferred:
    """A call whose device-side checks are still running: its error word (pinned host memory,
    copied when ``event`` completes), and what restoring the drafter needs."""

    drafter: Drafter
    error: torch.Tensor  # int32: [] the program's (reused by its next call), [1] eager
    event: Any
    plan: _Plan
    program: Any  # the ProposeProgram whose buffers hold the call's inputs; None: eager
    call: str = "propose"  # the method the call was
    sampling: Sampling = GREEDY  # its settings (an ERR_SAMPLING error names their value)


class Drafter:
    """Drafts tokens for many sequences at once with a DeepSeek-V4 MTP layer.

    Args:
        model: the :class:`~mtp.model.DeepSeekV4MTP` (weights loaded).
        max_seqs: sequences held at once (cache slots).
        max_draft_tokens: the largest k a :meth:`propose` may ask for; sizes the cache
            (W + max_draft_tokens entries per sequence).
        accelerator: an object with ``forward`` and ``compute_logits`` of exactly the module's
            signatures (e.g. a GPU kernel path); every forward and logits call goes through it.
            Default: the module itself.
        cuda_graphs: run a :meth:`propose` as one CUDA-graph replay (captured the first time a
            bucket of sequences x new rows x k x greedy/sampled is needed): None (default)
            where it can run (CUDA, the module's triton backend, one process, no accelerator
            set; elsewhere, the CPU included, the eager path), True where it can or raise
            ``ValueError`` saying why not, False never (the eager path).

    Example:
        >>> import torch
        >>> from mtp import DeepSeekV4MTP, MTPConfig
        >>> from mtp.drafter import Drafter
        >>> from mtp.testing import init_random_
        >>> cfg = MTPConfig.from_name("tiny")
        >>> drafter = Drafter(init_random_(DeepSeekV4MTP(cfg)), max_seqs=2)
        >>> drafter.add_sequence("a")
        >>> h = torch.randn(5, cfg.hc_dim)           # target residuals at positions 0..4
        >>> next_tokens = torch.tensor([11, 12, 13, 14, 15])  # tokens at positions 1..5
        >>> p = drafter.propose(["a"], h, positions=torch.arange(5), num_rows_per_seq=[5],
        ...                     next_token_ids=next_tokens, k=3)
        >>> p.drafts.shape, drafter.next_position("a")
        (torch.Size([1, 3]), 5)
    """

    def __init__(self, model: DeepSeekV4MTP, *, max_seqs: int = 64, max_draft_tokens: int = 4,
                 accelerator: Any = None, cuda_graphs: bool | None = None):
        if not isinstance(model, DeepSeekV4MTP):
            raise TypeError(f"model: expected a mtp.DeepSeekV4MTP, got {type(model).__name__}")
        for name, value in (("max_seqs", max_seqs), ("max_draft_tokens", max_draft_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if cuda_graphs not in (None, True, False):
            raise ValueError(f"cuda_graphs: expected None (where they can run), True or False, "
                             f"got {cuda_graphs!r}")
        device = model.model.embed_tokens.weight.device
        if device.type == "meta":
            raise ValueError("model: its parameters are on the meta device; load weights first")
        # Serialises every state-changing call (sequences, feed, propose, accelerator): a
        # Drafter may be shared by threads, which then take turns. Reentrant: propose's
        # failure path calls remove_sequence.
        self._lock = threading.RLock()
        self.model = model
        self._graphs = None
        self._cuda_graphs = cuda_graphs
        self._proposer: Any = None  # ProposeGraphs, _NONE (cannot run), None (not decided)
        self._pending: _Deferred | None = None
        # Where the eager path's value checks run: on CUDA on the device, read at the next
        # synchronisation like the whole-call graphs' (a host read would wait for the GPU);
        # elsewhere on the host, at the call. (Tests set it on the CPU to run the CUDA way.)
        self._defer_checks = device.type == "cuda"
        self.accelerator = accelerator
        self.max_draft_tokens = max_draft_tokens
        cfg = model.config
        self.cache = KVCache(cfg.num_nextn_predict_layers, max_seqs,
                             cfg.sliding_window + max_draft_tokens, cfg.head_dim,
                             dtype=model.dtype, device=device)
        self._device = self.cache.kv.device  # (the cache's tensors never move)
        self.load_report = None  # set by from_pretrained: what the loader read
        self._seqs: dict[Hashable, _Seq] = {}
        # the last call's seq_ids -> their records and slots (valid until a sequence is added
        # or removed): an engine's batch often stays the same from call to call
        self._last_lookup: dict[tuple, tuple[list[_Seq], list[int]]] = {}
        # the last checked row counts (a list of ints >= 1, never changed: plans share it),
        # their sum and their largest: an engine sends the same counts call after call
        self._last_counts: tuple[list[int], int, int] = ([], 0, 0)
        # the last sampled call's settings when all scalars, as (Sampling, temperature, top_p,
        # generator, its program's mode): checked then, and nothing of them depends on the rows
        self._last_sampling: tuple = (None,) * 5
        self._free = list(range(max_seqs - 1, -1, -1))  # pop() hands out slot 0 first
        if cuda_graphs:
            self._whole_call_graphs()  # raises why they cannot run

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str, *, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.bfloat16, max_seqs: int = 64,
                        max_draft_tokens: int = 4, embed_tokens: torch.Tensor | None = None,
                        head: torch.Tensor | None = None, numerics=None, backend: Any = "auto",
                        cuda_graphs: bool | None = None, **load_kwargs) -> Drafter:
        """Load a checkpoint folder or Hugging Face repo id (``mtp.loader.load_model``) and wrap
        it. ``embed_tokens`` / ``head``: the target's [V, D] tensors, shared instead of loaded.
        On CUDA in the released format the module runs the Triton kernels (``backend="auto"``)
        and each :meth:`propose` replays a whole-call CUDA graph (``cuda_graphs=None``, see
        :class:`Drafter`), with nothing more to call; ``backend="reference"`` picks the
        pure-PyTorch ops, ``cuda_graphs=False`` the eager path.
        ``load_kwargs`` go to the loader (revision, cache_dir, token, ``process_group`` for
        tensor/expert parallelism: every rank of the group makes the same calls and gets the
        same drafts, see docs/parallel.md).
        The loader's report is kept as ``.load_report``.

        Example:
            >>> drafter = Drafter.from_pretrained("deepseek-ai/DeepSeek-V4-Flash",
            ...                                   device="cuda")  # doctest: +SKIP
        """
        from .loader import load_model

        model, report = load_model(path_or_repo_id, device=device, dtype=dtype,
                                   embed_tokens=embed_tokens, head=head, numerics=numerics,
                                   **load_kwargs)
        model.backend = backend
        drafter = cls(model, max_seqs=max_seqs, max_draft_tokens=max_draft_tokens,
                      cuda_graphs=cuda_graphs)
        drafter.load_report = report
        return drafter

    # ---- properties ------------------------------------------------------------------------
    @property
    def accelerator(self) -> Any:
        """What runs every forward and logits call (the module itself by default, which runs
        its own backend: the kernels on CUDA in the released format). Settable; None restores
        the module."""
        return self._accelerator

    @accelerator.setter
    @_locked
    def accelerator(self, value: Any) -> None:
        if value is not None:
            for method in ("forward", "compute_logits"):
                if not callable(getattr(value, method, None)):
                    raise TypeError(f"accelerator: has no callable {method}(...) (it needs "
                                    "forward and compute_logits with the module's signatures)")
        if value is not None and value is not self.model:
            warnings.warn("Drafter.accelerator is deprecated and will be removed in the next "
                          "release: pick the module's ops with backend= (DeepSeekV4MTP(..., "
                          "backend=), Drafter.from_pretrained(..., backend=))",
                          DeprecationWarning, stacklevel=2)
        self._settle()
        self._accelerator = self.model if value is None else value
        self._graphs = None  # captured for the previous accelerator
        self._proposer = None

    @property
    def config(self) -> MTPConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def max_seqs(self) -> int:
        return self.cache.max_seqs

    @property
    def seq_ids(self) -> list[Hashable]:
        """The sequences held, in the order they were added."""
        return list(self._seqs)

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._seqs

    def __repr__(self) -> str:
        cfg = self.config
        return (f"Drafter(hidden_size={cfg.hidden_size}, window={cfg.sliding_window}, "
                f"sequences={len(self._seqs)}/{self.max_seqs}, "
                f"max_draft_tokens={self.max_draft_tokens}, device={self.device}, "
                f"dtype={self.model.dtype})")

    def next_position(self, seq_id: Hashable) -> int:
        """The position of the next row the drafter expects for ``seq_id`` with a real
        (target) residual: the first row of the next call must be there."""
        return self._get(seq_id).next_position

    def slot(self, seq_id: Hashable) -> int:
        """The cache slot of ``seq_id`` (``cache.kv[:, slot]``)."""
        return self._get(seq_id).slot

    @_locked
    def use_cuda_graphs(self, buckets: Sequence[int] = (1, 2, 4, 8, 16, 32, 64)) -> None:
        """Run the draft steps s >= 1 of the calls that do not replay a whole-call graph as
        CUDA-graph replays (``mtp_kernels.DraftStepGraphs``): with ``cuda_graphs=False`` every
        call; with the whole-call graphs (the default on CUDA) the calls their buckets do not
        cover (catch-up-sized calls) and a tensor-parallel module's.

        CUDA only, needs the ``mtp_kernels`` package (the repo's ``kernels/``, with
        Triton) and the model's triton backend (``backend="auto"``, the default, on CUDA in the
        released format). Captures the model's own ``decode_step`` now, one graph per bucket and
        MTP layer (``spec_step_idx`` = 0 .. n_mtp - 1): a
        proposal for S sequences replays the smallest bucket >= S; more sequences than the
        largest bucket run eagerly. Catch-up rows and draft step 0 stay eager (their row counts
        vary). Same drafts as without graphs; setting ``accelerator`` again drops the graphs.

        Example:
            >>> drafter = Drafter(model.cuda(), max_seqs=64)          # doctest: +SKIP
            >>> drafter.use_cuda_graphs(buckets=(1, 2, 4, 8, 16, 32, 64))  # doctest: +SKIP
        """
        self._settle()
        sizes = list(buckets) if isinstance(buckets, Sequence) else None
        if not sizes or any(not isinstance(b, int) or isinstance(b, bool) or b < 1
                            for b in sizes):
            raise ValueError(f"buckets: expected a non-empty list of positive ints, got "
                             f"{buckets!r}")
        if self.device.type != "cuda":
            raise RuntimeError(f"use_cuda_graphs: the drafter is on {self.device}; CUDA graphs "
                               "need a CUDA device (build the model there)")
        try:
            from mtp_kernels import DraftStepGraphs, TritonMTP
        except ImportError as exc:
            raise RuntimeError(f"use_cuda_graphs: the mtp_kernels package cannot be imported "
                               f"({exc}); it is the repo's kernels/ folder and needs Triton "
                               "(part of CUDA builds of torch)") from exc
        fast = self._accelerator
        if fast is not self.model and not (isinstance(fast, TritonMTP)
                                           and fast.model is self.model):
            raise ValueError("use_cuda_graphs: the graphs capture the model's own backend; the "
                             "accelerator must be unset (or a TritonMTP of this drafter's "
                             f"model); it is {type(fast).__name__}")
        n_mtp = self.config.num_nextn_predict_layers
        graphs = [DraftStepGraphs(fast, self.cache, tuple(sizes), spec_step_idx=i)
                  for i in range(n_mtp)]  # captured first: a failure changes nothing
        self._graphs = graphs

    # ---- sequences -------------------------------------------------------------------------
    @_locked
    def add_sequence(self, seq_id: Hashable, position: int = 0) -> None:
        """Start tracking a sequence whose first row will be at ``position``.

        Start later than 0 when only the last rows' residuals are at hand: the drafts of a
        sequence depend only on the W rows before them.
        """
        self._settle()
        check_seq_id(seq_id)
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} is already in the drafter; remove_sequence "
                             "it first to start it again")
        limit = MAX_POSITION - self.max_draft_tokens
        if not isinstance(position, int) or isinstance(position, bool) \
                or not 0 <= position <= limit:
            raise ValueError(f"position: expected an int in [0, {limit}] (MAX_POSITION less "
                             f"max_draft_tokens), got {position!r}")
        if not self._free:
            raise ValueError(f"all {self.max_seqs} sequence slots are in use; remove a finished "
                             "sequence, or build the Drafter with a larger max_seqs")
        slot = self._free.pop()
        self.cache.clear(slot)
        self._seqs[seq_id] = _Seq(slot, position)
        self._last_lookup = {}

    @_locked
    def remove_sequence(self, seq_id: Hashable) -> None:
        """Stop tracking a sequence and free its cache slot."""
        if self._pending is not None and seq_id in self._pending.plan.seq_ids:
            self._settle()
        seq = self._get(seq_id)
        self.cache.clear(seq.slot)
        del self._seqs[seq_id]
        self._last_lookup = {}
        self._free.append(seq.slot)

    # ---- the two calls ---------------------------------------------------------------------
    @_locked_no_grad
    def feed(self, seq_ids: Sequence[Hashable], hidden_states: torch.Tensor,
             input_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None,
             num_rows_per_seq: Sequence[int] | torch.Tensor | None = None, *,
             next_token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Consume real rows without drafting (e.g. a prompt that will not draft this step).

        Arguments as in :meth:`propose`. Returns [S, M*D]: each sequence's last row's output.
        Where :meth:`propose` replays whole-call graphs, a call that fits a bucket replays the
        bucket's one-step program (its real-row step is this call's work; the one draft it
        picks is dropped), with the same device-side checks; otherwise the eager path.
        """
        if self._pending is not None:
            self._settle()
        plan = self._plan(seq_ids, hidden_states, input_ids, next_token_ids, positions,
                          num_rows_per_seq)
        graphs = self._whole_call_graphs()
        if graphs is not None:
            proposal = self._propose_graphed(plan, 1, graphs, "greedy", GREEDY, None, "feed")
            if proposal is not None:
                return proposal.hidden[:, 0]  # [S, 1, M*D] -> [S, M*D]
        return self._eager(plan, None, GREEDY)

    @_locked_no_grad
    def propose(self, seq_ids: Sequence[Hashable], hidden_states: torch.Tensor,
                input_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                num_rows_per_seq: Sequence[int] | torch.Tensor | None = None, *, k: int,
                sampling: Sampling = GREEDY,
                next_token_ids: torch.Tensor | None = None) -> Proposal:
        """Consume each sequence's new real rows, then draft k tokens for every sequence, all
        sequences batched in each forward.

        Args:
            seq_ids: the sequences of this call (S of them, each added before).
            hidden_states: [T, M*D] (or [T, M, D], transformers' layout) the target's
                pre-``hc_head`` residuals; row i is at ``positions[i]``. The rows of
                ``seq_ids[0]`` come first, then those of ``seq_ids[1]``, and so on.
            next_token_ids: [T] row i's *next* token: the token at ``positions[i] + 1`` (the
                target's ids shifted left by one). Give this or ``input_ids``, not both.
            input_ids: the same tensor under vLLM's name (kept for engines that call the
                layer the vLLM way); exactly one of the two.
            positions: [T] int64 or int32, each sequence's rows at consecutive positions,
                starting exactly at its :meth:`next_position`.
            num_rows_per_seq: S row counts (each >= 1), summing to T.
            k: drafts per sequence, 1 <= k <= ``max_draft_tokens``.
            sampling: greedy (default) or :class:`~mtp.sampling.Sampling` with temperature /
                top-p / generator; sampled drafts come with their q.

        Returns a :class:`Proposal`. Afterwards each sequence's next position is one past its
        last row: the next call re-feeds from there (the verified rows, with real residuals).

        On CUDA a call checks token ids, positions and hidden values, and its draft logits for
        NaN, on the GPU (whole-call graph or eager path alike): an error raises at the
        drafter's next call (or at ``Proposal.check()``, ``synchronize()``) and leaves the
        drafter as it was before this call (docs/drafter.md, "When each check fires").
        """
        if self._pending is not None:
            self._settle()
        if type(k) is not int or not 1 <= k <= self.max_draft_tokens:  # (fast path: an int)
            if not isinstance(k, int) or isinstance(k, bool) \
                    or not 1 <= k <= self.max_draft_tokens:
                raise ValueError(f"k: expected an int in [1, {self.max_draft_tokens}] "
                                 f"(max_draft_tokens sizes the cache), got {k!r}")
        if sampling is not GREEDY and not isinstance(sampling, Sampling):
            raise TypeError(f"sampling: expected a mtp.sampling.Sampling, got "
                            f"{type(sampling).__name__}")
        plan = self._plan(seq_ids, hidden_states, input_ids, next_token_ids, positions,
                          num_rows_per_seq)
        if sampling is GREEDY:  # (frozen, its scalars checked when made, no tensor)
            mode, bad = "greedy", None
        else:
            mode, bad = self._sampling_mode(sampling, len(plan.seq_ids))
        graphs = self._whole_call_graphs()
        if graphs is not None:
            proposal = self._propose_graphed(plan, k, graphs, mode, sampling, bad)
            if proposal is not None:
                return proposal
        return self._eager(plan, k, sampling, bad)

    @_locked
    def synchronize(self) -> None:
        """Wait for the last call's device-side checks and raise its error if one failed
        (docs/drafter.md, "When each check fires"). Every call of the drafter does this first;
        a no-op on CPU."""
        self._settle()

    # ---- internals -------------------------------------------------------------------------
    def _get(self, seq_id: Hashable) -> _Seq:
        check_seq_id(seq_id)
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise ValueError(f"unknown sequence {seq_id!r}: add it with add_sequence first "
                             f"(held: {short(self.seq_ids)})")
        return seq

    def _plan(self, seq_ids, hidden_states, input_ids, next_token_ids, positions,
              num_rows_per_seq) -> _Plan:
        """Check every argument against the drafter's state; change nothing.

        Runs on every call, so each check starts with a fast path for the common case (a list
        of ids, tensors of exactly the expected type, shape, dtype family and device) and
        falls back to the full check, which names what is wrong, on any difference."""
        if input_ids is None and next_token_ids is not None:
            ids_name, ids_arg = "next_token_ids", next_token_ids
        elif next_token_ids is None and input_ids is not None:
            ids_name, ids_arg = "input_ids", input_ids
        else:
            ids_name, ids_arg = next_token_ids_arg(input_ids, next_token_ids)
        if positions is None or num_rows_per_seq is None:
            for name, value in (("positions", positions),
                                ("num_rows_per_seq", num_rows_per_seq)):
                if value is None:
                    raise TypeError(f"{name}: required (see Drafter.propose)")
        if type(seq_ids) is not list and (isinstance(seq_ids, (str, bytes))
                                          or not isinstance(seq_ids, Sequence)):
            raise TypeError(f"seq_ids: expected a list of sequence ids, got "
                            f"{type(seq_ids).__name__}")
        ids = list(seq_ids)
        if not ids:
            raise ValueError("seq_ids: empty; pass at least one sequence")
        seqs, slots = self._lookup(ids)
        c, last = num_rows_per_seq, self._last_counts
        if type(c) is list and len(c) == len(ids) and c == last[0] \
                and set(map(type, c)) == INTS:  # (equal ints: [True] == [1] too)
            counts, t, most = last
        else:
            counts = row_counts(c, len(ids))
            self._last_counts = counts, t, most = counts, sum(counts), max(counts)
        starts = [s.next_position for s in seqs]
        # (max(starts) + most >= every start + count: the exact test only when it might fail)
        if max(starts) + most - 1 + self.max_draft_tokens > MAX_POSITION:
            for seq_id, end in zip(ids, map(operator.add, starts, counts)):
                if end - 1 + self.max_draft_tokens > MAX_POSITION:
                    raise ValueError(f"num_rows_per_seq: sequence {seq_id!r} would reach "
                                     f"position {end - 1 + self.max_draft_tokens} with its "
                                     f"drafts, beyond MAX_POSITION = {MAX_POSITION}")
        cfg, device = self.model.config, self._device
        hc_dim = cfg.hc_dim
        x = hidden_states
        if type(x) is torch.Tensor and x.dim() == 3:  # [T, M, D], transformers' layout
            x = hidden_states = flat_hidden(x, cfg)  # (a view)
        if not (type(x) is torch.Tensor and x.shape == (t, hc_dim) and x.layout is _STRIDED
                and x.is_floating_point() and x.device == device):
            hidden_states = flat_hidden(hidden_states, cfg)  # (a subclass's, flattened here)
            if isinstance(hidden_states, torch.Tensor) and hidden_states.dim() >= 1 \
                    and hidden_states.shape[0] != t and hidden_states.shape[1:] == (hc_dim,):
                raise ValueError(f"num_rows_per_seq: the counts {short(counts)} sum to {t}, "
                                 f"but hidden_states has {hidden_states.shape[0]} rows")
            check_tensor(hidden_states, "hidden_states", (t, hc_dim),
                         lambda: f"[T, hc_mult*hidden_size] = [{t}, {hc_dim}] (or [T, "
                         f"hc_mult, hidden_size] = [{t}, {cfg.hc_mult}, {cfg.hidden_size}])",
                         device, floating=True)
        x = ids_arg
        if not (type(x) is torch.Tensor and x.shape == (t,) and x.layout is _STRIDED
                and (x.dtype is _INT64 or x.dtype is _INT32) and x.device == device):
            check_tensor(ids_arg, ids_name, (t,),
                         lambda: f"[T] = [{t}] (the token after each row)", device,
                         floating=False)
        x = positions
        if not (type(x) is torch.Tensor and x.shape == (t,) and x.layout is _STRIDED
                and (x.dtype is _INT64 or x.dtype is _INT32) and x.device == device):
            check_tensor(positions, "positions", (t,), lambda: f"[T] = [{t}]", device,
                         floating=False)

        window = cfg.sliding_window
        kept, keep = counts, None
        if most > window:  # only the last W rows of a sequence can ever be attended
            kept = [min(n, window) for n in counts]
            offsets = torch.tensor([0] + counts[:-1]).cumsum(0).tolist()
            keep = _on_device(torch.cat([torch.arange(o + n - m, o + n)
                                         for o, n, m in zip(offsets, counts, kept)]), device)
            most = window
        return _Plan(ids, slots, starts, counts, kept, keep, hidden_states, ids_arg, positions,
                     ids_name, seqs, most)

    def _sampling_mode(self, sampling: Sampling, s: int) -> tuple[str, torch.Tensor | None]:
        """Check ``sampling`` for a call of ``s`` sequences -> (its :func:`_mode`, whether a
        tensor setting's value is out of range: bool [] on the device, for the call's error
        word, with ``_defer_checks``; else None, the values read and refused here). The very
        settings the last sampled call checked (the same scalars and generator in the same
        ``Sampling``): their mode again, unchecked (what check tests of them does not depend
        on the call). Tensor settings are checked every call (their values may change)."""
        last = self._last_sampling
        if sampling is last[0] and sampling.temperature is last[1] \
                and sampling.top_p is last[2] and sampling.generator is last[3]:
            return last[4], None
        bad = None
        if self._defer_checks:
            bad = sampling.check_on_device(s, self._device)
        else:
            sampling.check(s, self._device)
        mode = _mode(sampling)
        t, p = sampling.temperature, sampling.top_p
        if type(sampling) is Sampling and not isinstance(t, torch.Tensor) \
                and not isinstance(p, torch.Tensor):
            self._last_sampling = (sampling, t, p, sampling.generator, mode)
        return mode, bad

    def _lookup(self, ids: list) -> tuple[list[_Seq], list[int]]:
        """Each sequence's record and cache slot; refuses a duplicate, unhashable or unknown
        id. The same ids as the last call (no sequence added or removed since): its answer;
        else all known and distinct: two passes at C speed; else the checks that name the
        first bad id, in order."""
        try:
            key = tuple(ids)  # (a dict key: equal exactly where the ids' dict lookups agree)
            found = self._last_lookup.get(key)
            if found is not None:
                return found
            seqs = [self._seqs[s] for s in ids]
            if len(set(ids)) == len(ids):
                found = seqs, [s.slot for s in seqs]
                self._last_lookup = {key: found}
                return found
        except (KeyError, TypeError):
            pass
        seen: set = set()
        dup = next((s for s in ids if s in seen or seen.add(s)), _NONE)  # linear
        if dup is not _NONE:
            raise ValueError(f"seq_ids: sequence {dup!r} appears twice; give each sequence's "
                             "rows as one run")
        seqs = [self._get(s) for s in ids]
        return seqs, [s.slot for s in seqs]

    def _check_values(self, plan: _Plan) -> None:
        """The checks that read the tensors' values (each a host synchronisation on CUDA):
        finite bounded hidden states, token ids in the vocabulary, positions where expected."""
        check_values(plan.ids_name, plan.next_ids, plan.positions, plan.hidden, plan.seq_ids,
                     plan.starts, plan.counts, self.config.vocab_size)

    def _whole_call_graphs(self):
        """The :class:`mtp_kernels.ProposeGraphs` calls replay, or None where they
        cannot run (decided once per accelerator; with ``cuda_graphs=True`` a ValueError)."""
        if self._proposer is None:
            why = self._graphs_unavailable()
            if why is not None and self._cuda_graphs:
                raise ValueError(f"cuda_graphs=True: {why}; pass cuda_graphs=None (graphs "
                                 "where they can run) or False")
            if why is not None:
                self._proposer = _NONE
            else:
                from mtp_kernels import ProposeGraphs
                self._proposer = ProposeGraphs(self.model, self.cache, *self._buckets(),
                                               MAX_ABS_HIDDEN, max_rows=self._max_bucket_rows())
        return None if self._proposer is _NONE else self._proposer

    def _buckets(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Whole-call buckets: sequences (powers of two, and max_seqs), new rows per sequence:
        powers of two up to the window W, W itself, and the most a call between verifications
        brings (max_draft_tokens + 1). A catch-up of more than W rows takes the W bucket (its
        earlier rows are never attended: only checked)."""
        w = self.config.sliding_window
        top = self._rows_between_verifications()
        rows = sorted({1 << i for i in range(w.bit_length()) if 1 << i < w} | {top, w})
        seqs = sorted({b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < self.max_seqs}
                      | {self.max_seqs})
        return tuple(seqs), tuple(rows)

    def _max_bucket_rows(self) -> int:
        """The most rows (sequences x rows per sequence) a whole-call bucket may have: every
        call between verifications fits; a larger catch-up runs the eager path, chunked by
        the module's CHUNK_ROWS (the same bound on a call's temporaries)."""
        return max(model_mod.CHUNK_ROWS,
                   self._buckets()[0][-1] * self._rows_between_verifications())

    def _rows_between_verifications(self) -> int:
        """The most new rows per sequence a call between verifications brings: the accepted
        drafts and the bonus token (within the window)."""
        return min(self.max_draft_tokens + 1, self.config.sliding_window)

    def _graphs_unavailable(self) -> str | None:
        if self._cuda_graphs is False:
            return "turned off (cuda_graphs=False)"
        if self.device.type != "cuda":
            return f"the drafter is on {self.device}; CUDA graphs need a CUDA device"
        if self._accelerator is not self.model:
            return "an accelerator is set (graphs capture the module's own backend)"
        if self.model.tp.sharded:
            return "a tensor-parallel module drafts through the eager path with draft-step graphs"
        try:
            from mtp_kernels import TritonOps
        except ImportError as exc:
            return (f"the mtp_kernels package cannot be imported ({exc}); it is the repo's "
                    "kernels/ folder and needs Triton")
        if not isinstance(self.model.ops, TritonOps):
            return (f"the module runs the {self.model.ops.name!r} ops; the graphs capture the "
                    "triton backend (CUDA, the released format)")
        return None

    def _propose_graphed(self, plan: _Plan, k: int, graphs, mode: str, sampling: Sampling,
                         bad: torch.Tensor | None = None, call: str = "propose"
                         ) -> Proposal | None:
        """A call as one graph replay, its value checks on the device (read later by
        :meth:`_settle`). No host synchronisation. None (nothing done) if it fits no bucket or
        its bucket's capture failed (now or before): the caller runs the eager path. ``bad``:
        the sampling settings' range flag (``_sampling_mode``); ``call``: the method's name,
        for the error a failed check raises."""
        s, rows = len(plan.seq_ids), plan.rows
        try:  # first use of a bucket: captures it (nothing of the drafter changes)
            captured = graphs.get(s, rows, k, mode)
        except Exception as exc:  # noqa: BLE001 - whatever capture raises: that bucket eager
            if self._cuda_graphs:
                raise
            what = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"Drafter: capturing a CUDA graph of propose failed ({what}); calls "
                          f"of this size ({s} sequences, {rows} rows each, k={k}) "
                          "run the eager path from now on (Drafter(..., cuda_graphs=False) "
                          "chooses it for all without trying)", RuntimeWarning, stacklevel=3)
            return None
        if captured is None:  # no bucket holds it, or its capture failed before
            return None
        prog = captured.program
        # (self._pending is None: the previous graphed call was waited for, so its copies
        # from and to the program's host buffers are done and they can be rewritten)
        try:  # (as _dropping_on_failure, without a context manager's host time)
            # the proposal's own buffer, which the replay fills (the program's outputs are
            # rewritten by the next replay)
            packed = prog.new_out()
            prog.stage(plan.slots, plan.starts, plan.counts, plan.next_ids, plan.positions,
                       plan.hidden, packed)
            if mode != "greedy":
                prog.stage_sampling(sampling, s)
            if bad is not None:
                prog.refuse_if(bad, ERR_SAMPLING)
            captured.replay()  # (its error word reaches prog.error_host, then its event)
        except BaseException as exc:
            prog.after_failure()  # (its copies may be in flight: the buffers wait for them)
            self._failed(plan, exc)
        for seq, start, n in zip(plan.seqs, plan.starts, plan.counts):
            seq.next_position = start + n
        self._pending = _Deferred(self, prog.error_host, captured.done, plan, prog, call,
                                  sampling)
        return _PackedProposal(packed, prog, s, self._pending)

    def _settle(self, at_call: bool = False) -> None:
        """Read the last call's error word (waiting for that call only); on an error, put the
        drafter back as it was before that call and raise what the checks found. ``at_call``:
        the call itself is reading it (host checks), not a later one."""
        pend = self._pending
        if pend is None:
            return
        if pend.event is not None:
            # still pending if the wait is interrupted: its error word is read later, and its
            # bucket's host buffers are not rewritten while its copies may be in flight
            pend.event.synchronize()
        self._pending = None
        err = pend.error.item()  # (an int: what int() of the tensor gives, faster)
        if not err:
            return
        plan = pend.plan
        for seq_id, start in zip(plan.seq_ids, plan.starts):
            if seq_id in self._seqs:
                self._seqs[seq_id].next_position = start
        what = f"{pend.call}({short(plan.seq_ids)})"
        void = "drafts are" if pend.call == "propose" else "output is"
        after = (f" ({what} changed nothing: the drafter is as before it)" if at_call else
                 f" (found on the GPU after {what} returned; that call's {void} void and it "
                 "changed nothing: the drafter is as before it)")
        if not err & INPUT_ERRORS:  # NaN logits: its rows and drafts went into the cache
            if pend.program is not None:  # (the eager path has put its slots back already)
                for slot, start in zip(plan.slots, plan.starts):
                    self.cache.discard_from(slot, start)
            raise ValueError("logits: hold NaN (the model's output went non-finite from finite "
                             "inputs: check the weights)" + after)
        try:  # the host checks on the call's inputs (what the device read) name the row
            check_values(plan.ids_name, plan.next_ids, plan.positions, plan.hidden,
                         plan.seq_ids, plan.starts, plan.counts, self.config.vocab_size)
            if err & ERR_SAMPLING and (exc := pend.sampling.value_error()) is not None:
                raise exc
        except ValueError as exc:
            raise ValueError(f"{exc}{after}") from None
        names = [n for bit, n in ((ERR_IDS, plan.ids_name), (ERR_POSITIONS, "positions"),
                                  (ERR_HIDDEN, "hidden_states"), (ERR_SAMPLING, "sampling"),
                                  (ERR_LOGITS, "logits"))
                 if err & bit]
        raise ValueError(f"{', '.join(names)}: refused by the device-side checks{after}")

    def _settle_if(self, pend: _Deferred) -> None:
        with self._lock:
            if self._pending is pend:
                self._settle()

    def _eager(self, plan: _Plan, k: int | None, sampling: Sampling,
               bad: torch.Tensor | None = None):
        """A call through the module's forward (and k draft steps; None: ``feed``).

        Its value checks run on the host first, or with ``_defer_checks`` (CUDA) on the device:
        the forward then runs on harmless stand-ins for bad values (see
        :meth:`_device_checks`). Either way the call's error word (``ERR_*``; NaN draft logits
        included) is computed on the device, and a failed call puts its sequences' cache slots
        back bit for bit, on the device, from a copy taken before it; the word is read at once
        (host checks) or at the next synchronisation (:meth:`_settle`). ``bad``: the sampling
        settings' range flag (``_sampling_mode``, with ``_defer_checks``)."""
        error = None
        run = plan
        if self._defer_checks:
            run, error = self._device_checks(plan)
            if bad is not None:  # (a bit the word cannot hold yet: one add)
                error = torch.add(error, bad, alpha=ERR_SAMPLING)
        else:
            self._check_values(plan)
        saved = None
        if error is not None or k is not None:  # the call may still be refused
            slots = _on_device(plan.slots, self.device)
            saved = (self.cache.kv.index_select(1, slots), self.cache.pos.index_select(1, slots))
        with self._dropping_on_failure(plan):
            out = x = self._feed(run)  # [S, M*D]
            if k is not None:
                out, nan = self._draft(run, x, k, sampling)
                tp = self.model.tp
                if tp.sharded:  # each rank saw its vocabulary slice: agree on the flag
                    nan = tp.all_reduce_(nan.to(torch.int32).view(1))[0] > 0
                word = nan.to(torch.int32) * ERR_LOGITS
                error = word if error is None else error + word
        if saved is None:
            return out
        ok = error == 0
        for table, before in zip((self.cache.kv, self.cache.pos), saved):
            table.index_copy_(1, slots, torch.where(ok, table.index_select(1, slots), before))
        pend = self._defer(plan, error, "feed" if k is None else "propose", sampling)
        if k is not None:
            out._deferred = pend
        return out

    def _device_checks(self, plan: _Plan) -> tuple[_Plan, torch.Tensor]:
        """:meth:`_check_values` without reading a value: the same tests on the device, as an
        error word [] int32 (``ERR_IDS``, ``ERR_POSITIONS``, ``ERR_HIDDEN``), and the call with
        every bad value replaced by a harmless one for the forward to run on (an id by 0, a
        row by zeros, the positions by where the drafter expects the rows), so that nothing
        out of range reaches a memory access or the module's own checks. What the forward then
        writes is put back by the caller when the word is not 0."""
        ids, hidden = plan.next_ids, plan.hidden
        expected = _on_device(torch.cat([torch.arange(s, s + n)
                                         for s, n in zip(plan.starts, plan.counts)]),
                              self.device)  # [T] int64
        bad_ids, bad_pos, bad_hid = prog_mod.bad_values(  # each [T]
            ids, plan.positions, expected, hidden, self.config.vocab_size, MAX_ABS_HIDDEN)
        run = dataclasses.replace(plan, next_ids=torch.where(bad_ids, 0, ids),
                                  positions=expected,
                                  hidden=torch.where(bad_hid[:, None], 0, hidden))
        return run, prog_mod.error_word(bad_ids, bad_pos, bad_hid)

    def _defer(self, plan: _Plan, error: torch.Tensor, call: str, sampling: Sampling
               ) -> _Deferred:
        """Keep an eager call's error word for :meth:`_settle` (on CUDA copied back without
        waiting), or with host checks read it now (raising at the call)."""
        if self.device.type == "cuda":
            host = torch.empty(1, dtype=torch.int32, pin_memory=True)
            host.copy_(error.view(1), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = error.view(1).cpu(), None
        self._pending = pend = _Deferred(self, host, event, plan, None, call, sampling)
        if not self._defer_checks:
            self._settle(at_call=True)
        return pend

    def _feed(self, plan: _Plan) -> torch.Tensor:
        device = self.device
        hidden_states, input_ids = plan.hidden, plan.next_ids
        positions = plan.positions.to(torch.int64)
        slots = _on_device(plan.slots, device)
        starts = _on_device(plan.starts, device)
        # Every entry at or after a sequence's next real position came from a draft: drop it
        # before the real rows are written (spec, "Multi-step drafting").
        pos = self.cache.pos[:, slots]  # [L, S, C]
        self.cache.pos[:, slots] = pos.masked_fill(pos >= starts[None, :, None], -1)
        if plan.keep is not None:
            hidden_states = hidden_states.index_select(0, plan.keep)
            input_ids = input_ids.index_select(0, plan.keep)
            positions = positions.index_select(0, plan.keep)
        kept = _on_device(plan.kept_counts, device)
        seq_slots = slots.repeat_interleave(kept)  # [T']
        # only each sequence's last row's output is read: the others give their keys only
        if self._accelerator is self.model:
            x = self.model.forward(input_ids, positions, hidden_states, spec_step_idx=0,
                                   kv_cache=self.cache, seq_slots=seq_slots, last_only=True)
        else:  # (a deprecated accelerator: the module's older signature, every row's output)
            x = self.accelerator.forward(input_ids, positions, hidden_states, spec_step_idx=0,
                                         kv_cache=self.cache, seq_slots=seq_slots)
            x = x[kept.cumsum(0) - 1]  # [T', M*D] -> each sequence's last row, [S, M*D]
        for seq_id, start, n in zip(plan.seq_ids, plan.starts, plan.counts):
            self._seqs[seq_id].next_position = start + n
        return x

    def _draft(self, plan: _Plan, x: torch.Tensor, k: int, sampling: Sampling
               ) -> tuple[Proposal, torch.Tensor]:
        """The k draft steps -> (the proposal, whether any step's logits held NaN: bool [] on
        the device, never read here)."""
        device = self.device
        slots = _on_device(plan.slots, device)
        last = _on_device([s + n - 1 for s, n in zip(plan.starts, plan.counts)], device)
        hidden, drafts, probs = [x], [], []
        nan = torch.zeros((), dtype=torch.bool, device=device)
        for step in range(k):
            graphs = self._graph_for(step, len(plan.slots))
            if graphs is not None:  # one row per sequence: exactly a captured decode step
                x, logits = graphs.step(drafts[-1], last + step, x, slots, check=False)
                x = x.clone()  # a view of the graph's output buffer, rewritten by the next replay
                hidden.append(x)
            else:
                if step:  # the previous step's own residual and draft, one position further
                    x = self.accelerator.forward(drafts[-1], last + step, x, spec_step_idx=step,
                                                 kv_cache=self.cache, seq_slots=slots)
                    hidden.append(x)
                # [S, V]; tensor-parallel: this rank's [S, V/w], greedy needs no gather
                sharded = {"gather": False} if self.model.tp.sharded else {}
                logits = self.accelerator.compute_logits(x, spec_step_idx=step, **sharded)
            nan = nan | nan_flag(logits)  # NaN rows still draw in-vocabulary tokens
            token, q = self.model.tp.sample(logits, sampling, checked=True)  # (at the call)
            drafts.append(token)
            probs.append(q)
        return Proposal(torch.stack(drafts, dim=1),
                        None if probs[0] is None else torch.stack(probs, dim=1),
                        torch.stack(hidden, dim=1)), nan

    def _graph_for(self, step: int, n_seqs: int):
        """The captured graphs for draft step ``step`` >= 1 of ``n_seqs`` sequences, or None
        (no graphs, step 0, or more sequences than the largest bucket)."""
        if not step or self._graphs is None:
            return None
        graphs = self._graphs[step % len(self._graphs)]
        return graphs if n_seqs <= max(graphs.buckets) else None

    @contextmanager
    def _dropping_on_failure(self, plan: _Plan):
        """If the forward itself fails (after the checks: out of memory, a kernel error), the
        cache of the call's sequences may be half-written: drop them rather than keep corrupt
        state, and say so."""
        try:
            yield
        except BaseException as exc:
            self._failed(plan, exc)

    def _failed(self, plan: _Plan, exc: BaseException):
        """What :meth:`_dropping_on_failure` does with the exception ``exc`` being handled:
        drop the call's sequences, raise."""
        for seq_id in plan.seq_ids:
            if seq_id in self._seqs:
                self.remove_sequence(seq_id)
        if not isinstance(exc, Exception):  # KeyboardInterrupt and the like pass through
            raise exc
        raise RuntimeError(
            f"drafter: the forward failed ({type(exc).__name__}: {exc}); sequences "
            f"{short(plan.seq_ids)} were removed because their cache may be half-written: "
            "add them again and re-feed their last W rows") from exc


def _on_device(values: list[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host integers -> an int64 tensor on ``device``; on CUDA through pinned memory, so the
    copy is queued behind the GPU's work instead of waiting for it."""
    t = torch.as_tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _mode(sampling: Sampling) -> str:
    """The whole-call program that runs ``sampling`` (``mtp.propose_program.MODES``): from
    the settings' types, never their values. A temperature tensor takes a sampled program,
    whose rows at temperature 0 pick the argmax (q one-hot), as ``mtp.sampling.sample``."""
    if sampling.greedy:
        return "greedy"
    p = sampling.top_p
    return "top_p" if isinstance(p, torch.Tensor) or p < 1 else "sample"


_NONE = object()
_STRIDED, _INT64, _INT32 = torch.strided, torch.int64, torch.int32  # (singletons: `is` tests)


__all__ = ["MAX_ABS_HIDDEN", "MAX_POSITION", "Drafter", "Proposal", "check_hidden_values",
           "hidden_ok"]
