"""Export trained weights (``train.py``'s bf16 state dicts) as the shipped pair folder.

    python examples/tiny_pair/export.py runs/pair/target_A.pt runs/pair/mtp_A_joint.pt \\
        mtp/demo/data/tiny_pair
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from mtp.demo.pair import export_pair
from mtp.demo.pair_config import PAIR_CONFIG, PLAIN_NUMERICS, TARGET_LAYERS
from mtp.demo.toy_target import ToyTarget
from mtp.model import DeepSeekV4MTP
from mtp.quant import WeightFormat


def load_plain(target_pt: str, mtp_pt: str) -> tuple[ToyTarget, DeepSeekV4MTP]:
    """The trained bf16 weights in plain float32 modules (bf16 values convert exactly)."""
    target = ToyTarget(PAIR_CONFIG, TARGET_LAYERS, numerics=PLAIN_NUMERICS)
    target.load_state_dict({k: v.float() for k, v in torch.load(target_pt).items()})
    m = DeepSeekV4MTP(PAIR_CONFIG, weight_format=WeightFormat.plain(), numerics=PLAIN_NUMERICS,
                      embed_tokens=target.embed.weight, head=target.head.weight)
    m.load_state_dict({k: v.float() for k, v in torch.load(mtp_pt).items()})
    return target, m


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target_pt")
    ap.add_argument("mtp_pt")
    ap.add_argument("folder")
    args = ap.parse_args(argv)
    export_pair(*load_plain(args.target_pt, args.mtp_pt), args.folder)
    size = sum(os.path.getsize(os.path.join(args.folder, f)) for f in os.listdir(args.folder))
    print(f"wrote {args.folder}: {size / 2**20:.2f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
