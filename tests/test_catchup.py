"""Catch-up (many rows per call) on the CPU: the cache's write selection, and the forward's
chunking of long calls (equal to one unchunked call).

The GPU kernels' many-row paths are tested in tests/test_kernels.py (parity with the reference
ops on both sides of every row threshold) and tests/test_gpu_fast_path.py (end to end)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from mtp import DeepSeekV4MTP, KVCache, Numerics
from mtp import model as model_mod
from mtp.cache import group_starts, run_ends, window_index
from mtp.testing import init_random_


@st.composite
def runs(draw):
    """Rows in runs, one run per slot (slots distinct, any order), consecutive positions."""
    n = draw(st.integers(1, 4))
    slots = draw(st.permutations(range(6)))[:n]
    lengths = [draw(st.integers(1, 9)) for _ in range(n)]
    starts = [draw(st.integers(0, 30)) for _ in range(n)]
    seq = torch.tensor([s for s, k in zip(slots, lengths) for _ in range(k)])
    pos = torch.tensor([p0 + i for p0, k in zip(starts, lengths) for i in range(k)])
    return seq, pos


@settings(max_examples=60, deadline=None)
@given(runs(), st.integers(1, 12))
def test_window_index_writes_last_capacity_rows_of_each_run(case, capacity):
    seq, pos = case
    want_rows = []
    for i in range(len(seq)):  # a run's rows within `capacity` of its last position
        last = max(int(p) for s, p in zip(seq, pos) if s == seq[i])
        if pos[i] > last - capacity:
            want_rows.append(i)
    cache_pos = torch.full((6, capacity), -1)
    win = window_index(pos, seq, 4, cache_pos, capacity)
    assert win.write_rows.tolist() == want_rows
    assert win.write_slots.tolist() == [int(seq[i]) * capacity + int(pos[i]) % capacity
                                        for i in want_rows]
    ends = run_ends(seq)
    starts = group_starts(seq)
    for i in range(len(seq)):  # the same run, its last and first rows
        assert seq[ends[i]] == seq[i] == seq[starts[i]]
        assert ends[i] + 1 == len(seq) or seq[ends[i] + 1] != seq[i]


def test_run_ends_empty():
    assert run_ends(torch.zeros(0, dtype=torch.int64)).numel() == 0


def _tiny(seed=0):
    cfg = tiny_config()
    num = Numerics(act_quant=True, kv_fp8=True)
    return init_random_(DeepSeekV4MTP(cfg, numerics=num, dtype=torch.float64), seed=seed)


@pytest.mark.parametrize("chunk", [1, 5, 7, 64])
def test_forward_chunked_equals_one_call(chunk, monkeypatch):
    """Three sequences with 9, 1 and 13 new rows behind cached history, in chunks of ``chunk``
    rows (1: every row alone; 5, 7: chunks that split sequences; 64: one chunk): the output and
    the cache equal one call's. float64: the only differences allowed are the summation order
    of the products, ~1e-15 relative."""
    m = _tiny()
    cfg = m.config
    g = torch.Generator().manual_seed(1)
    lengths, slots_of, first = [9, 1, 13], [2, 0, 3], [4, 40, 0]
    slots = torch.tensor([s for s, k in zip(slots_of, lengths) for _ in range(k)])
    pos = torch.tensor([p + i for p, k in zip(first, lengths) for i in range(k)])
    t = len(pos)
    ids = torch.randint(0, cfg.vocab_size, (t,), generator=g)
    h = torch.randn(t, cfg.hc_dim, generator=g, dtype=torch.float64)

    def run(chunk_rows):
        cache = KVCache(1, 4, cfg.sliding_window + 3, cfg.head_dim, dtype=torch.float64)
        warm = torch.arange(0, 4)  # slot 2 holds positions 0..3 before the call
        cache_h = torch.randn(4, cfg.hc_dim, generator=torch.Generator().manual_seed(5),
                              dtype=torch.float64)
        m.forward(ids[:4], warm, cache_h, kv_cache=cache, seq_slots=torch.full((4,), 2))
        monkeypatch.setattr(model_mod, "CHUNK_ROWS", chunk_rows)
        x = m.forward(ids, pos, h, kv_cache=cache, seq_slots=slots)
        return x, cache

    x1, c1 = run(10 ** 9)
    x2, c2 = run(chunk)
    torch.testing.assert_close(x2, x1, rtol=1e-12, atol=1e-12)
    assert torch.equal(c2.pos, c1.pos)
    torch.testing.assert_close(c2.kv, c1.kv, rtol=1e-12, atol=1e-12)


def test_chunk_rows_is_declared():
    assert isinstance(model_mod.CHUNK_ROWS, int) and model_mod.CHUNK_ROWS >= 128
