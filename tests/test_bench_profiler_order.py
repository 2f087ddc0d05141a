"""The benchmarks that profile refuse to profile one preset before measuring the next: once
torch.profiler has run in a process, each later CUDA launch costs the host several times
more (``benchmarks/graph_launch.py --after-profiler``; docs/performance.md, "A profiler slows
every later launch"), so the second preset's host and alone times would time the profiler. The
refusal comes from the arguments alone, before any GPU work (this runs on the CPU)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script, flag", [("bench_draft_step.py", "--profile=1"),
                                          ("ab_drafter.py", "--profile=3"),
                                          ("ab_drafter.py", "--timeline=2")])
def test_profiling_takes_one_preset(script, flag):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script),
                          "--preset", "flash,pro", flag], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2, run.stderr
    assert "one preset per run (--preset)" in run.stderr
    assert "graph_launch.py --after-profiler" in run.stderr
