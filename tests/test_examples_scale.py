"""``--examples-scale`` (conftest.py): a scaled property test really draws more, fresh cases."""

from __future__ import annotations

import conftest
from hypothesis import given, settings
from hypothesis import strategies as st


def _counting_test(max_examples: int):
    drawn = []

    @settings(max_examples=max_examples, derandomize=True, database=None)
    @given(st.integers(0, 2**62))
    def prop(x):
        drawn.append(x)

    return prop, drawn


def test_scale_multiplies_the_tests_own_max_examples():
    # A space of 2^62 integers is not exhausted by 40 draws, so hypothesis runs exactly
    # max_examples cases (derandomized: the same ones every run).
    prop, drawn = _counting_test(5)
    prop()
    assert len(drawn) == 5
    drawn.clear()
    conftest.scale_examples(prop, 8)
    prop()
    assert len(drawn) == 40


def test_scaled_runs_are_seeded_at_random():
    # Derandomized, two runs draw the same cases; scaled, each run seeds itself afresh. After
    # the first (0), a run's draws spread over bit sizes up to 62 (one run: 19 .. 2.5e12), so
    # two runs alike in all 19 by chance: negligible.
    prop, drawn = _counting_test(10)
    prop()
    first = list(drawn)
    drawn.clear()
    prop()
    assert drawn == first
    conftest.scale_examples(prop, 2)
    runs = []
    for _ in range(2):
        drawn.clear()
        prop()
        runs.append(list(drawn))
    assert runs[0] != runs[1]
