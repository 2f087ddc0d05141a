"""safetensors headers: parsing and checks without reading tensor data, and the finiteness
test applied to the bytes as they stream in.

:func:`read_header` validates a header (dtypes, byte counts, bounds; tensors tiling the data
exactly, no duplicate key), at least as strictly as safetensors' own reader; :func:`check_finite`
refuses NaN and infinity in stored bytes, naming the tensor.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

from .errors import CheckpointError
from .files import open_regular, parse_json

# safetensors dtype code -> how the module holds it (F4: two e2m1 codes a byte, held as int8)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu, "F4": torch.int8,
}
MAX_HEADER = 100_000_000  # the safetensors format's own limit on the JSON header
DAMAGED = "the file is damaged: download or write it again"
PLAIN = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file as its header describes it (offsets absolute)."""

    file: str
    dtype: str
    shape: tuple[int, ...]  # as in the header (F4 counts FP4 elements)
    begin: int
    end: int
    name: str = ""  # the tensor's key in the header

    @property
    def storage_shape(self) -> tuple[int, ...]:
        """The shape of the bytes as the module holds them (F4: last dim halved, int8)."""
        if self.dtype == "F4":
            return self.shape[:-1] + (self.shape[-1] // 2,)
        return self.shape

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _no_duplicate_keys(name: str):
    def hook(pairs):
        out: dict = {}
        for k, v in pairs:
            if k in out:
                raise CheckpointError(f"{name}: the header lists {k!r} twice (a reader would "
                                      f"silently keep one of them); {DAMAGED}")
            out[k] = v
        return out
    return hook


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_header(path: str) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header: every dtype known, every byte count consistent
    with its shape, no key listed twice, and the tensors tiling the data section exactly (no
    hole, no overlap, nothing after the last one), as safetensors' own reader requires. Only
    regular files are opened. Raises CheckpointError naming the file and the damage.

    Example:
        >>> read_header("model-00046-of-00046.safetensors")["mtp.0.hc_head_base"]   # doctest: +SKIP
        TensorInfo(file='model-00046-of-00046.safetensors', dtype='F32', shape=(4,), ...)
    """
    name = os.path.basename(path)
    fd, size = open_regular(path, "a safetensors shard")
    try:
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            raise CheckpointError(f"{name}: {size} bytes is too short for a safetensors file; "
                                  f"{DAMAGED}")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, MAX_HEADER):
            raise CheckpointError(f"{name}: its header claims {n} bytes but the file has {size} "
                                  f"(truncated, or not safetensors); {DAMAGED}")
        raw = os.pread(fd, n, 8)
    finally:
        os.close(fd)
    header = parse_json(raw, name, "the header", object_pairs_hook=_no_duplicate_keys(name))
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: the header is not a JSON object; {DAMAGED}")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict)
                                 and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{name}: __metadata__ must map strings to strings; {DAMAGED}")
    data = 8 + n
    infos: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), \
                entry["data_offsets"]
            ints = all(_is_count(v) for v in (*shape, begin, end))
        except (KeyError, TypeError, ValueError):
            ints = False
        if not ints or begin > end:
            raise CheckpointError(f"{name}: malformed header entry for {key!r}; {DAMAGED}")
        if dtype not in DTYPES:
            raise CheckpointError(f"{name}: tensor {key} has dtype {dtype!r}, which the loader "
                                  f"does not know ({sorted(DTYPES)})")
        bits = 4 if dtype == "F4" else DTYPES[dtype].itemsize * 8
        want = math.prod(shape) * bits
        if want % 8 or end - begin != want // 8:
            raise CheckpointError(f"{name}: the header gives {key} {end - begin} bytes, but "
                                  f"{dtype} {list(shape)} needs {want / 8:g}; {DAMAGED}")
        if data + end > size:
            raise CheckpointError(f"{name} is truncated: tensor {key} ends at byte {data + end} "
                                  f"but the file has {size} bytes; {DAMAGED}")
        infos[key] = TensorInfo(name, dtype, shape, data + begin, data + end, key)
    # The tensors tile the data section in offset order, as safetensors' reader requires.
    at, last = data, None
    for begin, end, key in sorted((i.begin, i.end, k) for k, i in infos.items()):
        if begin < at:
            raise CheckpointError(f"{name}: tensors {last} and {key} overlap; {DAMAGED}")
        if begin > at:
            raise CheckpointError(f"{name}: {begin - at} byte(s) before tensor {key} belong to "
                                  f"no tensor (a hole in the data); {DAMAGED}")
        at, last = end, key
    if at != size:
        raise CheckpointError(f"{name}: {size - at} byte(s) after the last tensor belong to no "
                              f"tensor (trailing data); {DAMAGED}")
    return infos


# Stored dtype -> (bits, lowest non-finite pattern of a positive value): with the sign bit
# clear, a float is NaN or infinite when its bits are at least the all-ones exponent (for e4m3fn,
# which has no infinity, the NaN code 0x7F; E8M0 has no sign bit and one NaN code, 0xFF).
_NON_FINITE = {"F64": (64, 0x7FF0_0000_0000_0000), "F32": (32, 0x7F80_0000),
               "F16": (16, 0x7C00), "BF16": (16, 0x7F80), "F8_E4M3": (8, 0x7F),
               "F8_E5M2": (8, 0x7C), "F8_E8M0": (8, 0xFF)}
_INTS = {8: (np.int8, np.uint8), 16: (np.int16, np.uint16), 32: (np.int32, np.uint32),
         64: (np.int64, np.uint64)}


def _nonfinite(stored: torch.Tensor, dtype: str) -> bool:
    """Whether the stored bytes (CPU, the header's dtype) hold a NaN or an infinity, from
    their bit patterns with two read-only max reductions: read as signed integers, only a
    positive non-finite value reaches the positive threshold; read as unsigned, only a negative
    one reaches the threshold with the sign bit set. numpy, not torch: single-threaded
    reductions cost no thread wake-ups, which under a loaded CPU made torch's parallel ones
    slower than the read itself. Integers and packed FP4 (e2m1: no NaN, no infinity) have
    nothing to check."""
    if dtype not in _NON_FINITE or not stored.numel():
        return False
    bits, positive = _NON_FINITE[dtype]
    signed, unsigned = _INTS[bits]
    raw = stored.reshape(-1).view(torch.uint8).numpy()
    if dtype == "F8_E8M0":
        return int(raw.max()) >= positive
    negative = positive | 1 << (bits - 1)
    return int(raw.view(signed).max()) >= positive or int(raw.view(unsigned).max()) >= negative


def check_finite(stored: torch.Tensor, info: TensorInfo, r0: int = 0, r1: int | None = None,
                 ) -> None:
    """Raise CheckpointError naming the tensor when ``stored`` (rows ``[r0, r1)`` of it, as
    stored) holds a NaN or an infinity: a damaged or badly converted checkpoint, whose every
    draft would be garbage."""
    if stored.numel() and _nonfinite(stored, info.dtype):
        rows = "" if r1 is None else f" (rows {r0}..{r1 - 1})"
        raise CheckpointError(f"{info.file}: tensor {info.name}{rows} holds NaN or infinite "
                              f"{info.dtype} values; the checkpoint is damaged or was converted "
                              f"wrongly: download or convert it again")


def check_little_endian() -> None:
    if sys.byteorder != "little":  # safetensors data is little-endian; bytes are copied as is
        raise RuntimeError("mtp.loader reads safetensors bytes as they are: big-endian hosts "
                           "are not supported")




__all__ = ["DTYPES", "PLAIN", "MAX_HEADER", "DAMAGED", "TensorInfo", "read_header",
           "check_finite", "check_little_endian"]
