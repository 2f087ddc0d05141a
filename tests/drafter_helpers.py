"""Shared pieces of the drafter tests: models built once, random rows, state snapshots."""

from __future__ import annotations

import functools

import torch

from mtp import DeepSeekV4MTP, MTPConfig, Numerics
from mtp.drafter import Drafter
from mtp.testing import init_random_

TINY = MTPConfig.from_name("tiny")  # W = 8
W = TINY.sliding_window


@functools.cache
def model(dtype: torch.dtype = torch.float64, seed: int = 0, rounding: bool = True,
          n_mtp: int = 1) -> DeepSeekV4MTP:
    """A released-format (FP8 + FP4 experts) tiny module with random weights. float64 runs the
    module's own code in double precision, so incremental and stateless results can be compared
    to ~1e-12 with every FP8 rounding step on (a float32 difference of 1 ulp could flip an FP8
    rounding and move outputs by percents, which would hide nothing but prove nothing either)."""
    cfg = TINY
    if n_mtp != 1:
        cfg = MTPConfig(**{**TINY.__dict__, "num_nextn_predict_layers": n_mtp,
                           "mtp_compress_ratios": (0,) * n_mtp})
    numerics = Numerics() if rounding else Numerics(act_quant=False, kv_fp8=False)
    return init_random_(DeepSeekV4MTP(cfg, dtype=dtype, numerics=numerics), seed=seed)


def drafter(dtype=torch.float64, max_seqs=4, max_draft_tokens=4, **kw) -> Drafter:
    return Drafter(model(dtype, **kw), max_seqs=max_seqs, max_draft_tokens=max_draft_tokens)


def rows(n: int, seed: int, start: int = 0, dtype=torch.float64):
    """n target rows at positions start .. start+n-1: (hidden [n, M*D], next ids [n], positions)."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, TINY.hc_dim, generator=gen, dtype=torch.float64).to(dtype)
    ids = torch.randint(0, TINY.vocab_size, (n,), generator=gen)
    return h, ids, torch.arange(start, start + n)


def bucket_rows(rows: int, counts: list[int]) -> list[int]:
    """Where a whole-call program's bucket of ``rows`` rows per sequence holds the caller's
    staged rows: sequence i's last min(n_i, R) rows at the end of its block of R."""
    out = []
    for i, n in enumerate(counts):
        n = min(n, rows)
        base = i * rows + rows - n
        out.extend(range(base, base + n))
    return out


def snapshot(d: Drafter):
    """Everything a call may change: the cache tensors and each sequence's slot and position."""
    seqs = {s: (d.slot(s), d.next_position(s)) for s in d.seq_ids}
    return d.cache.kv.clone(), d.cache.pos.clone(), seqs, list(d._free)


def assert_same_state(a, b) -> None:
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[2] == b[2] and a[3] == b[3]


def live_entries(d: Drafter, seq_id) -> dict:
    """The cache entries of a sequence that can still be attended: {(layer, position): kv} for
    positions >= next_position - W (older ones fell out of every future window)."""
    slot, lo = d.slot(seq_id), d.next_position(seq_id) - W
    out = {}
    pos = d.cache.pos[:, slot]
    for layer, c in torch.nonzero(pos >= max(lo, 0)).tolist():
        out[(layer, int(pos[layer, c]))] = d.cache.kv[layer, slot, c].clone()
    return out


def same_entries(a: dict, b: dict) -> bool:
    """Two live_entries results hold the same positions with bitwise equal KV."""
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()
