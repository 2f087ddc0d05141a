"""Memory a module or a cache will take, estimated before it is allocated.

A config value or a ``Drafter`` argument within its type and range can still ask for more
memory than the machine has (``vocab_size`` x ``hidden_size`` at their limits is terabytes;
``max_seqs=10**9`` sizes a cache of terabytes). :func:`check_fits` refuses such an allocation
with its size and what drives it, instead of letting the allocator fail halfway (or the
operating system kill the process). The bound is the device's total memory: physical RAM for
the CPU, the card's memory for CUDA; other devices are not checked.

Example:
    >>> from mtp import MTPConfig
    >>> nbytes, largest = parameter_bytes(MTPConfig.from_name("flash"))
    >>> round(nbytes / 2**30, 2), largest.split(" [")[0]
    (5.32, 'model.layers.43.mtp_block.ffn.experts.w13_weight')
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Collection

import torch


def device_memory(device) -> int | None:
    """Total bytes of memory of ``device`` (None: unknown, not checked)."""
    dev = torch.device(device if device is not None else "cpu")
    if dev.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # not POSIX
            return None
    if dev.type == "cuda" and torch.cuda.is_available():
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory
    return None


def size_text(n: float) -> str:
    for unit, k in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << k:
            return f"{n / (1 << k):.2f} {unit}"
    return f"{n:.0f} B"


def check_fits(nbytes: int, device, what: str, driven_by: str) -> None:
    """Raise MemoryError when ``nbytes`` exceed ``device``'s total memory, saying how much
    ``what`` needs and which setting (``driven_by``) to lower."""
    total = device_memory(device)
    if total is not None and nbytes > total:
        raise MemoryError(f"{what} would take {size_text(nbytes)}, more than the "
                          f"{size_text(total)} of memory of {torch.device(device or 'cpu')}; "
                          f"{driven_by}")


def parameter_bytes(config, weight_format=None, dtype: torch.dtype = torch.bfloat16,
                    shared: Collection[str] = ()) -> tuple[int, str]:
    """(bytes of every parameter of the module ``config`` builds, the largest parameter with
    its shape and the config keys whose values appear in that shape). Exact: the module is
    built on the meta device, which allocates nothing. ``shared``: the tables the caller
    supplies (``"embed_tokens"``, ``"head"``: :attr:`~mtp.facts.ParamFacts.shared`)."""
    return _parameter_bytes(dataclasses.astuple(config), weight_format, dtype,
                            frozenset(shared))


@functools.lru_cache(maxsize=64)  # building a module again with the same config costs nothing
def _parameter_bytes(cfg_key: tuple, weight_format, dtype: torch.dtype,
                     shared: frozenset[str]) -> tuple[int, str]:
    from .config import MTPConfig
    from .facts import facts_of
    from .model import DeepSeekV4MTP  # deferred: the model imports this module

    config = MTPConfig(*cfg_key)
    meta = DeepSeekV4MTP(config, weight_format=weight_format, dtype=dtype, device="meta")
    facts = facts_of(meta)
    sizes = {name: p.numel() * p.element_size() for name, p in meta.named_parameters()
             if facts[name].shared not in shared}
    if not sizes:
        return 0, ""
    name = max(sizes, key=sizes.get)
    shape = list(dict(meta.named_parameters())[name].shape)
    keys = sorted({f"{k}={v}" for k, v in vars(config).items() if isinstance(v, int)
                   and not isinstance(v, bool) and v > 1 and v in shape})
    largest = f"{name} {shape}, {size_text(sizes[name])}" + (
        f", sized by {', '.join(keys)}" if keys else "")
    return sum(sizes.values()), largest


def check_parameters(config, weight_format, dtype, device, shared: Collection[str] = ()) -> None:
    """:func:`check_fits` for the parameters of the module ``config`` builds on ``device``."""
    if torch.device(device if device is not None else "cpu").type == "meta":
        return
    nbytes, largest = parameter_bytes(config, weight_format, dtype, shared)
    check_fits(nbytes, device, "the module's parameters",
               f"the largest is {largest}; check config.json")


def cache_bytes(n_layers: int, max_seqs: int, capacity: int, head_dim: int,
                dtype: torch.dtype) -> int:
    """Bytes of a :class:`~mtp.cache.KVCache`: the KV entries and their int64 positions."""
    entries = n_layers * max_seqs * capacity
    return entries * (head_dim * torch.empty((), dtype=dtype).element_size() + 8)


__all__ = ["device_memory", "check_fits", "parameter_bytes", "check_parameters", "cache_bytes",
           "size_text"]
