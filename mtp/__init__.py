"""mtp: DeepSeek-V4's multi-token-prediction draft layer in pure PyTorch.

Example:
    >>> import mtp
    >>> mtp.MTPConfig.from_name("flash").n_routed_experts
    256
"""

from . import remap
from .cache import KVCache
from .config import MTPConfig
from .drafter import Drafter, Proposal
from .export import write_checkpoint
from .loader import CheckpointError, LoadReport, Plan, download, load_model, load_state, plan
from .model import DeepSeekV4MTP, Numerics
from .quant import WeightFormat
from .sampling import Sampling
from .verify import AcceptanceStats, VerifyResult, rejection_sample, verify_greedy

__all__ = [
    "AcceptanceStats", "CheckpointError", "DeepSeekV4MTP", "Drafter", "KVCache", "LoadReport",
    "MTPConfig", "Numerics", "Plan", "Proposal", "Sampling", "VerifyResult", "WeightFormat",
    "download", "load_model", "load_state", "plan", "rejection_sample", "remap",
    "verify_greedy", "write_checkpoint",
]
__version__ = "0.1.0"
