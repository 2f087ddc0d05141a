"""Accuracy of DeepSeekV4MTP against the float64 spec reference, per compute dtype and with the
reference's FP8 rounding steps on or off (the table in docs/numerics.md).

    python benchmarks/accuracy_cpu.py
"""

from __future__ import annotations

import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
import reference as ref  # noqa: E402
from conftest import checkpoint_weights, rel_err, tiny_config  # noqa: E402

from mtp import DeepSeekV4MTP, Numerics  # noqa: E402
from mtp.testing import init_random_  # noqa: E402

SEEDS, ROWS = 8, 16


def main() -> None:
    cfg = tiny_config()
    print("| compute | rounding steps | rel. error median / max | argmax agrees |")
    print("|---|---|---|---|")
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        for rounding in (False, True):
            errs, agree = [], 0
            for seed in range(SEEDS):
                model = init_random_(DeepSeekV4MTP(cfg, dtype=dtype, numerics=Numerics(
                    act_quant=rounding, kv_fp8=rounding)), seed=seed)
                weights = checkpoint_weights(model)
                gen = torch.Generator().manual_seed(seed)
                h = torch.randn(ROWS, cfg.hc_dim, generator=gen)
                ids = torch.randint(0, cfg.vocab_size, (ROWS,), generator=gen)
                pos = torch.arange(ROWS)
                x = model(ids, pos, h)
                r = ref.mtp_layer(h.double(), ids, pos, weights, cfg, rounding, rounding)
                errs.append(rel_err(x, r))
                logits, ref_logits = model.compute_logits(x), ref.mtp_logits(r, weights, cfg)
                agree += int((logits.argmax(-1) == ref_logits.argmax(-1)).sum())
            errs.sort()
            print(f"| {str(dtype)[6:]} | {'on' if rounding else 'off'} | "
                  f"{errs[SEEDS // 2]:.1e} / {errs[-1]:.1e} | {agree / (SEEDS * ROWS):.1%} |")


if __name__ == "__main__":
    main()
