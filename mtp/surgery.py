"""Tensor surgery: small pure functions that move checkpoint pieces in and out of parameters.

Renaming lives in :mod:`mtp.remap`; this file only knows about index arithmetic and tensors:

- :func:`fused_rows`: the row range of shard s inside a fused parameter (``fused_wqa_wkv`` holds
  wq_a rows then wkv rows; ``gate_up_proj`` / ``w13`` hold w1 rows then w3 rows), also for the
  parameter's 128x128 block scale.
- :func:`fuse_rows` / :func:`split_rows`, :func:`stack_experts` / :func:`unstack_experts`.
- :func:`tp_range`: the slice of one tensor-parallel rank along a dimension.
- Regions: a region is a tuple of ``(start, stop)`` per dimension of a parameter, the part of it a
  checkpoint piece fills (:func:`intersect`, :func:`region_shape`, :func:`region_slices`).
- :func:`fp4_as_int8` / :func:`int8_as_fp4`: the same packed e2m1 bytes under the two dtypes
  they appear with (checkpoint ``F4``, module ``int8``); no value is converted.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Region = tuple[tuple[int, int], ...]  # (start, stop) per dimension


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def fused_rows(param_rows: int, sizes: Sequence[int], shard: int,
               block: int = 128) -> tuple[int, int]:
    """Row range ``[start, stop)`` of shard ``shard`` in a parameter that stacks pieces of
    ``sizes`` rows. ``param_rows`` is either ``sum(sizes)`` (the weight) or
    ``ceil(sum(sizes) / block)`` (its block scale: one row per 128 weight rows).

    Example:
        >>> fused_rows(1536, (1024, 512), 1)       # fused_wqa_wkv: wkv rows
        (1024, 1536)
        >>> fused_rows(12, (1024, 512), 1)         # its 128x128 block scale
        (8, 12)
    """
    if not 0 <= shard < len(sizes):
        raise ValueError(f"shard {shard} out of range for a parameter fused from {len(sizes)} "
                         f"pieces")
    total = sum(sizes)
    if param_rows == total:
        unit = 1
    elif param_rows == _ceil_div(total, block):
        unit = block
    else:
        raise ValueError(f"a parameter fused from pieces of {list(sizes)} rows has {total} rows "
                         f"(or {_ceil_div(total, block)} block-scale rows), not {param_rows}")
    start = sum(sizes[:shard])
    if start % unit:
        raise ValueError(f"piece {shard} starts at row {start}, inside a {block}-row scale block; "
                         f"fused pieces must start on a block boundary")
    return start // unit, _ceil_div(start + sizes[shard], unit)


def fuse_rows(pieces: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate pieces along rows (dim -2 for stacked experts, dim 0 otherwise).

    Example:
        >>> fuse_rows([torch.tensor([[1, 2]]), torch.tensor([[3, 4], [5, 6]])]).tolist()
        [[1, 2], [3, 4], [5, 6]]
    """
    return torch.cat(list(pieces), dim=0)


