"""Tensor surgery on small hand-labelled integer tensors, plus properties on random splits."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mtp.surgery import (
    fp4_as_int8,
    fuse_rows,
    fused_rows,
    int8_as_fp4,
    intersect,
    overlaps,
    region_numel,
    region_slices,
    split_rows,
    stack_experts,
    tp_range,
    unstack_experts,
)


def test_fused_rows_by_hand():
    # fused_wqa_wkv of Flash: wq_a 1024 rows then wkv 512; its scale has one row per 128.
    assert fused_rows(1536, (1024, 512), 0) == (0, 1024)
    assert fused_rows(1536, (1024, 512), 1) == (1024, 1536)
    assert fused_rows(12, (1024, 512), 0) == (0, 8)
    assert fused_rows(12, (1024, 512), 1) == (8, 12)
    # a last piece that is not a whole block still owns the partial block
    assert fused_rows(3, (256, 64), 1) == (2, 3)


@pytest.mark.parametrize("rows,sizes,shard,msg", [
    (1500, (1024, 512), 0, "not 1500"),
    (1, (100, 28), 1, "inside a 128-row scale block"),
    (1536, (1024, 512), 2, "out of range"),
])
def test_fused_rows_refuses(rows, sizes, shard, msg):
    with pytest.raises(ValueError, match=msg):
        fused_rows(rows, sizes, shard)


def test_fuse_split_by_hand():
    wq_a = torch.tensor([[1, 2], [3, 4]])
    wkv = torch.tensor([[5, 6]])
    fused = fuse_rows([wq_a, wkv])
    assert fused.tolist() == [[1, 2], [3, 4], [5, 6]]
    a, b = split_rows(fused, (2, 1))
    assert a.tolist() == [[1, 2], [3, 4]] and b.tolist() == [[5, 6]]


@given(st.lists(st.integers(1, 5), min_size=1, max_size=4), st.integers(1, 3))
def test_split_inverts_fuse(sizes, cols):
    pieces, start = [], 0
    for n in sizes:  # each element labelled by its position in the fused tensor
        pieces.append(torch.arange(start * cols, (start + n) * cols).view(n, cols))
        start += n
    fused = fuse_rows(pieces)
    assert torch.equal(fused.flatten(), torch.arange(sum(sizes) * cols))
    for got, want in zip(split_rows(fused, sizes), pieces, strict=True):
        assert torch.equal(got, want)


def test_stack_unstack_experts():
    experts = [torch.full((2, 3), e) for e in range(4)]
    stacked = stack_experts(experts)
    assert stacked.shape == (4, 2, 3) and stacked[2, 1, 0].item() == 2
    assert all(torch.equal(a, b) for a, b in zip(unstack_experts(stacked), experts))


@given(st.integers(1, 6), st.integers(1, 4), st.integers(1, 5))
def test_tp_ranges_tile_the_dimension(world, unit, per):
    size = world * unit * per
    ranges = [tp_range(size, r, world, unit) for r in range(world)]
    assert [i for a, b in ranges for i in range(a, b)] == list(range(size))
    assert all((b - a) % unit == 0 for a, b in ranges)


def test_tp_range_refuses():
    with pytest.raises(ValueError, match="cannot split 10 evenly over world_size=4"):
        tp_range(10, 0, 4)
    with pytest.raises(ValueError, match="3 units of 4"):
        tp_range(12, 0, 2, unit=4)
    with pytest.raises(ValueError, match="rank 2"):
        tp_range(8, 2, 2)


def test_regions_by_hand():
    assert intersect(((0, 4), (0, 8)), ((2, 6), (0, 8))) == ((2, 4), (0, 8))
    assert intersect(((0, 2),), ((2, 4),)) is None
    t = torch.arange(24).view(4, 6)
    sl = region_slices(((1, 3), (2, 4)))
    assert t[sl].tolist() == [[8, 9], [14, 15]]
    # relative to a piece that starts at row 1
    assert region_slices(((1, 3), (2, 4)), origin=((1, 4), (0, 6))) == (slice(0, 2),
                                                                        slice(2, 4))
    assert region_numel(((1, 3), (2, 4))) == 4


boxes = st.lists(st.tuples(st.integers(0, 6), st.integers(1, 3), st.integers(0, 6),
                           st.integers(1, 3)), max_size=8).map(
    lambda bs: [((a, a + n), (c, c + m)) for a, n, c, m in bs])


@given(boxes)
def test_overlaps_matches_brute_force(regions):
    brute = {(j, k) for j, k in itertools.combinations(range(len(regions)), 2)
             if intersect(regions[j], regions[k]) is not None}
    assert {tuple(sorted(p)) for p in overlaps(regions)} == brute


def test_fp4_views_keep_the_bytes():
    packed = torch.tensor([[0x21, -0x61], [0x0F, 0x70]], dtype=torch.int8)
    f4 = int8_as_fp4(packed)
    assert f4.dtype == torch.float4_e2m1fn_x2 and f4.shape == packed.shape
    assert torch.equal(fp4_as_int8(f4), packed)
    assert f4.view(torch.uint8).tolist() == [[0x21, 0x9F], [0x0F, 0x70]]
