"""Plot the training loss curves and the acceptance table as PNGs (needs matplotlib, which
the library does not: ``pip install matplotlib``; plots are made once, from saved logs).

    python examples/tiny_pair/plot.py docs/tiny-pair-train-log.jsonl docs/acceptance.json docs/
"""

from __future__ import annotations

import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_losses(log_path: str, out: str) -> None:
    rows = [json.loads(line) for line in open(log_path)]
    start = next(r for r in rows if r.get("event") == "start")
    batch, seq = start["args"]["batch"], start["args"]["seq"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for phase, label in (("A", "joint"), ("A'", "post-hoc (frozen target)")):
        pts = [r for r in rows if r.get("phase") == phase and "step" in r]
        if not pts:
            continue
        steps = [r["step"] for r in pts]
        if phase == "A":
            ax.plot(steps, [r["ntp"] for r in pts], label="target next-token CE (joint)")
        ax.plot(steps, [r["mtp"] for r in pts], label=f"MTP CE (token after next), {label}")
    bigram = next((r["heldout_bits"] for r in rows if r.get("event") == "bigram"), None)
    if bigram is not None:
        ax.axhline(bigram * math.log(2), color="gray", linestyle="--",
                   label="byte bigram, held-out")
    ax.set_xlabel(f"step ({batch} x {seq} bytes)")
    ax.set_ylabel("training cross-entropy (nats / byte)")
    ax.set_title(f"tiny pair training ({start['device']}, bf16 autocast)")
    ax.set_ylim(0, 6)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "tiny-pair-loss.png"), dpi=100)


def plot_acceptance(results_path: str, out: str) -> None:
    rows = json.load(open(results_path))["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, mode in zip(axes, ("greedy", "sampled")):
        for name in dict.fromkeys(r["drafter"] for r in rows):
            pts = sorted((r["k"], r["mean_accepted_length"]) for r in rows
                         if r["drafter"] == name and r["mode"] == mode)
            ax.plot([k for k, _ in pts], [m for _, m in pts], marker="o", label=name)
        ax.set_title(f"{mode}" + (" (temperature 1)" if mode == "sampled" else ""))
        ax.set_xlabel("k (drafts per verification)")
        ax.set_xticks([1, 2, 3, 4])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean accepted length (tokens / verification)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "tiny-pair-acceptance.png"), dpi=100)


if __name__ == "__main__":
    log_path, results_path, out = sys.argv[1:4]
    plot_losses(log_path, out)
    if os.path.exists(results_path):
        plot_acceptance(results_path, out)


def markdown_tables(results_path: str) -> str:
    """The acceptance tables of docs/acceptance.md, from measure.py's JSON."""
    rows = json.load(open(results_path))["rows"]
    names = list(dict.fromkeys(r["drafter"] for r in rows))
    get = {(r["drafter"], r["mode"], r["k"]): r for r in rows}
    out = ["| drafter | mode | k=1 | k=2 | k=3 | k=4 |", "|---|---|---|---|---|---|"]
    for name in names:
        for mode in ("greedy", "sampled"):
            cells = []
            for k in (1, 2, 3, 4):
                r = get.get((name, mode, k))
                cells.append("" if r is None else f"{r['mean_accepted_length']:.2f}")
            out.append(f"| {name} | {mode} | " + " | ".join(cells) + " |")
    out += ["", "| drafter | mode | draft 1 | draft 2 | draft 3 | draft 4 |",
            "|---|---|---|---|---|---|"]
    for name in names:
        for mode in ("greedy", "sampled"):
            r = get.get((name, mode, 4))
            if r is not None:
                out.append(f"| {name} | {mode} | " +
                           " | ".join(f"{a:.2f}" for a in r["acceptance"]) + " |")
    return "\n".join(out)
