"""Measure the tiny pair on held-out code: acceptance per draft position and mean accepted
length for k = 1..4, greedy and sampled (temperature 1), per drafter; and the CPU speedup.

    python examples/tiny_pair/measure.py --weights runs/pair --ship joint --out acceptance.json

``--weights``: ``train_gpu.sh``'s output folder (``joint/`` holds phases A and A', ``alone/``
phases B and B'). Drafters, each against the bf16 target it was trained with (plain
arithmetic), except the last: ``bf16 joint`` (A: the MTP layer trained with the target),
``bf16 post-hoc`` (A': fitted afterwards against A's frozen target), ``bf16 post-hoc, target
alone`` (B': fitted against a target trained without the MTP loss), ``FP8/FP4`` (the shipped
MTP layer, release format and numerics: the ``--ship`` variant exported), ``last row`` (the
shipped variant's bf16 layer fed only the newest row, no catch-up), ``bigram`` (the training
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

from mtp.demo.pair import data_folder, load_tiny_pair  # noqa: E402
from mtp.demo.pair_config import PAIR_CONFIG  # noqa: E402
from mtp.demo.prompts import heldout_prompts  # noqa: E402
from mtp.drafter import Drafter  # noqa: E402
from mtp.sampling import Sampling  # noqa: E402
from mtp.speculative import generate  # noqa: E402

# variant -> (target file, MTP file) under --weights
VARIANTS = {"joint": ("joint/target_A.pt", "joint/mtp_A_joint.pt"),
            "post-hoc": ("joint/target_A.pt", "joint/mtp_A_posthoc.pt"),
            "post-hoc, target alone": ("alone/target_B.pt", "alone/mtp_B_posthoc.pt")}


def drafters(args):
    """name -> a function making (target, drafter): only the measured ones are loaded."""
    def mk(variant: str):
        target, m = load_plain(*(os.path.join(args.weights, f) for f in VARIANTS[variant]))
        target.max_extend = 5
        return target, Drafter(m, max_seqs=args.prompts, max_draft_tokens=4)

    def fp8():
        target = mk(args.ship)[0]
        return target, Drafter.from_pretrained(args.folder, dtype=torch.float32,
                                               max_seqs=args.prompts,
                                               embed_tokens=target.embed.weight,
                                               head=target.head.weight)

    def last_row():
        target, drafter = mk(args.ship)
        return target, baselines.LastRowDrafter(drafter)

    def bigram():
        stream = corpus_lib.load(args.snapshot).stream("train")
        return mk(args.ship)[0], baselines.BigramDrafter(stream, PAIR_CONFIG.vocab_size)

    def shipped():  # as mtp demo loads it
        return load_tiny_pair(folder=args.folder, max_seqs=args.prompts)

    out = {f"bf16 {v}": (lambda v=v: mk(v)) for v, files in VARIANTS.items()
           if all(os.path.exists(os.path.join(args.weights, f)) for f in files)}
    out.update({"FP8/FP4 " + args.ship: fp8, "last row (no catch-up)": last_row,
                "bigram": bigram, "shipped pair (FP8/FP4 target)": shipped})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", required=True, help="train_gpu.sh's output folder")
    ap.add_argument("--ship", choices=list(VARIANTS), default="joint",
                    help="the variant exported to --folder")
    ap.add_argument("--folder", default=data_folder(), help="the exported pair")
    ap.add_argument("--snapshot", help="corpus snapshot (for the bigram baseline)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--only", default="", help="drafter names, separated by ';'")
    ap.add_argument("--ks", default="1,2,3,4", help="draft counts k")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    prompts = heldout_prompts()[:args.prompts]
    results = {"prompts": len(prompts), "new_tokens": args.new_tokens,
               "python": platform.python_version(), "torch": torch.__version__, "rows": []}
    for name, make in drafters(args).items():
        if args.only and name not in args.only.split(";"):
            continue
        target, drafter = make()
        for mode in ("greedy", "sampled"):
            for k in (int(k) for k in args.ks.split(",")):
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
