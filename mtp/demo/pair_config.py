"""The shape of the tiny trained pair (target and its one MTP layer), declared once.

A V4 block at toy size: hidden 256, hc_mult 4, 4 heads of 128 (64 RoPE dims), sliding window
128 with a sink, 8 routed experts of width 128 (top-2) plus one shared expert; the target has 4
such blocks, the MTP layer one. Vocabulary: the byte tokenizer's 259 ids.
"""

from __future__ import annotations

from ..config import MTPConfig
from ..model import Numerics
from .tokenizer import TOKENIZER

TARGET_LAYERS = 4

PAIR_CONFIG = MTPConfig(
    hidden_size=256, vocab_size=TOKENIZER.vocab_size, num_hidden_layers=TARGET_LAYERS,
    num_attention_heads=4, head_dim=128, qk_rope_head_dim=64, q_lora_rank=128, o_groups=2,
    o_lora_rank=128, sliding_window=128, n_routed_experts=8, num_experts_per_tok=2,
    moe_intermediate_size=128,
)

# Trained in plain bf16 arithmetic: no FP8 rounding of activations or of the cached KV.
PLAIN_NUMERICS = Numerics(act_quant=False, kv_fp8=False)

__all__ = ["PAIR_CONFIG", "PLAIN_NUMERICS", "TARGET_LAYERS"]
