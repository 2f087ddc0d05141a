"""The one read path: stored tensors (or parts of them) into destination views.

A :class:`Read` says which part of which stored tensor goes into which destination view; the
same path serves a whole-module load and a tensor-parallel rank's slices. :func:`stream` runs the
reads in blocks of whole rows (at most 16 MiB), in file order, over a few threads that read with
``os.preadv``: when the stored dtype is the destination's, the rows are whole and the
destination is contiguous host memory, the bytes go straight into it (one copy out of the page
cache); otherwise through a per-thread 16 MiB buffer that keeps the wanted columns, converts the
dtype or moves to the GPU on copy (pinned when the destination is CUDA). Every block is checked
for NaN and infinity as it passes (:func:`~mtp.checkpoint.header.check_finite`).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..surgery import Region, full_region, region_numel
from .errors import CheckpointError
from .files import open_regular
from .header import DAMAGED, DTYPES, TensorInfo, check_finite

CHUNK = 16 << 20  # bytes per read: threads share big tensors, staging buffers stay small
# Parallel reads: a page fault or a cold page-cache miss costs a core; NVMe wants a queue.
WORKERS = max(1, min(8, os.cpu_count() or 1))


@dataclass(frozen=True)
class Read:
    """Part ``region`` (per storage dim, ``(start, stop)``; None: all of it) of the stored
    tensor ``info`` into ``dest``, a view of that region's shape."""

    info: TensorInfo
    dest: torch.Tensor
    region: Region | None = None

    @property
    def part(self) -> Region:
        return self.region if self.region is not None else full_region(self.info.storage_shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the part delivered (what a rank needs, not the whole rows read)."""
        return region_numel(self.part) * self.info.nbytes // max(
            region_numel(full_region(self.info.storage_shape)), 1)


class Progress:
    """A byte counter shown as a bar (tqdm) or passed to a callback ``(done, total)``."""

    def __init__(self, total: int, progress):
        self.callback = progress if callable(progress) else None
        self.bar = None
        self.done, self.total = 0, total
        show = progress is True or (progress is None and total >= 1 << 30
                                    and sys.stderr.isatty())
        if show and self.callback is None:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # tqdm comes with huggingface_hub; without it, no bar
                return
            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading drafter")

    def update(self, n: int) -> None:
        self.done += n
        if self.callback is not None:
            self.callback(self.done, self.total)
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class ShardReader:
    """Copies rows of stored tensors into destination views, in blocks that worker threads read
    in parallel with ``os.preadv`` (see the module docstring). Opens only regular files."""

    def __init__(self, folder: str):
        self.folder = folder
        self.fds: dict[str, int] = {}
        self.local = threading.local()

    def open(self, file: str) -> None:
        if file not in self.fds:
            self.fds[file], _ = open_regular(os.path.join(self.folder, file),
                                             "a safetensors shard")

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def _read(self, info: TensorInfo, offset: int, out: torch.Tensor) -> None:
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        fd, got = self.fds[info.file], 0
        while got < len(view):
            n = os.preadv(fd, [view[got:]], offset + got)
            if not n:
                raise CheckpointError(f"{info.file}: the file ended while reading (truncated "
                                      f"since it was checked?); {DAMAGED}")
            got += n

    @staticmethod
    def blocks(info: TensorInfo, region: Region | None = None) -> list[tuple[int, int]]:
        """Row ranges of at most CHUNK bytes (at least one row) covering the region's rows."""
        shape = info.storage_shape
        r0, r1 = region[0] if region is not None else (0, shape[0])
        step = max(1, CHUNK // max(info.nbytes // max(shape[0], 1), 1))
        return [(r, min(r1, r + step)) for r in range(r0, r1, step)]

    def copy(self, read: Read, r0: int, r1: int) -> int:
        """Rows ``[r0, r1)`` of the stored tensor, cut to the read's region, into its
        destination; returns the bytes delivered."""
        info, part = read.info, read.part
        stored, shape = DTYPES[info.dtype], info.storage_shape
        row_bytes = info.nbytes // shape[0]
        offset, n = info.begin + r0 * row_bytes, (r1 - r0) * row_bytes
        out = read.dest[r0 - part[0][0]:r1 - part[0][0]]
        whole_rows = all(p == (0, s) for p, s in zip(part[1:], shape[1:], strict=True))
        if whole_rows and out.device.type == "cpu" and out.dtype == stored \
                and out.is_contiguous():
            self._read(info, offset, out)  # same bytes, same dtype: no conversion, no copy
            check_finite(out, info, r0, r1)
            return n
        buffer = getattr(self.local, "buffer", None)
        if buffer is None or buffer.numel() < n:
            buffer = torch.empty(max(n, CHUNK), dtype=torch.uint8,
                                 pin_memory=out.device.type == "cuda")
            self.local.buffer = buffer
        self._read(info, offset, buffer[:n])
        rows = buffer[:n].view(stored).view((r1 - r0,) + tuple(shape[1:]))
        check_finite(rows, info, r0, r1)
        cols = rows[(slice(None),) + tuple(slice(a, b) for a, b in part[1:])]
        out.copy_(cols)
        return cols.numel() * cols.element_size()


def stream(folder: str, reads: Sequence[Read],
           progress: bool | Callable[[int, int], None] | None = None,
           workers: int = WORKERS) -> int:
    """Run ``reads`` (blocks in file order, over a few threads); returns the bytes delivered.

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> from mtp.checkpoint.header import read_header
        >>> folder = tempfile.mkdtemp()
        >>> save_file({"w": torch.arange(12.).view(3, 4)}, f"{folder}/x.safetensors")
        >>> info = read_header(f"{folder}/x.safetensors")["w"]
        >>> dest = torch.empty(3, 2)
        >>> stream(folder, [Read(info, dest, ((0, 3), (1, 3)))])   # columns 1 and 2
        24
        >>> dest.tolist()
        [[1.0, 2.0], [5.0, 6.0], [9.0, 10.0]]
    """
    reads = sorted(reads, key=lambda r: (r.info.file, r.info.begin))
    jobs = [(r, r0, r1) for r in reads if r.info.nbytes for r0, r1 in
            ShardReader.blocks(r.info, r.region)]
    bar = Progress(sum(r.nbytes for r in reads), progress)
    reader = ShardReader(folder)
    try:
        for r in reads:
            reader.open(r.info.file)
        with torch.no_grad(), ThreadPoolExecutor(workers) as pool:
            for n in pool.map(lambda job: reader.copy(*job), jobs):
                bar.update(n)
    finally:
        reader.close()
        bar.close()
    return bar.done


__all__ = ["Read", "ShardReader", "Progress", "stream", "CHUNK", "WORKERS"]
