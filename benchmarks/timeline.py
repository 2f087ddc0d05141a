"""A call's GPU timeline from torch.profiler's Chrome trace: where its wall time goes between
the kernels, which a table of kernel sums cannot show (an overlapped kernel is counted once per
stream there, a gap not at all).

Each timed call is preceded by ``torch.cuda._sleep`` (its ``spin_kernel`` marks where a call
starts and keeps the GPU busy while the host enqueues it), so the kernels between two markers
are one call's. Per call: its span (first kernel's start to last kernel's end), the time some
kernel runs (the union of their intervals), the kernels' summed time (more than the union
where two streams overlap, or where programmatic dependent launch starts a kernel early: it
is timed from then, its wait for the kernel before included) and the largest idle gaps with
the kernels either side.

:func:`per_name` and :func:`compare` put two calls side by side kernel by kernel (say a
catch-up against the one-row call of the same sequences), to find where one spends more.

Usage: ``ab_drafter.py --timeline N --trace-dir DIR`` (GPU); then, on any machine,
``python benchmarks/timeline.py DIR/a.json`` (the summary) or ``python benchmarks/timeline.py
DIR/a.json DIR/b.json`` (the comparison of b against a).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass

__all__ = ["Kernel", "calls", "compare", "load", "per_name", "summarize", "timeline"]

MARKER = "spin_kernel"  # in the name of torch.cuda._sleep's kernel (at::cuda::...::spin_kernel)
GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


@dataclass(frozen=True)
class Kernel:
    name: str
    start: float  # us
    end: float
    stream: int


def load(path: str) -> list[Kernel]:
    """The GPU work of a Chrome trace (``profile.export_chrome_trace``), by start time."""
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    return sorted((Kernel(e["name"], float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)),
                          int(e.get("args", {}).get("stream", -1)))
                   for e in events if e.get("ph") == "X" and e.get("cat") in GPU_CATS),
                  key=lambda k: k.start)


def calls(kernels: list[Kernel]) -> list[list[Kernel]]:
    """The kernels after each marker, up to the next marker (the last call: to the end)."""
    out: list[list[Kernel]] = []
    for k in kernels:
        if MARKER in k.name:
            out.append([])
        elif out:
            out[-1].append(k)
    return [c for c in out if c]


def timeline(call: list[Kernel], gaps: int = 6) -> dict:
    """One call's span, busy time (the union of its kernels' intervals), summed kernel time,
    idle time (span - busy) and its ``gaps`` largest idle intervals (us, before, after)."""
    ordered = sorted(call, key=lambda k: k.start)
    busy, holes = 0.0, []
    cur_s, cur_e, last = ordered[0].start, ordered[0].end, ordered[0]
    for k in ordered[1:]:
        if k.start > cur_e:  # a hole: nothing runs from cur_e to k.start
            busy += cur_e - cur_s
            holes.append((k.start - cur_e, last.name, k.name))
            cur_s = k.start
        if k.end >= cur_e:
            cur_e, last = k.end, k
    busy += cur_e - cur_s
    span = max(k.end for k in ordered) - ordered[0].start
    streams: dict[int, float] = {}
    for k in ordered:
        streams[k.stream] = streams.get(k.stream, 0.0) + k.end - k.start
    holes.sort(reverse=True)
    return dict(kernels=len(ordered), span_us=span, busy_us=busy, idle_us=span - busy,
                summed_us=sum(streams.values()), streams_us=streams, holes=len(holes),
                largest_gaps=holes[:gaps])


def summarize(kernels: list[Kernel], gaps: int = 6) -> str:
    """The median call's figures over the traced calls, and the gaps of the median-span call."""
    per = [timeline(c, gaps) for c in calls(kernels)]
    if not per:
        return "no calls (no marker kernel in the trace)"
    med = {key: statistics.median(t[key] for t in per)
           for key in ("kernels", "span_us", "busy_us", "idle_us", "summed_us", "holes")}
    mid = sorted(per, key=lambda t: t["span_us"])[len(per) // 2]
    lines = [f"{len(per)} calls, median: " + ", ".join(f"{k} {v:.1f}" for k, v in med.items()),
             "streams (median call): " + ", ".join(f"{s}: {v:.1f} us"
                                                    for s, v in mid["streams_us"].items())]
    lines += [f"  gap {g:7.1f} us  after {a[:70]}  before {b[:70]}"
              for g, a, b in mid["largest_gaps"]]
    return "\n".join(lines)


def per_name(kernels: list[Kernel]) -> dict[str, float]:
    """Each kernel name's GPU time per call: the median over the traced calls of the summed
    durations of its launches in the call (0 in a call without it), us."""
    cs = calls(kernels)
    names = {k.name for c in cs for k in c}
    return {n: statistics.median(sum(k.end - k.start for k in c if k.name == n) for c in cs)
            for n in names}


def compare(a: list[Kernel], b: list[Kernel], top: int = 25, width: int = 80) -> str:
    """Call b against call a, kernel name by kernel name (:func:`per_name`): the ``top`` names
    whose time differs most, then the totals; each name cut to ``width`` characters."""
    pa, pb = per_name(a), per_name(b)
    names = sorted(set(pa) | set(pb), key=lambda n: (-abs(pb.get(n, 0.0) - pa.get(n, 0.0)), n))
    lines = [f"{'a us':>9} {'b us':>9} {'b - a':>9}  kernel"]
    for n in names[:top]:
        x, y = pa.get(n, 0.0), pb.get(n, 0.0)
        lines.append(f"{x:9.1f} {y:9.1f} {y - x:+9.1f}  {n[:width]}")
    x, y = sum(pa.values()), sum(pb.values())
    lines.append(f"{x:9.1f} {y:9.1f} {y - x:+9.1f}  (all {len(names)} names, medians summed)")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if len(sys.argv) not in (2, 3):
        sys.exit("usage: timeline.py TRACE.json [OTHER.json]")
    first = load(sys.argv[1])
    print(summarize(first) if len(sys.argv) == 2 else compare(first, load(sys.argv[2])))
