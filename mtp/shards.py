"""safetensors shard files: the names :mod:`mtp.checkpoint` now holds, kept importable here.

Headers and their checks live in :mod:`mtp.checkpoint.header`, the read path in
:mod:`mtp.checkpoint.stream`, :class:`CheckpointError` in :mod:`mtp.checkpoint.errors`.
"""

from __future__ import annotations

from .checkpoint.errors import CheckpointError
from .checkpoint.header import (
    _NON_FINITE,
    DAMAGED,
    DTYPES,
    MAX_HEADER,
    PLAIN,
    TensorInfo,
    _nonfinite,
    check_finite,
    check_little_endian,
    read_header,
)
from .checkpoint.stream import CHUNK, Progress, Read, ShardReader, stream

__all__ = ["CheckpointError", "TensorInfo", "read_header", "check_finite", "check_little_endian",
           "ShardReader", "Progress", "Read", "stream", "DTYPES", "PLAIN", "MAX_HEADER", "CHUNK",
           "DAMAGED", "_NON_FINITE", "_nonfinite"]
