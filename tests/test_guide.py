"""docs/guide.md runs as written: its python blocks, in order, in one namespace. The guide's own
assert checks the property that matters most (greedy speculative decoding emits exactly the
target's greedy tokens); this test adds checks on what the loops left behind."""

from __future__ import annotations

import pathlib

from doc_blocks import python_blocks, run_python_blocks

GUIDE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "guide.md"


def test_the_guide_runs_and_its_loops_do_what_it_says():
    blocks = python_blocks(GUIDE.read_text())
    assert len(blocks) == 4, "setup, greedy run, sampled run, trained pair: the guide lost a block"
    namespace, printed = run_python_blocks(GUIDE, blocks)
    lines = printed.strip().splitlines()
    assert len(lines) == 3 and "verifications, mean accepted length" in lines[1]
    # the greedy figures the guide prints are the ones it states
    assert lines[0] == (
        "[0.6153846153846154, 0.40384615384615385, 0.2692307692307692] 2.2884615384615383")

    drafter = namespace["drafter"]
    # The sampled run: every sequence got its 40 tokens; drafts were accepted (the matching
    # toy layer agrees often) and the drafter released its sequences.
    assert [len(o) for o in namespace["out"]] == [40, 40, 40]
    assert drafter.seq_ids == []
    # The trained pair's run: 32 tokens, more than one token per target step.
    assert len(namespace["tokens"]) == 32 and namespace["stats"].mean_accepted_length > 1
