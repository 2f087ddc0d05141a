"""The one read path: stored tensors (or parts of them) into destination views.

A :class:`Read` says which part of which stored tensor goes into which destination view; the
same path serves a whole-module load and a tensor-parallel rank's slices. :func:`stream` runs the
reads in blocks of rows (at most 16 MiB), in file order, over a few threads that read with
``os.preadv``: when the stored dtype is the destination's, the rows are whole and the
destination is contiguous host memory, the bytes go straight into it (one copy out of the page
cache); otherwise through a per-thread 16 MiB buffer that converts the dtype or moves to the
GPU on copy (pinned when the destination is CUDA). A part that is not whole rows (a
tensor-parallel rank's columns) is read run by run: only the bytes inside the part leave the
page cache, one read per contiguous piece of a row. Every block is checked
for NaN and infinity as it passes (:func:`~mtp.checkpoint.header.check_finite`).
"""

from __future__ import annotations

import itertools
import math
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
        """Bytes of the part delivered (what a rank needs)."""
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
        self._read_at(self.fds[info.file], info, view, offset)

    @staticmethod
    def _read_at(fd: int, info: TensorInfo, view: memoryview, offset: int) -> None:
        """Fill ``view`` with the file's bytes from ``offset`` on."""
        got = 0
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
        if not whole_rows:  # only the part's bytes: docs/performance.md, column reads
            cols = self._read_part(read, r0, r1, out.device.type == "cuda")
        else:
            buffer = self._buffer(n, out.device.type == "cuda")
            self._read(info, offset, buffer[:n])
            cols = buffer[:n].view(stored).view((r1 - r0,) + tuple(shape[1:]))
        check_finite(cols, info, r0, r1)
        out.copy_(cols)
        return cols.numel() * cols.element_size()

    def _buffer(self, n: int, pin: bool) -> torch.Tensor:
        """This thread's staging buffer, at least ``n`` bytes."""
        buffer = getattr(self.local, "buffer", None)
        if buffer is None or buffer.numel() < n:
            buffer = torch.empty(max(n, CHUNK), dtype=torch.uint8, pin_memory=pin)
            self.local.buffer = buffer
        return buffer

    def _read_part(self, read: Read, r0: int, r1: int, pin: bool) -> torch.Tensor:
        """Rows ``[r0, r1)`` cut to the read's part of the other dims, reading only the bytes
        inside it: per row, one read per contiguous run (the last dim that is not whole, with
        every dim after it) -> [r1 - r0, *part sizes] in the stored dtype."""
        info, part = read.info, read.part
        shape = info.storage_shape
        stored = DTYPES[info.dtype]
        elem = torch.empty((), dtype=stored).element_size()
        strides = [math.prod(shape[j + 1:]) * elem for j in range(len(shape))]  # bytes
        k = max(j for j in range(1, len(shape)) if part[j] != (0, shape[j]))
        run = (part[k][1] - part[k][0]) * strides[k]
        sizes = tuple(b - a for a, b in part[1:])
        n = (r1 - r0) * math.prod(sizes) * elem
        buffer = self._buffer(n, pin)[:n]
        view = memoryview(buffer.numpy())
        fd, at = self.fds[info.file], 0
        # the runs' offsets within a row: one per index of the dims before k
        starts = [part[k][0] * strides[k] + sum(i * strides[j] for j, i in enumerate(idx, 1))
                  for idx in itertools.product(*(range(a, b) for a, b in part[1:k]))]
        for row in range(info.begin + r0 * strides[0], info.begin + r1 * strides[0],
                         strides[0]):
            for start in starts:
                self._read_at(fd, info, view[at:at + run], row + start)
                at += run
        return buffer.view(stored).view((r1 - r0,) + sizes)


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
