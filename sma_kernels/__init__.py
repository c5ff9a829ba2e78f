"""sma-kernels: fused self-guided masking (SMA, ICLR 2024) for the first attention layer."""

from .api import backends, drop_masked, self_guided_attention, self_guided_mask
from .plan import MaskPlan, make_plan

__all__ = ["MaskPlan", "backends", "drop_masked", "make_plan", "self_guided_attention",
           "self_guided_mask"]
__version__ = "0.1.0"
