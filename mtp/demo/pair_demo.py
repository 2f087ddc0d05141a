"""``mtp demo``: the trained tiny pair continues a held-out Python snippet by speculative
decoding, and says how many drafts were accepted and what that saved.

Loads the shipped pair (``load_tiny_pair``: the release format, the real loader), decodes with
``mtp.speculative.generate`` and again with the target alone, and prints the continuation, the
acceptance per draft position, the mean accepted length (tokens per target verification) and
the wall-clock speedup of speculative over plain decoding.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch

from ..sampling import Sampling
from ..speculative import generate
from .pair import data_folder, load_tiny_pair
from .prompts import heldout_snippets
from .tokenizer import TOKENIZER


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# The held-out snippet the demo continues by default (idlelib/redirector.py: a method ends,
# the next begins, and the pair writes one).
DEMO_PROMPT = 25


def run_pair(*, prompt: int | str = DEMO_PROMPT, k: int = 3, max_new_tokens: int = 64,
             temperature: float = 0.0, device: str = "cpu", seed: int = 0,
             echo: Callable[[str], None] = print) -> dict:
    """Run the demo, printing through ``echo``; returns the figures (for tests).

    ``prompt``: the index of a shipped held-out snippet, or any text."""
    snippets = heldout_snippets()
    if isinstance(prompt, int):
        if not 0 <= prompt < len(snippets):
            raise ValueError(f"prompt: expected an index in [0, {len(snippets)}) (a held-out "
                             f"snippet) or a text, got {prompt}")
        text, where = snippets[prompt]["text"], f"held-out file {snippets[prompt]['file']}"
    else:
        text, where = prompt, "your text"
    ids = TOKENIZER.encode(text)
    if not ids:
        raise ValueError("prompt: empty text; give a few characters of Python")
    folder = data_folder()
    (target, drafter), load_s = _timed(lambda: load_tiny_pair(device, max_seqs=1,
                                                              max_draft_tokens=max(k, 4)))
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    report = drafter.load_report
    echo(f"pair        a 4-layer V4-shaped target + its MTP layer, trained on Python's stdlib; "
         f"FP8/FP4 release format, {size / 2**20:.1f} MiB; drafter read "
         f"{len(report.shards_opened)} of {len(report.shards_opened) + len(report.shards_skipped)}"
         f" shards; loaded in {load_s:.2f} s")

    def sampling():
        if temperature == 0:
            return Sampling()
        gen = torch.Generator(device).manual_seed(seed)
        return Sampling(temperature=temperature, generator=gen)

    generate(target, drafter, ids[:8], 4, k=k)  # warm-up: torch's first-call setup untimed
    (spec, stats), spec_s = _timed(lambda: generate(target, drafter, ids, max_new_tokens, k=k,
                                                    sampling=sampling()))
    (plain, _), plain_s = _timed(lambda: generate(target, None, ids, max_new_tokens,
                                                  sampling=sampling()))
    mode = "greedy" if temperature == 0 else f"sampled at temperature {temperature}"
    echo(f"prompt      ({where})")
    echo(_indent(text))
    echo(f"continued   ({max_new_tokens} tokens, {mode}, k = {k} drafts per verification)")
    echo(_indent(TOKENIZER.decode(spec)))
    per = " ".join(f"{a:.2f}" for a in stats.acceptance_per_position)
    echo(f"acceptance  per draft position [{per}] over {stats.verifications} verifications; "
         f"mean accepted length {stats.mean_accepted_length:.2f} tokens per target step")
    same = "identical to plain decoding" if spec == plain else \
        "sampled: plain decoding drew other tokens"
    echo(f"speedup     {spec_s:.2f} s speculative vs {plain_s:.2f} s plain on {device}: "
         f"{plain_s / spec_s:.2f}x ({same})")
    return {"tokens": spec, "plain": plain, "stats": stats, "spec_s": spec_s,
            "plain_s": plain_s}


def _indent(text: str) -> str:
    return "\n".join("  | " + line for line in text.rstrip("\n").split("\n"))


__all__ = ["DEMO_PROMPT", "run_pair"]
