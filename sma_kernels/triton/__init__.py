"""Triton backend: fused mask scores, in-kernel selection and masked attention.

The mask and attention functions have the signatures and contracts of their namesakes in
:mod:`sma_kernels.reference`; ``self_guided_attention_forward`` and
``ordered_attention_backward`` are the fused pair of :class:`sma_kernels.backends.Backend`
(the mask, the kept-key order and the attention in three launches, one for short sequences; a
backward that reuses the order). ``BACKEND`` at the end declares them as the ``"triton"``
backend for fp16, bf16 and fp32 (float64, used by gradient checks, goes to the reference).
Kernels live one family per file: ``mask_scores.py`` (the plan's chosen rows and the column
partials of their token scores), ``select.py`` (the scores, then forced, top and random picks
without a sort, and the kept-key order of ``kept_keys.py``), ``attention.py`` (FlashAttention
forward and backward over the kept keys only), and ``short_sequence.py``, which does the mask
and the attention of a sample with few tokens (:func:`fits_short_forward`) in one launch, and
the backward of a short sequence (:func:`fits_short_backward`) in one. They run on CUDA
tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (slow; for tests).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from ..backends import Backend

# The modules that define the backend's kernels, for the tools that stub or inspect every kernel
# (bench/host_overhead.py, bench/launches.py).
KERNEL_MODULES = ("mask_scores", "select", "kept_keys", "attention", "short_sequence")


def kernel_modules() -> list[ModuleType]:
    """The modules of KERNEL_MODULES, imported (needs Triton)."""
    return [importlib.import_module(f"{__name__}.{name}") for name in KERNEL_MODULES]


def _unavailable() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"triton is not installed ({error})"
    from . import _common
    if _common.INTERPRET:
        return None
    if not torch.cuda.is_available():
        return "no CUDA GPU here (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly)"
    if torch.version.hip is not None:  # torch.cuda also stands for ROCm GPUs
        return "NVIDIA GPUs only: the kernels hold PTX, and this torch is a ROCm build"
    return None


UNAVAILABLE: str | None = _unavailable()

if UNAVAILABLE is None:
    from ..plan import MaskPlan
    from ._common import INTERPRET as INTERPRET
    from .attention import attention_backward as attention_backward
    from .attention import attention_forward as attention_forward
    from .attention import ordered_attention_backward as general_ordered_attention_backward
    from .attention import ordered_attention_forward
    from .mask_scores import chosen_row_scores
    from .select import select_from_partials
    from .short_sequence import (
        fits_short_backward,
        fits_short_forward,
        short_sequence_attention,
        short_sequence_backward,
    )

    def self_guided_mask(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None,
                         query_pool: torch.Tensor | None, plan: MaskPlan, *, ratio: float,
                         num_per_query: int, head_mix: str, mask_self: bool, noise: float,
                         scale: float,
                         order_out: tuple[torch.Tensor, torch.Tensor] | None = None
                         ) -> torch.Tensor:
        """(B, L) bool, True = masked: :func:`sma_kernels.reference.self_guided_mask` in Triton.
        ``order_out`` receives the kept-key order and count of keep = valid & ~mask from the
        same launches (see :func:`select_from_partials`). One launch for short sequences
        (short_sequence.py)."""
        options = {"ratio": ratio, "num_per_query": num_per_query, "head_mix": head_mix,
                   "mask_self": mask_self, "noise": noise, "scale": scale}
        if fits_short_forward(q.shape[2], k.shape[2]):
            return short_sequence_attention(q, k, None, valid, query_pool, plan, **options,
                                            order_out=order_out).mask
        # Two launches: the plan's rows and the score partials, then the scores and the mask.
        rows = chosen_row_scores(q, k, valid, query_pool, plan, **options)
        mask, _ = select_from_partials(rows.partials, rows.block_rows, rows.head_weight, valid,
                                       rows.chosen if mask_self else None, rows.meta,
                                       plan.token_rank, order_out=order_out)
        return mask

    def self_guided_attention_forward(
            q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
            query_pool: torch.Tensor | None, plan: MaskPlan, *, ratio: float, num_per_query: int,
            head_mix: str, mask_self: bool, noise: float, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(out, lse, mask, order, kept): the mask of :func:`self_guided_mask` and the attention
        of :func:`attention_forward` with keep = valid & ~mask, in three launches (one for short
        sequences, short_sequence.py); the selection writes the kept-key order (kept_keys.py)
        with the mask, for the attention and for :func:`ordered_attention_backward`."""
        batch, num_k = q.shape[0], k.shape[2]
        order = torch.empty((batch, num_k), dtype=torch.int32, device=q.device)
        kept = torch.empty((batch,), dtype=torch.int32, device=q.device)
        if fits_short_forward(q.shape[2], num_k):
            mask, _, out, lse = short_sequence_attention(
                q, k, v, valid, query_pool, plan, ratio=ratio, num_per_query=num_per_query,
                head_mix=head_mix, mask_self=mask_self, noise=noise, scale=scale,
                order_out=(order, kept))
            return out, lse, mask, order, kept
        mask = self_guided_mask(q, k, valid, query_pool, plan, ratio=ratio,
                                num_per_query=num_per_query, head_mix=head_mix,
                                mask_self=mask_self, noise=noise, scale=scale,
                                order_out=(order, kept))
        out, lse = ordered_attention_forward(q, k, v, order, kept, scale=scale)
        return out, lse, mask, order, kept

    def ordered_attention_backward(
            grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            order: torch.Tensor, kept: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, *,
            scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dQ, dK, dV of :func:`self_guided_attention_forward`'s attention over its saved
        ``order`` and ``kept``: two launches (attention.py), one for short sequences."""
        if fits_short_backward(q.shape[2], k.shape[2], q.shape[3], v.shape[3]):
            return short_sequence_backward(grad_out, q, k, v, order, kept, out, lse, scale=scale)
        return general_ordered_attention_backward(grad_out, q, k, v, order, kept, out, lse,
                                                  scale=scale)

    BACKEND = Backend(name="triton", devices=("cuda", "cpu") if INTERPRET else ("cuda",),
                      auto_devices=("cuda",), dtypes=(torch.float16, torch.bfloat16, torch.float32),
                      self_guided_mask=self_guided_mask, attention_forward=attention_forward,
                      attention_backward=attention_backward,
                      self_guided_attention_forward=self_guided_attention_forward,
                      ordered_attention_backward=ordered_attention_backward, fallback="reference")
else:
    BACKEND = Backend(name="triton", devices=("cuda",), auto_devices=("cuda",),
                      dtypes=(torch.float16, torch.bfloat16, torch.float32), self_guided_mask=None,
                      fallback="reference", unavailable=lambda: UNAVAILABLE)
