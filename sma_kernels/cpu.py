"""The compiled CPU backend: the kernels of ``csrc/cpu`` (C++, OpenMP).

* The fused self-guided mask: the row log-sum-exp and the token scores for the chosen rows only,
  then the selection in place, with O(B*L) extra memory.
* The attention over the kept keys only, forward and backward (FlashAttention-2 style, with the
  backward recomputing the probabilities): the masked keys are never computed, so the mask pays
  for itself. Registered as the backend's ``attention_forward`` / ``attention_backward``, i.e. the
  ``sma_kernels::masked_attention`` op and its autograd. Its results do not depend on the number
  of threads, and masked or padded keys never reach an output, whatever they hold.

Both choose, at run time, the widest instruction set that the CPU has among AVX-512 (the
attention), AVX2 + FMA and plain C++; ``SMA_KERNELS_CPU_ISA=avx2`` or ``=baseline`` in the
environment caps that choice (read once, at the first call).
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from .backends import FLOAT_DTYPES, Backend
from .plan import MaskPlan, materialized_flags


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

    @torch.library.register_fake("sma_kernels_C::kept_attention_forward")
    def _(q, k, v, keep, scale):
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return q.new_empty((*q.shape[:3], v.shape[-1])), q.new_empty(q.shape[:3], dtype=lse_dtype)

    @torch.library.register_fake("sma_kernels_C::kept_attention_backward")
    def _(grad_out, q, k, v, keep, out, lse, scale):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def self_guided_mask(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None,
                     query_pool: torch.Tensor | None, plan: MaskPlan, *, ratio: float,
                     num_per_query: int, head_mix: str, mask_self: bool, noise: float,
                     scale: float) -> torch.Tensor:
    """Same contract as :func:`sma_kernels.reference.self_guided_mask`, for CPU tensors."""
    valid, query_pool = materialized_flags(q, k, valid, query_pool)
    return torch.ops.sma_kernels_C.self_guided_mask(
        q, k, valid, query_pool, plan.query_rank, plan.head, plan.token_rank, ratio, num_per_query,
        head_mix == "random", mask_self, noise, scale)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, *,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sma_kernels.reference.attention_forward` over the kept keys only, for CPU tensors."""
    return torch.ops.sma_kernels_C.kept_attention_forward(q, k, v, keep, scale)


def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       keep: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, *,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`sma_kernels.reference.attention_backward` over the kept keys only: dq, dk, dv, with
    exactly zero dk, dv on the keys not kept."""
    return torch.ops.sma_kernels_C.kept_attention_backward(grad_out, q, k, v, keep, out, lse, scale)


BACKEND = Backend(name="cpp", devices=("cpu",), auto_devices=("cpu",), dtypes=FLOAT_DTYPES,
                  self_guided_mask=self_guided_mask, attention_forward=attention_forward,
                  attention_backward=attention_backward, unavailable=lambda: UNAVAILABLE)
