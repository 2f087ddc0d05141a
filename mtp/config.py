"""MTPConfig: the shape of a DeepSeek-V4 multi-token-prediction layer.

Field names are the Hugging Face ``config.json`` keys, so a released config reads without
translation; the keys of DeepSeek's reference ``inference/config.json`` are translated in one
table (:data:`REFERENCE_KEYS`). Defaults are DeepSeek-V4-Flash.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

# Block sizes fixed by the checkpoint formats and the reference numerics.
FP8_BLOCK = 128  # FP8 weight scales are per 128x128 block; activations are quantised per 128.
KV_FP8_BLOCK = 64  # the cached KV's non-RoPE dims are FP8-simulated per 64.
FP4_BLOCK = 32  # FP4 expert scales are per 32 inputs.

SCORING_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")



@dataclass(frozen=True)
class KeyRange:
    """The type and range one config key must have: ``kind`` int / float (an int is accepted
    where a float belongs) / str, values in ``[low, high]`` (``(low, high]`` when
    ``low_open``), or one of ``choices``."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.choices:
            return f"one of {self.choices}"
        kind = "an integer" if self.kind is int else "a number"
        return f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"

    def problem(self, value: object) -> str | None:
        """Why ``value`` does not fit, or None."""
        if self.kind is str:
            return None if value in self.choices else "is not " + self.describe()
        if isinstance(value, bool) or not isinstance(value, (int, float) if self.kind is float
                                                     else int):
            return (f"has type {type(value).__name__}; expected {self.describe()}"
                    + (" (write it without quotes)" if isinstance(value, str) else ""))
        if self.kind is float and not math.isfinite(value):
            return "is not finite; expected " + self.describe()
        if value < self.low or value > self.high or (self.low_open and value == self.low):
            return "is out of range; expected " + self.describe()
        return None


# Every config key's type and range, checked before anything is sized from it. The upper
# bounds are generous (8-16x the largest release: V4-Pro's 7168 hidden, 129280 vocabulary,
# 384 experts, 128 heads) and keep every parameter's element count far inside int64; memory
# itself is checked when a module or cache is built (mtp.memory).
KEY_RANGES: dict[str, KeyRange] = {
    "hidden_size": KeyRange(int, 1, 1 << 16),
    "vocab_size": KeyRange(int, 1, 1 << 22),
    "num_hidden_layers": KeyRange(int, 0, 1 << 12),
    "num_nextn_predict_layers": KeyRange(int, 1, 64),
    "num_attention_heads": KeyRange(int, 1, 1 << 12),
    "head_dim": KeyRange(int, 1, 1 << 13),
    "qk_rope_head_dim": KeyRange(int, 2, 1 << 13),
    "q_lora_rank": KeyRange(int, 1, 1 << 16),
    "o_groups": KeyRange(int, 1, 1 << 12),
    "o_lora_rank": KeyRange(int, 1, 1 << 16),
    "sliding_window": KeyRange(int, 1, 1 << 20),
    "n_routed_experts": KeyRange(int, 1, 1 << 12),
    "num_experts_per_tok": KeyRange(int, 1, 1 << 12),
    "moe_intermediate_size": KeyRange(int, 1, 1 << 18),
    "n_shared_experts": KeyRange(int, 1, 64),
    "scoring_func": KeyRange(str, choices=SCORING_FUNCS),
    "routed_scaling_factor": KeyRange(float, 0, 1e6, low_open=True),
    "swiglu_limit": KeyRange(float, 0, 1e6),  # 0 disables the clamp
    "hc_mult": KeyRange(int, 1, 64),
    "hc_sinkhorn_iters": KeyRange(int, 1, 1000),  # the releases use 20; each is a full pass
    "hc_eps": KeyRange(float, 0, 0.5, low_open=True),
    "rms_norm_eps": KeyRange(float, 0, 0.5, low_open=True),
    "rope_theta": KeyRange(float, 0, 1e12, low_open=True),
}


def check_key(key: str, value: object) -> None:
    """Raise ValueError naming ``key``, ``value`` and the allowed range if ``value`` does not
    fit :data:`KEY_RANGES` (keys without a row pass).

    Example:
        >>> check_key("rope_theta", "1e4")
        Traceback (most recent call last):
        ...
        ValueError: MTPConfig.rope_theta: '1e4' has type str; expected a number in (0, 1e+12] (write it without quotes)
    """  # noqa: E501
    rule = KEY_RANGES.get(key)
    problem = None if rule is None else rule.problem(value)
    if problem is not None:
        raise ValueError(f"MTPConfig.{key}: {value!r} {problem}")


