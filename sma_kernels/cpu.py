"""The compiled CPU backend: the fused self-guided mask of ``csrc/cpu`` (C++, OpenMP).

It computes the row log-sum-exp and the token scores for the chosen rows only, then selects the
mask in place, with O(B*L) extra memory. Attention on the CPU uses the reference math.
"""

from __future__ import annotations

import torch

from .plan import MaskPlan

try:
    from . import _C  # noqa: F401  (registers torch.ops.sma_kernels_C)
    UNAVAILABLE: str | None = None
except ImportError as error:
    UNAVAILABLE = f"the compiled extension sma_kernels._C did not load ({error}); reinstall with " \
                  "`pip install --no-build-isolation -e .`"


def self_guided_mask(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, query_pool: torch.Tensor,
                     plan: MaskPlan, *, ratio: float, num_per_query: int, head_mix: str,
                     mask_self: bool, noise: float, scale: float) -> torch.Tensor:
    """Same contract as :func:`sma_kernels.reference.self_guided_mask`, for CPU tensors."""
    return torch.ops.sma_kernels_C.self_guided_mask(
        q, k, valid, query_pool, plan.query_rank, plan.head, plan.token_rank, ratio, num_per_query,
        head_mix == "random", mask_self, noise, scale)
