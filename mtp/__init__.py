"""mtp: DeepSeek-V4's multi-token-prediction draft layer in pure PyTorch.

Example:
    >>> import mtp
    >>> mtp.MTPConfig.from_name("flash").n_routed_experts
    256
"""

from .cache import KVCache
from .config import MTPConfig
from .model import DeepSeekV4MTP, Numerics
from .quant import WeightFormat

__all__ = ["DeepSeekV4MTP", "KVCache", "MTPConfig", "Numerics", "WeightFormat"]
__version__ = "0.1.0"