# What a DSpark drafter is (found from config keys or from its tensors: one message).
DSPARK = ("a DSpark drafter (DeepSeek-V4-Flash-0731 / -Pro-0813: three blocks under "
          "mtp.{0,1,2}, no e_proj/hnorm), not a V4 MTP layer; mtp implements only the MTP layer "
          "of the original V4 releases")


class NotAnMTPLayer(ValueError):
    """A config that is not a V4 MTP drafter at all: ``kind`` "dspark" (a DSpark drafter) or
    "no-mtp" (a model without MTP layers)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


# Reference-code key -> Hugging Face key (every translation lives here).
REFERENCE_KEYS: dict[str, str] = {
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_mtp_layers": "num_nextn_predict_layers",
    "n_heads": "num_attention_heads",
    "rope_head_dim": "qk_rope_head_dim",
    "window_size": "sliding_window",
    "n_activated_experts": "num_experts_per_tok",
    "moe_inter_dim": "moe_intermediate_size",
    "score_func": "scoring_func",
    "route_scale": "routed_scaling_factor",
    "norm_eps": "rms_norm_eps",
}


@dataclass
class MTPConfig:
    """Dimensions and constants of a DeepSeek-V4 MTP layer (defaults: V4-Flash).

    Example:
        >>> cfg = MTPConfig.from_name("tiny")
        >>> cfg.hidden_size, cfg.hc_mult, cfg.mtp_layer_ids
        (256, 4, (2,))
    """

    hidden_size: int = 4096
    vocab_size: int = 129280
    num_hidden_layers: int = 43
    num_nextn_predict_layers: int = 1
    num_attention_heads: int = 64
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    n_routed_experts: int = 256
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    n_shared_experts: int = 1
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Compress ratio of each MTP layer (entries N .. N+n_mtp-1 of config.json's list).
    mtp_compress_ratios: tuple[int, ...] = field(default=(0,))

    def __post_init__(self) -> None:
        ratios = self.mtp_compress_ratios
        if not isinstance(ratios, (list, tuple)) or not all(
                isinstance(r, int) and not isinstance(r, bool) for r in ratios):
            raise ValueError(f"MTPConfig.mtp_compress_ratios: expected a list of integers, got "
                             f"{ratios!r}")
        self.mtp_compress_ratios = tuple(ratios)
        self._validate()

    # ---- derived -------------------------------------------------------------------------
    @property
    def mtp_layer_ids(self) -> tuple[int, ...]:
        """Layer index L = N + i of each MTP layer i (vLLM's ``model.layers.{L}``)."""
        n = self.num_hidden_layers
        return tuple(range(n, n + self.num_nextn_predict_layers))

    @property
    def hc_dim(self) -> int:
        """Width M*D of the flattened residual streams the engine carries."""
        return self.hc_mult * self.hidden_size

    @property
    def hc_mix_dim(self) -> int:
        """(2+M)*M: pre, post and the M x M combination matrix of one hyper-connection."""
        return (2 + self.hc_mult) * self.hc_mult

    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    @property
    def o_group_in(self) -> int:
        """Input width of one ``wo_a`` group: H*Dh/G."""
        return self.num_attention_heads * self.head_dim // self.o_groups

    @property
    def shared_intermediate_size(self) -> int:
        return self.n_shared_experts * self.moe_intermediate_size

    # ---- validation ----------------------------------------------------------------------
    def _validate(self) -> None:
        def need(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"MTPConfig.{key}: {msg}")

        for key in KEY_RANGES:  # types and ranges first: everything below computes with them
            check_key(key, getattr(self, key))
        # Activations are FP8-quantised per 128 along every quantised product's input.
        for key, value in (
            ("hidden_size", self.hidden_size),
            ("q_lora_rank", self.q_lora_rank),
            ("moe_intermediate_size", self.moe_intermediate_size),
            ("o_groups * o_lora_rank", self.o_groups * self.o_lora_rank),
        ):
            need(value % FP8_BLOCK == 0, key,
                 f"{value} is not a multiple of {FP8_BLOCK} (FP8 activation/scale blocks); "
                 f"use a multiple of {FP8_BLOCK}")
        need(self.qk_rope_head_dim % 2 == 0 and self.qk_rope_head_dim < self.head_dim,
             "qk_rope_head_dim",
             f"must be even and smaller than head_dim={self.head_dim}, "
             f"got {self.qk_rope_head_dim}")
        need(self.nope_head_dim % KV_FP8_BLOCK == 0, "head_dim",
             f"head_dim - qk_rope_head_dim = {self.nope_head_dim} is not a multiple of "
             f"{KV_FP8_BLOCK} (the KV FP8 simulation blocks); adjust head_dim or qk_rope_head_dim")
        need(self.num_attention_heads % self.o_groups == 0, "o_groups",
             f"{self.o_groups} does not divide num_attention_heads={self.num_attention_heads}")
        need(self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
             f"{self.num_experts_per_tok} > n_routed_experts={self.n_routed_experts}")
        need(len(self.mtp_compress_ratios) == self.num_nextn_predict_layers,
             "mtp_compress_ratios",
             f"has {len(self.mtp_compress_ratios)} entries for "
             f"{self.num_nextn_predict_layers} MTP layers")
        for i, ratio in enumerate(self.mtp_compress_ratios):
            need(ratio == 0, "compress_ratios",
                 f"MTP layer {i} (entry {self.num_hidden_layers + i}) asks for compress ratio "
                 f"{ratio}; only 0 (pure sliding-window attention, as in both V4 releases) is "
                 f"implemented")

    # ---- constructors --------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> MTPConfig:
        """Build from a ``config.json`` dict (Hugging Face or reference keys).

        Unknown keys are ignored (a full model config has many); a missing required key raises.
        A DSpark drafter or a model without MTP layers raises :class:`NotAnMTPLayer`.
        """
        dspark = sorted(k for k in raw if k.startswith("dspark"))
        if dspark:
            raise NotAnMTPLayer("dspark", f"config has {dspark[:3]}: this is {DSPARK}")
        data = {REFERENCE_KEYS.get(k, k): v for k, v in raw.items()}
        names = {f.name for f in dataclasses.fields(cls)}
        required = ("hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads",
                    "head_dim", "n_routed_experts", "num_experts_per_tok",
                    "moe_intermediate_size")
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"config is missing required key(s) {missing}; "
                             "is this a DeepSeek-V4 config.json?")
        kwargs = {k: v for k, v in data.items() if k in names and k != "mtp_compress_ratios"}
        n_mtp = data.get("num_nextn_predict_layers", 1)
        if n_mtp == 0 and not isinstance(n_mtp, bool):
            raise NotAnMTPLayer("no-mtp", "config.num_nextn_predict_layers is 0: this model has "
                                "no MTP layer to draft with")
        for key in ("num_nextn_predict_layers", "num_hidden_layers"):  # used just below
            check_key(key, data.get(key, 1))
        ratios = data.get("compress_ratios")
        if ratios is not None:
            n = data["num_hidden_layers"]
            if not isinstance(ratios, list):
                raise ValueError(f"config.compress_ratios: expected a list, got "
                                 f"{type(ratios).__name__}")
            if len(ratios) < n + n_mtp:
                raise ValueError(
                    f"config.compress_ratios has {len(ratios)} entries; expected "
                    f"num_hidden_layers + num_nextn_predict_layers = {n + n_mtp}")
            kwargs["mtp_compress_ratios"] = tuple(ratios[n:n + n_mtp])
        else:
            kwargs["mtp_compress_ratios"] = (0,) * n_mtp
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> MTPConfig:
        """Read ``config.json`` from a checkpoint folder (or the file itself).

        Example:
            >>> MTPConfig.from_pretrained("checkpoints/DeepSeek-V4-Flash")  # doctest: +SKIP
        """
        from .checkpoint.files import MAX_CONFIG, load_json

        path = os.fspath(path)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise FileNotFoundError(f"no config.json at {file!r}")
        raw = load_json(file, "config.json", MAX_CONFIG)  # regular files only, bounded
        if not isinstance(raw, dict):
            raise ValueError(f"{file}: config.json is not a JSON object")
        return cls.from_dict(raw)

    @classmethod
    def from_name(cls, name: str) -> MTPConfig:
        """A preset by exact name: ``"flash"``, ``"pro"`` or ``"tiny"``.

        Example:
            >>> MTPConfig.from_name("pro").hidden_size
            7168
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid presets: {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    def to_dict(self) -> dict[str, Any]:
        """Hugging Face style dict that :meth:`from_dict` reads back."""
        data = dataclasses.asdict(self)
        ratios = data.pop("mtp_compress_ratios")
        data["compress_ratios"] = [0] * self.num_hidden_layers + list(ratios)
        return data


PRESETS: dict[str, dict[str, Any]] = {
    "flash": {},
    "pro": dict(
        hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536,
        o_groups=16, n_routed_experts=384, moe_intermediate_size=3072,
        routed_scaling_factor=2.5,
    ),
    # Small enough for float64 tests and a CPU demo, with every format constraint exercised:
    # 128-multiples for FP8 blocks, a 64-wide KV FP8 block, grouped wo_a, hc_mult 4.
    "tiny": dict(
        hidden_size=256, vocab_size=1024, num_hidden_layers=2, num_attention_heads=4,
        head_dim=128, qk_rope_head_dim=64, q_lora_rank=128, o_groups=2, o_lora_rank=128,
        sliding_window=8, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
    ),
}
