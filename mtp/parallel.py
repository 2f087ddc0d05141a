"""Tensor and expert parallelism over a ``torch.distributed`` process group the caller owns.

The engine creates its groups; the model only keeps the one it is given (no module globals),
wrapped in :class:`TensorParallel`: the rank's share of each split dimension and the few
collectives a sharded step adds. What each rank holds (each parameter's ``ParamFacts.tp``,
:mod:`mtp.facts`):

- attention heads ``[r*H/w, (r+1)*H/w)``: rows of ``wq_b`` and ``attn_sink``, whole ``wo_a``
  groups, the matching columns of ``wo_b`` (its output is all-reduced);
- routed experts ``[r*E/w, (r+1)*E/w)`` (their output is all-reduced);
- vocabulary rows ``[r*V/w, (r+1)*V/w)`` of the embedding and the head;
- everything else whole: ``fused_wqa_wkv``, norms, ``e_proj``, ``h_proj``, the
  hyper-connection tensors, the gate and the shared expert (held whole, computed split where
  its width allows: docs/parallel.md).

With ``group=None`` (one process) every helper is the identity and nothing is split.

Shape legend: T rows, S sequences, D hidden, V vocabulary, w world size.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from .config import FP8_BLOCK, MTPConfig


class ParallelError(ValueError):
    """The model cannot be split this way, or the ranks of a group disagree."""


def split_sizes(cfg: MTPConfig) -> dict[str, int]:
    """The dimensions a world size must divide, by config key."""
    return {"num_attention_heads": cfg.num_attention_heads, "o_groups": cfg.o_groups,
            "n_routed_experts": cfg.n_routed_experts, "vocab_size": cfg.vocab_size}


def world_size_problems(cfg: MTPConfig, world_size: int) -> list[str]:
    """Why ``cfg`` cannot run over ``world_size`` ranks (empty when it can)."""
    out = [f"{key}={n} is not divisible by world_size={world_size}"
           for key, n in split_sizes(cfg).items() if n % world_size]
    if not out:
        # wo_b's input (G*O columns) is FP8-rounded in blocks of 128 and its weight scale has
        # 128-column blocks: a rank's columns must be whole blocks of the unsplit row.
        cols = cfg.o_groups // world_size * cfg.o_lora_rank
        if cols % FP8_BLOCK:
            out.append(f"each rank gets o_groups/world_size * o_lora_rank = {cols} columns of "
                       f"wo_b, not whole {FP8_BLOCK}-wide FP8 blocks")
    return out


def valid_world_sizes(cfg: MTPConfig, limit: int = 64) -> list[int]:
    """The world sizes up to ``limit`` that ``cfg`` can be split over.

    Example:
        >>> valid_world_sizes(MTPConfig.from_name("flash"))
        [1, 2, 4, 8]
    """
    return [w for w in range(1, limit + 1) if not world_size_problems(cfg, w)]


def check_world_size(cfg: MTPConfig, world_size: int) -> None:
    """Raise :class:`ParallelError` naming each dimension ``world_size`` does not split."""
    problems = world_size_problems(cfg, world_size)
    if problems:
        raise ParallelError(
            f"process_group: cannot split the MTP layer over world_size={world_size}: "
            f"{'; '.join(problems)}. World sizes that work for this config: "
            f"{valid_world_sizes(cfg)}")


class TensorParallel:
    """This rank's view of a process group: its share of each split dimension and the
    collectives of a sharded step. ``group=None``: one process, no collectives.

    Example:
        >>> tp = TensorParallel(None)
        >>> tp.rank, tp.world_size, tp.part(1024)
        (0, 1, (0, 1024))
    """

    def __init__(self, group=None):
        self.group = group
        if group is None:
            self.rank, self.world_size = 0, 1
        else:
            import torch.distributed as dist

            if not dist.is_available() or not dist.is_initialized():
                raise ParallelError("process_group: torch.distributed is not initialised; call "
                                    "torch.distributed.init_process_group first")
            self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    def part(self, size: int) -> tuple[int, int]:
        """This rank's ``[start, stop)`` of ``size`` split evenly (``size % world_size == 0``
        is checked when the model is built)."""
        n = size // self.world_size
        return self.rank * n, (self.rank + 1) * n

    def local(self, size: int) -> int:
        return size // self.world_size

    # ---- collectives (each a no-op on one rank) ----------------------------------------------
    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place; every rank gets the same bits."""
        if self.sharded:
            import torch.distributed as dist

            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's ``x`` along ``dim`` in rank order."""
        if not self.sharded:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Greedy tokens from this rank's vocabulary slice: [S, V/w] -> [S] global ids, the
        argmax of the full row (the first one on ties, like ``torch.argmax``). One all-gather
        of [S, 2] float64 (value, global id: both exact in float64) instead of [S, V]."""
        value, index = logits.max(dim=-1)
        if not self.sharded:
            return index
        mine = torch.stack((value.double(), (index + self.rank * logits.shape[-1]).double()), -1)
        return combine_argmax(self.all_gather(mine.unsqueeze(0), dim=0))

    def sample(self, logits: torch.Tensor, sampling, *, check_nan: bool = True,
               checked: bool = False):
        """:func:`mtp.sampling.sample` on this rank's vocabulary slice [S, V/w]: greedy without
        gathering the logits; sampled drafts gather them (their q [S, V] is needed whole by the
        verifier anyway) and draw with ``sampling.generator``, which must be seeded the same on
        every rank (each rank then draws the same tokens). ``check_nan=False``: as
        :func:`mtp.sampling.sample`'s (the caller checks each rank's slice itself).
        ``checked=True``: the caller checked ``sampling`` (on the device) and NaN itself, so
        nothing is read (:func:`mtp.sampling.sample_checked`)."""
        from .sampling import nan_error, nan_flag, sample, sample_checked

        if checked:
            if sampling.greedy and self.sharded:
                return self.argmax(logits), None
            return sample_checked(self.all_gather(logits), sampling)
        if not self.sharded:
            return sample(logits, sampling, check_nan=check_nan)
        sampling.check(logits.shape[0], logits.device)
        if sampling.greedy:
            if check_nan:  # each rank reads its own slice; a NaN anywhere is a NaN somewhere
                flag = nan_flag(logits).to(torch.int32).view(1)
                if int(self.all_reduce_(flag)[0]):  # every rank raises together
                    raise nan_error("logits")
            return self.argmax(logits), None
        return sample(self.all_gather(logits), sampling, check_nan=check_nan)

    # ---- agreement -------------------------------------------------------------------------
    def agree(self, fingerprint: bytes | None, what: str, device=None) -> None:
        """Check that every rank got here with the same ``fingerprint`` (a digest of what it is
        about to use), or raise on every rank. ``None`` means this rank failed already: the
        others raise too instead of waiting for it in a later collective. One all-gather."""
        if not self.sharded:
            return
        mine = torch.zeros(33, dtype=torch.uint8, device=device)
        if fingerprint is not None:
            mine[0] = 1
            mine[1:] = torch.frombuffer(bytearray(hashlib.sha256(fingerprint).digest()),
                                        dtype=torch.uint8)
        every = self.all_gather(mine.unsqueeze(0), dim=0).cpu()  # [w, 33]
        failed = [r for r in range(self.world_size) if not every[r, 0]]
        if fingerprint is None:
            return  # this rank raises its own error
        if failed:
            raise ParallelError(f"{what}: rank(s) {failed} of the process group failed (see "
                                f"their error); rank {self.rank} stops too")
        differ = [r for r in range(self.world_size) if not torch.equal(every[r], every[0])]
        if differ:
            raise ParallelError(
                f"{what}: the ranks of the process group disagree: rank(s) {differ} see a "
                f"different checkpoint (config.json or tensor names/shapes/dtypes/offsets) or "
                f"settings (dtype, numerics, shared embed_tokens/head) than rank 0; every rank "
                f"must load the same checkpoint with the same settings")


def combine_argmax(candidates: torch.Tensor) -> torch.Tensor:
    """Each rank's (max value, global id) [w, S, 2] -> [S] ids of the overall maximum, the
    lowest id on ties (ranks hold ascending id ranges), as ``argmax`` of the whole row."""
    best = candidates[..., 0].argmax(dim=0)  # the first rank among equal maxima  # [S]
    return candidates[..., 1].gather(0, best.unsqueeze(0)).squeeze(0).long()


def vocab_embedding(ids: torch.Tensor, weight: torch.Tensor, tp: TensorParallel,
                    dtype: torch.dtype) -> torch.Tensor:
    """Token embeddings from a vocabulary-parallel table: [T] ids, this rank's rows
    [V/w, D] -> [T, D] in ``dtype``. Each rank looks up the ids in its range (zeros elsewhere)
    and the ranks' rows are summed (one all-reduce of [T, D]: exact, one rank is nonzero)."""
    if not tp.sharded:
        return F.embedding(ids, weight).to(dtype)
    start, stop = tp.part(weight.shape[0] * tp.world_size)
    mine = (ids >= start) & (ids < stop)
    e = F.embedding((ids - start).clamp(0, stop - start - 1), weight).to(dtype)
    return tp.all_reduce_(e.masked_fill(~mine[:, None], 0))


__all__ = ["ParallelError", "TensorParallel", "check_world_size", "valid_world_sizes",
           "vocab_embedding"]
