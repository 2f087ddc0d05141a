"""benchmarks/timeline.py: a call's busy time, idle gaps and summed kernel time from a Chrome
trace, against hand-worked traces and a brute-force union over integer microseconds."""

import json
import os
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))

from timeline import (  # noqa: E402
    MARKER,
    Kernel,
    calls,
    compare,
    load,
    per_name,
    summarize,
    timeline,
)


def event(name, ts, dur, stream=7, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}


def test_two_calls_from_a_trace_file(tmp_path):
    # call 1: a [10, 20) on stream 7, b [15, 30) on stream 9 (overlapping a), c [40, 45):
    # span 35, busy 25 (10-30 and 40-45), summed 30, one gap of 10 after b before c.
    # call 2: d [100, 101), a memcpy [103, 104). CPU events and the markers are not work.
    trace = {"traceEvents": [
        event("at::cuda::(anonymous namespace)::spin_kernel(long)", 0, 9), event("a", 10, 10),
        event("b", 15, 15, stream=9), event("c", 40, 5),
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 12, "dur": 50},
        event(MARKER, 60, 39), event("d", 100, 1), event("copy", 103, 1, cat="gpu_memcpy"),
    ]}
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    first, second = calls(load(str(path)))
    t = timeline(first)
    assert (t["kernels"], t["span_us"], t["busy_us"], t["idle_us"], t["summed_us"]) == \
        (3, 35.0, 25.0, 10.0, 30.0)
    assert t["streams_us"] == {7: 15.0, 9: 15.0}
    assert t["largest_gaps"] == [(10.0, "b", "c")]
    t2 = timeline(second)
    assert (t2["span_us"], t2["busy_us"], t2["largest_gaps"]) == (4.0, 2.0, [(2.0, "d", "copy")])
    assert "2 calls" in summarize(load(str(path)))


def test_no_marker_no_calls():
    assert calls([Kernel("a", 0, 1, 7)]) == []
    assert summarize([Kernel("a", 0, 1, 7)]).startswith("no calls")


intervals = st.lists(st.tuples(st.integers(0, 60), st.integers(0, 12), st.integers(0, 2)),
                     min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(intervals)
def test_busy_time_is_the_union_of_the_intervals(spec):
    ks = [Kernel(f"k{i}", float(s), float(s + d), stream) for i, (s, d, stream) in enumerate(spec)]
    t = timeline(ks)
    covered = {u for k in ks for u in range(int(k.start), int(k.end))}  # unit cells run by some k
    assert t["busy_us"] == len(covered)
    assert t["summed_us"] == sum(d for _, d, _ in spec)
    first, last = min(s for s, _, _ in spec), max(s + d for s, d, _ in spec)
    assert t["span_us"] == last - first
    assert t["idle_us"] == t["span_us"] - len(covered)
    assert sum(g for g, _, _ in t["largest_gaps"]) <= t["idle_us"]
    assert t["holes"] <= len(ks) - 1


def test_kernels_that_abut_leave_no_gap():
    t = timeline([Kernel("a", 0.0, 5.0, 7), Kernel("b", 5.0, 8.0, 7)])
    assert (t["busy_us"], t["idle_us"], t["holes"], t["largest_gaps"]) == (8.0, 0.0, 0, [])


def _calls(*spec):
    """Kernels of consecutive calls: each call a list of (name, duration), one after another."""
    out, t = [], 0.0
    for call in spec:
        out.append(Kernel(MARKER, t, t + 1, 7))
        t += 1
        for name, dur in call:
            out.append(Kernel(name, t, t + dur, 7))
            t += dur
    return out


def test_per_name_is_the_median_call_of_each_name():
    # three calls: "a" twice (1 + 2) then 5 then 4 (median 4); "b" 10, absent, 30 (median 10)
    ks = _calls([("a", 1), ("a", 2), ("b", 10)], [("a", 5)], [("a", 4), ("b", 30)])
    assert per_name(ks) == {"a": 4.0, "b": 10.0}


def test_compare_orders_by_difference_and_totals():
    a = _calls([("gemm", 50), ("norm", 5), ("add", 27)])
    b = _calls([("gemm", 52), ("norm", 5), ("add_rows", 10)])
    lines = compare(a, b).splitlines()
    assert [ln.split()[-1] for ln in lines[1:5]] == ["add", "add_rows", "gemm", "norm"]
    assert lines[1].split()[:3] == ["27.0", "0.0", "-27.0"]
    assert lines[-1].split()[:3] == ["82.0", "67.0", "-15.0"]
    assert "(all 4 names" in lines[-1]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 9)), min_size=1, max_size=10))
def test_one_call_per_name_sums_to_its_summed_time(spec):
    ks = _calls(spec)
    (call,) = calls(ks)
    assert sum(per_name(ks).values()) == timeline(call)["summed_us"]
