"""sma-kernels: fused self-guided masking (SMA, ICLR 2024) for the first attention layer."""

from . import nn
from .api import self_guided_attention, self_guided_mask
from .backends import backends
from .packing import drop_masked
from .plan import MaskPlan, make_plan, make_plan_for

__all__ = ["MaskPlan", "backends", "drop_masked", "make_plan", "make_plan_for", "nn",
           "self_guided_attention", "self_guided_mask"]
__version__ = "0.1.0"
