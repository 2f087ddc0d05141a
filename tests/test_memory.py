"""Allocations sized from a config or Drafter arguments are estimated first and refused beyond
the device's memory, with the size and the setting that drives it, before anything is built."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_config

from mtp import DeepSeekV4MTP, Drafter, MTPConfig, WeightFormat
from mtp.cache import KVCache
from mtp.memory import cache_bytes, device_memory, parameter_bytes
from mtp.testing import init_random_

# Every value in range, but 512 TiB of routed experts in float32: beyond any machine.
HUGE = dict(n_routed_experts=1 << 12, moe_intermediate_size=1 << 18, hidden_size=1 << 16)


def test_parameter_bytes_is_exact():
    for fmt in (WeightFormat.released(), WeightFormat.plain()):
        for dtype in (torch.float32, torch.bfloat16):
            model = DeepSeekV4MTP(tiny_config(), weight_format=fmt, dtype=dtype)
            want = sum(p.numel() * p.element_size() for p in model.parameters())
            assert parameter_bytes(model.config, fmt, dtype)[0] == want


def test_a_module_beyond_memory_is_refused_before_allocating():
    cfg = tiny_config(**HUGE)
    with pytest.raises(MemoryError, match=r"the module's parameters would take 76\d\.\d\d TiB, "
                                          r"more than .* the largest is model.layers.2.mtp_block."
                                          r"ffn.experts.w13_weight \[4096, 524288, 65536\], "
                                          r"512.00 TiB, sized by hidden_size=65536, "
                                          r"n_routed_experts=4096; check config.json"):
        DeepSeekV4MTP(cfg, weight_format=WeightFormat.plain(), dtype=torch.float32)
    assert DeepSeekV4MTP(cfg, device="meta").model.embed_tokens.weight.is_meta  # shapes only


def test_a_shared_embedding_and_head_are_not_counted():
    cfg = tiny_config()
    full = parameter_bytes(cfg)[0]
    v_by_d = cfg.vocab_size * cfg.hidden_size * 2  # bf16
    assert parameter_bytes(cfg, shared=("embed_tokens", "head"))[0] == full - 2 * v_by_d
    assert parameter_bytes(cfg, shared=("head",))[0] == full - v_by_d


@pytest.mark.parametrize("arg", ["max_seqs", "max_draft_tokens"])
def test_a_drafter_cache_beyond_memory_is_refused(arg):
    model = init_random_(DeepSeekV4MTP(MTPConfig.from_name("tiny")), seed=0)
    with pytest.raises(MemoryError, match=r"the draft KV cache .* would take \d+\.\d+ TiB, more "
                                          r"than .* lower max_seqs, or max_draft_tokens"):
        Drafter(model, **{arg: 10**9})


def test_cache_bytes_is_exact():
    cache = KVCache(2, 3, 11, 128, dtype=torch.bfloat16)
    want = cache.kv.numel() * cache.kv.element_size() + cache.pos.numel() * 8
    assert cache_bytes(2, 3, 11, 128, torch.bfloat16) == want


def test_device_memory_of_this_machine():
    total = device_memory("cpu")
    assert total is None or 2**28 < total < 2**50
    assert device_memory("meta") is None
    assert not math.isnan(parameter_bytes(MTPConfig.from_name("flash"))[0])