def split_rows(t: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """Inverse of :func:`fuse_rows` for the weight (``t`` has ``sum(sizes)`` rows) or its block
    scale (``ceil(sum(sizes) / 128)`` rows).

    Example:
        >>> [p.tolist() for p in split_rows(torch.arange(6).view(3, 2), (1, 2))]
        [[[0, 1]], [[2, 3], [4, 5]]]
    """
    out = []
    for s in range(len(sizes)):
        a, b = fused_rows(t.shape[0], sizes, s)
        out.append(t[a:b])
    return out


def stack_experts(experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """[E] tensors of [R, C] -> [E, R, C] (``experts.w13_weight`` and friends).

    Example:
        >>> stack_experts([torch.zeros(2, 3), torch.ones(2, 3)]).shape
        torch.Size([2, 2, 3])
    """
    return torch.stack(list(experts), dim=0)


def unstack_experts(t: torch.Tensor) -> list[torch.Tensor]:
    """[E, R, C] -> E tensors of [R, C] (views)."""
    return list(t.unbind(0))


def tp_range(size: int, rank: int, world_size: int, unit: int = 1) -> tuple[int, int]:
    """Rank ``rank``'s contiguous part ``[start, stop)`` of ``size`` elements split evenly over
    ``world_size`` ranks, in whole units of ``unit`` (a head's rows, a group's rows).

    Example:
        >>> tp_range(32, 1, 4), tp_range(32, 3, 4)
        ((8, 16), (24, 32))
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if size % (world_size * unit):
        what = f"{size // unit} units of {unit}" if unit > 1 else str(size)
        raise ValueError(f"cannot split {what} evenly over world_size={world_size}")
    part = size // world_size
    return rank * part, (rank + 1) * part


# ---- regions -------------------------------------------------------------------------------
def full_region(shape: Sequence[int]) -> Region:
    return tuple((0, n) for n in shape)


def narrow_region(region: Region, dim: int, start: int, stop: int) -> Region:
    """``region`` with dimension ``dim`` cut to ``[start, stop)`` (absolute indices)."""
    a, b = region[dim]
    lo, hi = max(a, start), min(b, stop)
    return region[:dim] + ((lo, max(lo, hi)),) + region[dim + 1:]


def intersect(a: Region, b: Region) -> Region | None:
    """The common part of two regions of the same parameter, or None if they do not meet.

    Example:
        >>> intersect(((0, 4), (0, 8)), ((2, 6), (0, 8)))
        ((2, 4), (0, 8))
    """
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b, strict=True))
    return None if any(lo >= hi for lo, hi in out) else out


def region_shape(region: Region) -> tuple[int, ...]:
    return tuple(b - a for a, b in region)


def region_numel(region: Region) -> int:
    n = 1
    for a, b in region:
        n *= b - a
    return n


def region_slices(region: Region, origin: Region | None = None) -> tuple[slice, ...]:
    """Slices selecting ``region`` from a tensor that holds ``origin`` (default: the whole
    parameter, i.e. absolute indices).

    Example:
        >>> region_slices(((2, 4), (0, 8)), origin=((2, 6), (0, 8)))
        (slice(0, 2, None), slice(0, 8, None))
    """
    if origin is None:
        return tuple(slice(a, b) for a, b in region)
    return tuple(slice(a - o, b - o) for (a, b), (o, _) in zip(region, origin, strict=True))


def overlaps(regions: Sequence[Region]) -> list[tuple[int, int]]:
    """Index pairs of regions that share at least one element (sweep over the first dim)."""
    order = sorted(range(len(regions)), key=lambda k: regions[k])
    found, active = [], []
    for k in order:
        start = regions[k][0][0]
        active = [j for j in active if regions[j][0][1] > start]
        found += [(j, k) for j in active if intersect(regions[j], regions[k]) is not None]
        active.append(k)
    return found


# ---- packed FP4 ----------------------------------------------------------------------------
FP4_X2 = getattr(torch, "float4_e2m1fn_x2", None)


def fp4_as_int8(t: torch.Tensor) -> torch.Tensor:
    """A ``float4_e2m1fn_x2`` tensor (safetensors ``F4``) as the int8 bytes the module holds:
    the same bytes, two e2m1 codes each, low nibble first; nothing is converted.

    Example:
        >>> fp4_as_int8(torch.tensor([[0x21]], dtype=torch.uint8).view(FP4_X2)).tolist()
        [[33]]
    """
    return t.view(torch.int8)


def int8_as_fp4(t: torch.Tensor) -> torch.Tensor:
    """The module's int8 packed FP4 bytes typed ``float4_e2m1fn_x2`` (what the reference
    converter writes as ``F4``; the header then counts two elements per byte)."""
    if FP4_X2 is None:
        raise RuntimeError("torch.float4_e2m1fn_x2 needs torch >= 2.8")
    return t.view(FP4_X2)
