"""A tiny transformers DeepSeek-V4 target and a matching MTP drafter checkpoint, for tests.

The target is a real ``transformers.DeepseekV4ForCausalLM`` with the ``tiny`` preset's
dimensions. Its weights are set so that it is close to a bigram model (the token embedding is
large, the blocks add a context-dependent part) with peaked next-token distributions (the head
is scaled up): greedy decisions then have margins far above bf16 rounding, and a sampled token
has a small support, which a chi-square test can check. The drafter is an MTP layer built like
``mtp.toy_target.matching_mtp`` (e_proj = I, the target's hc_head and norm, scaled-down block),
written in the release's on-disk format (FP8 weights with E8M0 block scales, FP4 experts,
sharded safetensors with the target's embedding and head) so that it loads through the real
loader, and it agrees with the target often enough that drafts are partly accepted.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

from mtp import DeepSeekV4MTP, MTPConfig
from mtp.quant import quantize_fp8_block
from mtp.testing import init_random_, write_release_like

N_LAYERS = 3
LAYER_TYPES = {
    "sliding": ["sliding_attention"] * N_LAYERS,
    "compressed": ["sliding_attention", "compressed_sparse_attention",
                   "heavily_compressed_attention"],
}


def mtp_config() -> MTPConfig:
    return dataclasses.replace(MTPConfig.from_name("tiny"), num_hidden_layers=N_LAYERS)


def target_config(layers: str) -> DeepseekV4Config:
    c = mtp_config()
    return DeepseekV4Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=N_LAYERS,
        num_attention_heads=c.num_attention_heads, head_dim=c.head_dim,
        partial_rotary_factor=c.qk_rope_head_dim / c.head_dim, q_lora_rank=c.q_lora_rank,
        o_groups=c.o_groups, o_lora_rank=c.o_lora_rank, sliding_window=c.sliding_window,
        n_routed_experts=c.n_routed_experts, num_experts_per_tok=c.num_experts_per_tok,
        moe_intermediate_size=c.moe_intermediate_size, hc_mult=c.hc_mult,
        # index_topk above the compressed entries of any test sequence: the indexer then keeps
        # every causal entry, and results do not hang on its choice among near-equal scores,
        # which a chunked and a whole-sequence forward make differently (rows 2e-4 apart in
        # float32 at index_topk=3)
        index_n_heads=2, index_head_dim=64, index_topk=32,
        # small compress rates so that short prompts close many windows (4 and 128 in V4)
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        layer_types=LAYER_TYPES[layers], mlp_layer_types=["hash_moe"] + ["moe"] * (N_LAYERS - 1),
        initializer_range=0.02, eos_token_id=None, bos_token_id=None, pad_token_id=None)


@torch.no_grad()
def build_target(layers: str = "compressed", seed: int = 0,
                 head_scale: float = 5.0) -> DeepseekV4ForCausalLM:
    """A float32 tiny target (cast it with ``.to(torch.bfloat16)``)."""
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(target_config(layers)).eval()
    gen = torch.Generator().manual_seed(seed)
    d = model.config.hidden_size
    model.model.embed_tokens.weight.copy_(torch.randn(model.config.vocab_size, d, generator=gen))
    model.lm_head.weight.copy_(torch.randn(model.config.vocab_size, d, generator=gen)
                               * head_scale / d ** 0.5)
    for router in model.modules():  # hash routing: spread tokens over the experts
        if hasattr(router, "tid2eid"):
            v, k = router.tid2eid.shape
            router.tid2eid.copy_(torch.randint(0, model.config.n_routed_experts, (v, k),
                                               generator=gen))
    return model


def _scale_fp8_(lin, factor: float) -> None:
    """Scale an FP8 weight by a power of two through its E8M0 block scales (exact)."""
    s = lin.weight_scale_inv
    s.copy_((s.float() * factor).to(s.dtype))


@torch.no_grad()
def write_matching_drafter(target: DeepseekV4ForCausalLM, folder, seed: int = 1) -> str:
    """An MTP layer that roughly agrees with ``target``, written in the release format with the
    target's embedding and head (as the release stores them: ``embed.weight``, ``head.weight``)."""
    mtp = init_random_(DeepSeekV4MTP(mtp_config()), seed=seed)  # its own embed/head: not shared
    layer = mtp.layer(0)
    d = mtp.config.hidden_size
    q, s = quantize_fp8_block(torch.eye(d), "e8m0")  # e_proj = I: exact in FP8
    layer.e_proj.weight.copy_(q)
    layer.e_proj.weight_scale_inv.copy_(s)
    layer.enorm.weight.fill_(1.0)
    _scale_fp8_(layer.h_proj, 2.0 ** -3)
    hc = target.model.hc_head
    layer.hc_head_fn.copy_(hc.hc_fn)
    layer.hc_head_base.copy_(hc.hc_base)
    layer.hc_head_scale.copy_(hc.hc_scale)
    layer.shared_head.norm.weight.copy_(target.model.norm.weight)
    block = layer.mtp_block
    _scale_fp8_(block.attn.wo_b, 2.0 ** -3)
    _scale_fp8_(block.ffn.shared_experts.down_proj, 2.0 ** -3)
    scale = block.ffn.experts.w2_weight_scale
    scale.copy_((scale.float() * 2.0 ** -3).to(scale.dtype))
    mtp.model.embed_tokens.weight.copy_(target.model.embed_tokens.weight.float())
    layer.shared_head.head.weight.copy_(target.lm_head.weight.float())
    write_release_like(mtp, folder, num_shards=4, main_layers=2)
    return str(folder)
