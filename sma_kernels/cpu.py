"""The compiled CPU backend: the fused self-guided mask of ``csrc/cpu`` (C++, OpenMP).

It computes the row log-sum-exp and the token scores for the chosen rows only, then selects the
mask in place, with O(B*L) extra memory. The attention after it is PyTorch's own fused CPU
attention (SDPA) with the mask applied, differentiated by PyTorch.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch
import torch.nn.functional as F

from .backends import FLOAT_DTYPES, Backend
from .plan import MaskPlan
from .reference import kept_rows


def _load_extension() -> str | None:
    """Import sma_kernels._C (which registers torch.ops.sma_kernels_C); the reason if it fails."""
    # find_spec first: a missing module would otherwise surface as a confusing partial-import error.
    if importlib.util.find_spec(f"{__package__}._C") is None:
        return ("the compiled extension sma_kernels._C is not installed: it was skipped "
                "(SMA_KERNELS_NO_EXT=1) or its C++ build failed (see the log of "
                "`pip install -v --no-build-isolation .`)")
    try:
        importlib.import_module(f"{__package__}._C")
    except (ImportError, OSError) as error:
        return (f"the compiled extension sma_kernels._C did not load ({error}); rebuild it against "
                f"this torch {torch.__version__} with `pip install --no-build-isolation .`")
    return None


UNAVAILABLE: str | None = _load_extension()

if UNAVAILABLE is None:
    @torch.library.register_fake("sma_kernels_C::self_guided_mask")
    def _(q, k, valid, query_pool, query_rank, head, token_rank, ratio, num_per_query, head_mix_random,
          mask_self, noise, scale):
        return valid.new_empty(valid.shape)


def self_guided_mask(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, query_pool: torch.Tensor,
                     plan: MaskPlan, *, ratio: float, num_per_query: int, head_mix: str,
                     mask_self: bool, noise: float, scale: float) -> torch.Tensor:
    """Same contract as :func:`sma_kernels.reference.self_guided_mask`, for CPU tensors."""
    return torch.ops.sma_kernels_C.self_guided_mask(
        q, k, valid, query_pool, plan.query_rank, plan.head, plan.token_rank, ratio, num_per_query,
        head_mix == "random", mask_self, noise, scale)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, *,
                   scale: float) -> torch.Tensor:
    """:func:`sma_kernels.reference.attention_forward`'s output through PyTorch's SDPA,
    differentiable natively.

    Faster than the fp32 oracle math on the CPU (PyTorch's fused CPU kernel); a sample with no
    key kept gets a zero output and zero gradients. Keys and values not kept are zeroed first:
    SDPA reads every key, and a NaN there would reach the whole row.
    """
    any_kept = keep.any(dim=1)
    attend = keep | ~any_kept[:, None]
    out = F.scaled_dot_product_attention(q, kept_rows(k, keep), kept_rows(v, keep),
                                         attn_mask=attend[:, None, None, :], scale=scale)
    return out * any_kept[:, None, None, None].to(out.dtype)


BACKEND = Backend(name="cpp", devices=("cpu",), auto_devices=("cpu",), dtypes=FLOAT_DTYPES,
                  self_guided_mask=self_guided_mask, attention=attention,
                  unavailable=lambda: UNAVAILABLE)
