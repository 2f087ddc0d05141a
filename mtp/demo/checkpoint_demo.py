"""``mtp demo``: the library end to end in a few seconds on a CPU.

1. Build the embedded tiny checkpoint: the ``tiny`` preset with seeded random weights
   (``mtp.testing.init_random_``) written in the official on-disk format (FP8 weights with E8M0
   block scales, packed FP4 experts, sharded safetensors with an index, placeholder main-model
   layers the loader skips) by ``mtp.testing.write_release_like``.
2. Load it with ``Drafter.from_pretrained``, exactly as a real release is loaded (the loader
   opens only the shards that hold the MTP layer, embedding and head).
3. Draft for a few sequences of different lengths in one batched call, then a few rounds as a
   decode loop would: pretend the target accepted some drafts, re-feed the verified rows and
   draft again. The target residuals are seeded random stand-ins, and so are the weights: the
   drafts are arbitrary tokens. The point is the calls, the bookkeeping and the timings; the
   guide (docs/guide.md) runs a full loop with a target and real acceptance.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable

import torch

from ..config import MTPConfig
from ..drafter import Drafter
from ..model import DeepSeekV4MTP
from ..sampling import Sampling
from ..testing import init_random_

PROMPT_LENGTHS = (5, 13, 40, 7, 21, 3, 30, 11)  # one per sequence, cycled


def write_tiny_checkpoint(folder: str | os.PathLike, seed: int = 0, *,
                          overwrite: bool = False) -> str:
    """The embedded tiny checkpoint: random ``tiny`` weights, release layout (4 shards: the
    embedding, a main-model placeholder layer the drafter skips, the head, the MTP layer).
    ``overwrite`` replaces a checkpoint already in ``folder`` (otherwise refused)."""
    from ..testing import write_release_like

    model = init_random_(DeepSeekV4MTP(MTPConfig.from_name("tiny")), seed=seed)
    write_release_like(model, folder, num_shards=4, main_layers=2, overwrite=overwrite)
    return os.fspath(folder)


def _folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(*, out: str | None = None, seqs: int = 3, k: int = 3, rounds: int = 3,
        device: str = "cpu", dtype: torch.dtype = torch.float32, temperature: float = 0.0,
        seed: int = 0, echo: Callable[[str], None] = print, overwrite: bool = False) -> Drafter:
    """Run the demo, printing through ``echo``; returns the drafter (for tests)."""
    if seqs < 1 or k < 1 or rounds < 1:
        raise ValueError("seqs, k and rounds must be >= 1")
    with tempfile.TemporaryDirectory(prefix="mtp-demo-") as tmp:
        folder = out or tmp
        t0 = time.perf_counter()
        write_tiny_checkpoint(folder, seed, overwrite=overwrite)
        echo(f"checkpoint  {folder}: tiny preset, random weights (seed {seed}), "
             f"{_folder_bytes(folder) / 2**20:.1f} MiB in {len(os.listdir(folder)) - 2} shards, "
             f"built and written in {1e3 * (time.perf_counter() - t0):.0f} ms")
        drafter = Drafter.from_pretrained(folder, device=device, dtype=dtype, max_seqs=seqs,
                                          max_draft_tokens=k)
    echo(f"loaded      {drafter.load_report}")
    cfg = drafter.config
    echo(f"drafter     {drafter}")
    _warm_up(drafter)
    _decode_rounds(drafter, cfg, seqs, k, rounds, temperature, seed, echo)
    return drafter


def _warm_up(drafter: Drafter) -> None:
    """One stateless forward + logits outside the drafter (its state stays untouched), so the
    timings below do not include torch's first-call setup."""
    cfg, dev = drafter.config, drafter.device
    x = drafter.model(torch.zeros(1, dtype=torch.long, device=dev),
                      torch.zeros(1, dtype=torch.long, device=dev),
                      torch.zeros(1, cfg.hc_dim, device=dev, dtype=drafter.model.dtype))
    drafter.model.compute_logits(x)
    _sync(dev)


def _decode_rounds(drafter: Drafter, cfg: MTPConfig, seqs: int, k: int, rounds: int,
                   temperature: float, seed: int, echo) -> None:
    dev = drafter.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    sampling = Sampling(temperature=temperature, generator=gen) if temperature > 0 else Sampling()

    def target_rows(counts: list[int]):
        """Stand-ins for what the target hands over: residuals and next tokens."""
        t = sum(counts)
        h = torch.randn(t, cfg.hc_dim, generator=gen, device=dev).to(drafter.model.dtype)
        ids = torch.randint(0, cfg.vocab_size, (t,), generator=gen, device=dev)
        return h, ids

    ids = list(range(seqs))
    counts = [PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)] for i in ids]
    for i in ids:
        drafter.add_sequence(i)
    mode = "greedy" if sampling.greedy else f"sampled at temperature {temperature}"
    echo(f"sequences   {seqs}, prompt lengths {counts}; k = {k} drafts each, {mode}")
    for r in range(rounds):
        starts = [drafter.next_position(i) for i in ids]
        positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, counts)]).to(dev)
        h, next_ids = target_rows(counts)
        _sync(dev)
        t0 = time.perf_counter()
        p = drafter.propose(ids, h, next_ids, positions, counts, k=k, sampling=sampling)
        _sync(dev)
        ms = 1e3 * (time.perf_counter() - t0)
        what = "catch-up" if r == 0 else "re-feed"
        fed = sum(min(n, cfg.sliding_window) for n in counts)
        trimmed = "" if fed == sum(counts) else \
            f" ({fed} after keeping the last W = {cfg.sliding_window} per sequence)"
        echo(f"round {r + 1}     {what} {sum(counts)} rows{trimmed} + {k - 1} draft step(s), "
             f"{seqs} sequences batched: {ms:.1f} ms")
        for j, i in enumerate(ids):
            echo(f"  seq {i}  positions {starts[j]}..{starts[j] + counts[j] - 1}  ->  drafts "
                 f"{p.drafts[j].tolist()} for positions {starts[j] + counts[j] + 1}.."
                 f"{starts[j] + counts[j] + k}")
        # Pretend the target accepted a different number of drafts per sequence; the next
        # round re-feeds those rows and the target's own token with real residuals.
        counts = [(r + j) % (k + 1) + 1 for j in range(seqs)]
    echo("done        (random weights and residuals: the tokens are arbitrary; see "
         "docs/guide.md for a full loop with a target and acceptance rates)")


__all__ = ["run", "write_tiny_checkpoint"]
