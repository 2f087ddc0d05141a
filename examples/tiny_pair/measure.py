"""Measure the tiny pair on held-out code: acceptance per draft position and mean accepted
length for k = 1..4, greedy and sampled (temperature 1), per drafter; and the CPU speedup.

    python examples/tiny_pair/measure.py --weights runs/pair --out docs/acceptance.json

Drafters, all against the bf16 target (the trained weights, plain arithmetic), except the last:
``bf16 joint`` (the MTP layer trained with the target), ``bf16 post-hoc`` (fitted afterwards
against the frozen target), ``FP8/FP4`` (the shipped MTP layer, release format and numerics),
``last row`` (the joint layer fed only the newest row, no catch-up), ``bigram`` (the training
set's byte bigrams); ``shipped pair``: the shipped FP8/FP4 target with its shipped MTP layer
(what ``mtp demo`` runs).

Prompts: the held-out prompts shipped with ``mtp.demo`` (from the held-out files).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baselines  # noqa: E402
import corpus as corpus_lib  # noqa: E402
from export import load_plain  # noqa: E402

from mtp.demo.pair import data_folder, load_target  # noqa: E402
from mtp.demo.pair_config import PAIR_CONFIG  # noqa: E402
from mtp.demo.prompts import heldout_prompts  # noqa: E402
from mtp.drafter import Drafter  # noqa: E402
from mtp.model import DeepSeekV4MTP  # noqa: E402
from mtp.sampling import Sampling  # noqa: E402
from mtp.speculative import generate  # noqa: E402


def drafters(args, target_bf16):
    """name -> (target, drafter factory)."""
    _, joint = load_plain(args.weights + "/target_A.pt", args.weights + "/mtp_A_joint.pt")
    _, posthoc = load_plain(args.weights + "/target_A.pt", args.weights + "/mtp_A_posthoc.pt")
    for m in (joint, posthoc):  # share the bf16 target's embedding and head
        m.model.embed_tokens.weight = target_bf16.embed.weight
        m.layer(0).shared_head.head.weight = target_bf16.head.weight
    fp8 = Drafter.from_pretrained(data_folder(), dtype=torch.float32, max_seqs=args.prompts,
                                  embed_tokens=target_bf16.embed.weight,
                                  head=target_bf16.head.weight)
    data = corpus_lib.load(args.snapshot)
    shipped_target = load_target(data_folder(), max_extend=5)
    shipped = Drafter.from_pretrained(data_folder(), dtype=torch.float32, max_seqs=args.prompts,
                                      embed_tokens=shipped_target.embed.weight,
                                      head=shipped_target.head.weight)

    def mk(m: DeepSeekV4MTP):
        return Drafter(m, max_seqs=args.prompts, max_draft_tokens=4)

    return {
        "bf16 joint": (target_bf16, mk(joint)),
        "bf16 post-hoc": (target_bf16, mk(posthoc)),
        "FP8/FP4 joint": (target_bf16, fp8),
        "last row (no catch-up)": (target_bf16, baselines.LastRowDrafter(mk(joint))),
        "bigram": (target_bf16, baselines.BigramDrafter(data.stream("train"),
                                                        PAIR_CONFIG.vocab_size)),
        "shipped pair (FP8/FP4 target)": (shipped_target, shipped),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", required=True, help="train.py's output folder")
    ap.add_argument("--snapshot", help="corpus snapshot (for the bigram baseline)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--only", default="", help="comma-separated drafter names")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    target_bf16, _ = load_plain(args.weights + "/target_A.pt", args.weights + "/mtp_A_joint.pt")
    target_bf16.max_extend = 5
    prompts = heldout_prompts()[:args.prompts]
    results = {"prompts": len(prompts), "new_tokens": args.new_tokens,
               "python": platform.python_version(), "torch": torch.__version__, "rows": []}
    for name, (target, drafter) in drafters(args, target_bf16).items():
        if args.only and name not in args.only.split(","):
            continue
        for mode in ("greedy", "sampled"):
            for k in (1, 2, 3, 4):
                sampling = Sampling() if mode == "greedy" else \
                    Sampling(temperature=1.0, generator=torch.Generator().manual_seed(k))
                t0 = time.perf_counter()
                _, st = generate(target, drafter, prompts, args.new_tokens, k=k,
                                 sampling=sampling)
                row = {"drafter": name, "mode": mode, "k": k,
                       "acceptance": [round(a, 4) for a in st.acceptance_per_position],
                       "mean_accepted_length": round(st.mean_accepted_length, 4),
                       "verifications": st.verifications,
                       "seconds": round(time.perf_counter() - t0, 2)}
                print(json.dumps(row), flush=True)
                results["rows"].append(row)
                with open(args.out, "w") as f:
                    json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
