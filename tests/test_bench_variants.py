"""benchmarks/ab_drafter.py's variants read back from JSON (``--extra``, as
``sweep_gate.py --best-out`` writes them): tuples and integer-keyed launch tables come back as
the module attributes they replace, so a variant from a file captures what one declared in
the script does."""

import json
import os
import sys

from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))

from ab_drafter import VARIANTS, _from_json  # noqa: E402


def test_declared_variants_survive_json():
    """Every declared variant that is plain data (not a function of the current value) equals
    itself after a trip through JSON; among them the gate's launch table (int keys, tuples)."""
    plain = {name: settings for name, settings in VARIANTS.items()
             if not any(callable(v) for v in settings.values())}
    assert "gate-v42" in plain and "quant-bm64" in plain
    assert _from_json(json.loads(json.dumps(plain))) == plain


launch = st.tuples(st.integers(1, 8), st.integers(16, 1024), st.integers(1, 16))
table = st.dictionaries(st.integers(1, 512), launch, min_size=1, max_size=5)
value = st.one_of(st.booleans(), st.integers(-5, 5), st.none(), launch, table)


@given(st.dictionaries(st.text("abc-", min_size=1, max_size=6),
                       st.dictionaries(st.sampled_from(["m.A", "m.B", "n.C"]), value),
                       max_size=4))
def test_any_variant_survives_json(variants):
    assert _from_json(json.loads(json.dumps(variants))) == variants
