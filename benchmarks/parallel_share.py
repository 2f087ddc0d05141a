"""What each tensor-parallel rank holds and reads per draft step, at the real V4 shapes (CPU).

For each world size: the rank's resident parameter bytes by part (from the module's parameter
shapes and each parameter's split, ``mtp.facts.ParamFacts.tp``; the tests measure the same rule
on real ranks at the tiny shapes), the bytes one decode step (batch 1) reads on the busiest rank if
every rank computed the whole shared expert, and the share of that step the shared expert is:
the figures behind computing it split (docs/parallel.md). With ``--time``: CPU time of the
whole shared expert, of a world-8 rank's part of it and of its LM-head slice, at one row.

Usage:
    python benchmarks/parallel_share.py --preset flash --time
"""

from __future__ import annotations

import argparse
import time

import torch

from mtp import DeepSeekV4MTP, MTPConfig
from mtp.facts import facts_of
from mtp.model import Linear, SharedExperts
from mtp.ops import matmul as linear
from mtp.parallel import valid_world_sizes
from mtp.quant import WeightFormat

PARTS = (("embed", "embed_tokens."), ("head", "shared_head.head."),
         ("shared expert", "shared_experts."), ("routed experts", "ffn.experts."),
         ("attention (split)", ("wq_b", "wo_a", "wo_b", "attn_sink")),
         ("e_proj + h_proj", ("e_proj", "h_proj")), ("other (whole)", ""))


def part_of(name: str) -> str:
    for part, keys in PARTS:
        if any(k in name for k in ((keys,) if isinstance(keys, str) else keys)):
            return part
    raise AssertionError(name)


def rank_bytes(cfg: MTPConfig, world: int) -> dict[str, int]:
    model = DeepSeekV4MTP(cfg, weight_format=WeightFormat.released(), dtype=torch.bfloat16,
                          device="meta")
    out = {part: 0 for part, _ in PARTS}
    facts = facts_of(model)
    for name, p in model.named_parameters():
        n = p.numel() * p.element_size()
        out[part_of(name)] += n // world if facts[name].tp is not None else n
    return out


def step_reads(cfg: MTPConfig, held: dict[str, int], world: int) -> int:
    """Bytes one rank reads for one row: every held tensor but the embedding (one row of it)
    and the routed experts, of which the row uses K: the busiest rank runs min(K, E/w)."""
    per_expert = held["routed experts"] * world // cfg.n_routed_experts
    busiest = min(cfg.num_experts_per_tok, cfg.n_routed_experts // world)
    return sum(v for k, v in held.items() if k not in ("embed", "routed experts")) \
        + busiest * per_expert


def cpu_time(fn, reps: int = 5) -> float:
    fn()
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return sorted(t)[len(t) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flash")
    ap.add_argument("--time", action="store_true")
    args = ap.parse_args()
    cfg = MTPConfig.from_name(args.preset)
    mib = 1 << 20
    print(f"{args.preset}: resident parameter MiB per rank (bf16 embed/head, FP8 dense, FP4 "
          f"experts); step = one row's reads on the busiest rank")
    print(f"{'world':>5} " + " ".join(f"{p:>17}" for p, _ in PARTS) + f" {'total':>8} "
          f"{'step':>8} {'shared/step':>11}")
    for world in valid_world_sizes(cfg, 16):
        held = rank_bytes(cfg, world)
        step = step_reads(cfg, held, world)
        print(f"{world:>5} " + " ".join(f"{held[p] / mib:>17.1f}" for p, _ in PARTS)
              + f" {sum(held.values()) / mib:>8.1f} {step / mib:>8.1f} "
              f"{held['shared expert'] / step:>11.1%}")
    if args.time:
        torch.manual_seed(0)
        fmt = WeightFormat.released()
        shared = SharedExperts(cfg, fmt, torch.bfloat16)
        for lin in shared.modules():
            if isinstance(lin, Linear):
                lin.weight.data.copy_(torch.randn(lin.weight.shape).to(lin.weight.dtype))
                lin.weight_scale_inv.data.fill_(1.0)
        u = torch.randn(1, cfg.hidden_size, dtype=torch.bfloat16)
        # The module's own paths: the head slice in float32, FP8 weights dequantised per call.
        head = torch.randn(cfg.vocab_size // 8, cfg.hidden_size, dtype=torch.bfloat16)
        th = cpu_time(lambda: torch.nn.functional.linear(u.float(), head.float()))
        ts = cpu_time(lambda: shared(u, True))
        i = cfg.shared_intermediate_size
        a, b = 0, i // 8  # a world-8 rank's part, as SharedExperts computes it when split
        up = shared.gate_up_proj

        def part():
            g = linear(u, up.dequantized(rows=(a, b)), True)
            v = linear(u, up.dequantized(rows=(i + a, i + b)), True)
            h = torch.nn.functional.silu(g.float()) * v.float()
            return linear(h.to(u.dtype), shared.down_proj.dequantized(cols=(a, b)), True)

        tp_ = cpu_time(part)
        print(f"CPU ({torch.get_num_threads()} threads), one row: a world-8 rank's LM head "
              f"slice {th * 1e3:.0f} ms; the shared expert whole {ts * 1e3:.0f} ms, a world-8 "
              f"rank's eighth {tp_ * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
