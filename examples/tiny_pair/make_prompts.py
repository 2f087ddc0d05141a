"""Write the held-out prompts shipped with ``mtp.demo`` (used by ``mtp demo``, the lossless
test and ``measure.py``): one snippet per held-out file, 64 of them, each starting at the line
nearest a third of the file and 128 bytes long (cut back to a whole line when one ends in the
last 48 bytes), so that anyone can measure on exactly these prompts, whatever their Python.

    python examples/tiny_pair/make_prompts.py --snapshot corpus.tar.gz \
        mtp/demo/data/heldout_prompts.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import corpus as corpus_lib  # noqa: E402

N, LENGTH = 64, 128


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--snapshot")
    ap.add_argument("out")
    args = ap.parse_args(argv)
    data = corpus_lib.load(args.snapshot)
    prompts = []
    for f in data.heldout:
        raw = data.texts[f]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if not text.isascii() or len(text) < 3 * LENGTH:
            continue
        start = text.rfind("\n", 0, len(text) // 3) + 1
        snippet = text[start:start + LENGTH]
        cut = snippet.rfind("\n")
        if cut >= LENGTH - 48:
            snippet = snippet[:cut + 1]
        prompts.append({"file": f, "offset": start, "text": snippet})
        if len(prompts) == N:
            break
    info = data.describe()
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump({"about": "held-out prompts of the tiny pair: snippets of the held-out files "
                            "of the Python standard library split (examples/tiny_pair)",
                   "python": info["python"], "split_sha256": info["sha256"],
                   "prompts": prompts}, fh, indent=1)
    print(f"{len(prompts)} prompts -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
