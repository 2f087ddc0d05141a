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


def test_experts_parts_variants_apply():
    """bench_experts_parts.py's kernel variants: each replaces text found exactly once in the
    kernel source as it is now (so a kernel change cannot leave a variant measuring something
    else unawares), and only the "as-is" variant leaves the source unchanged."""
    from pathlib import Path

    import pytest
    from bench_experts_parts import VARIANTS, variant_source
    root = Path(__file__).resolve().parents[1]
    src = (root / "kernels" / "moe_fp4.cu").read_text()
    for name in VARIANTS:
        assert (variant_source(src, name) == src) == (name == "as-is"), name
    with pytest.raises(ValueError, match="occurs 0 times"):
        variant_source(src.replace("e2m1x8_f16(wa, fa);", "e2m1x8_f16(wa,fa);"), "no-math")
