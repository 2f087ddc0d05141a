"""Start a real process group (gloo, or NCCL on GPUs) on 127.0.0.1 for a test, and always
come back.

:func:`launch` starts one ``parallel_worker.py`` process per rank on a free port and waits,
bounded twice: once any rank exits with an error, the others get ``grace`` seconds (they may be
blocked in a collective with it) and are then killed; after ``timeout`` seconds every rank
still running is killed. Each rank's output goes to a log file that failures print.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "parallel_worker.py")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Launch:
    returncodes: list[int]
    results: list[dict | None]  # per rank: what it saved, None if it saved nothing
    logs: list[str]
    seconds: float
    killed: list[int]  # ranks killed by the harness

    def check(self) -> list[dict]:
        """Every rank's results, or an AssertionError with the logs of the failed ranks."""
        bad = [r for r, rc in enumerate(self.returncodes) if rc != 0 or self.results[r] is None]
        if bad:
            raise AssertionError("\n".join(f"rank {r} (exit {self.returncodes[r]}):\n"
                                           f"{self.logs[r][-3000:]}" for r in bad))
        return self.results


def launch(world: int, cases: list[dict], tmp_path, *, timeout: float = 240,
           grace: float = 15, collective_timeout: int = 60, backend: str = "gloo",
           spec: dict | None = None) -> Launch:
    """``spec``: more switches for the workers (``parallel_worker.py`` lists them)."""
    outdir = tmp_path / f"ranks{world}-{time.monotonic_ns()}"
    outdir.mkdir()
    spec_file = outdir / "spec.json"
    spec_file.write_text(json.dumps({**(spec or {}), "cases": cases,
                                     "timeout": collective_timeout, "backend": backend}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           # NVLink multicast stays off (on shared hosts it can take the GPUs out of service)
           "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "NVSHMEM_DISABLE_NVLS": "1"}
    port = free_port()
    logs = [outdir / f"rank{r}.log" for r in range(world)]
    t0 = time.monotonic()
    procs = []
    for r in range(world):
        with open(logs[r], "wb") as log:
            procs.append(subprocess.Popen(
                [sys.executable, WORKER, str(r), str(world), str(port), str(spec_file),
                 str(outdir)],
                stdout=log, stderr=subprocess.STDOUT, env=env))
    killed, failed_at = [], None
    try:
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                failed_at = now
            if now - t0 > timeout or (failed_at is not None and now - failed_at > grace):
                for r, p in enumerate(procs):
                    if p.poll() is None:
                        p.kill()
                        killed.append(r)
                break
            time.sleep(0.05)
    finally:
        for p in procs:  # also on KeyboardInterrupt / a harness error: no orphans
            if p.poll() is None:
                p.kill()
            p.wait()
    results = []
    for r in range(world):
        f = outdir / f"rank{r}.pt"
        results.append(torch.load(f, weights_only=False) if f.exists() else None)
    return Launch([p.returncode for p in procs], results,
                  [f.read_text(errors="replace") for f in logs], time.monotonic() - t0, killed)
