"""The public ops: :func:`self_guided_mask` and :func:`self_guided_attention`.

The contract (docs/design.md, "The computation") is in the docstrings below; the argument checks
are in :mod:`sma_kernels.checks`, the backends in :mod:`sma_kernels.backends`, the torch.library
ops in :mod:`sma_kernels.ops`, the randomness in :mod:`sma_kernels.plan`.
"""

from __future__ import annotations

import contextlib

import torch

from . import ops
from .checks import CheckedCall, check_call, check_v
from .plan import MaskPlan, kept_tokens


def autocast_inputs(*tensors: object) -> tuple[tuple[object, ...], contextlib.AbstractContextManager]:
    """The rule under ``torch.autocast``: the ops behave as scaled_dot_product_attention does.

    When autocast is on for the first tensor's device type, every floating-point input except
    float64 is cast to the autocast dtype, and the op then runs with autocast off, exactly as it
    would on inputs of that dtype: the mask's scores in fp32 from those values on every backend,
    the output in that dtype. Returns the inputs and the context to run the op in.
    """
    first = tensors[0]
    # Device types without autocast (meta, for one) reach the argument checks unchanged.
    if (not isinstance(first, torch.Tensor) or not torch.amp.is_autocast_available(first.device.type)
            or not torch.is_autocast_enabled(first.device.type)):
        return tensors, contextlib.nullcontext()
    device_type = first.device.type
    dtype = torch.get_autocast_dtype(device_type)
    cast = tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point()
                 and x.dtype not in (dtype, torch.float64) else x for x in tensors)
    return cast, torch.autocast(device_type, enabled=False)


def self_guided_mask(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None = None, *,
                     ratio: float, num_per_query: int, head_mix: str = "mean",
                     query_valid: torch.Tensor | None = None, mask_self: bool = False,
                     noise: float = 0.0, scale: float | None = None,
                     generator: torch.Generator | None = None, plan: MaskPlan | None = None,
                     backend: str = "auto") -> torch.Tensor:
    """Choose SMA's self-guided mask from the first layer's attention.

    Args:
        q: (B, H, Q, d) queries: learned latents (cross-attention) or the tokens (self-attention).
        k: (B, H, L, d) keys of the L input tokens, same dtype and device as q.
        valid: (B, L) bool, True = real token; padding may sit anywhere. Default: all real.
        ratio: masking ratio r in (0, 1); k = clamp(round(r * n_b), 1, n_b - 1) tokens are masked.
        num_per_query: npq >= 1; k_q = clamp(round(n_b * r / npq), 1, pool size) rows are summed.
        head_mix: "mean" over heads, or "random": one head per (sample, query row) from the plan.
        query_valid: (B, Q) bool, the rows that may be chosen. Default: all Q rows, or ``valid``
            under ``mask_self``.
        mask_self: self-attention only (Q == L): the chosen query tokens are always masked.
        noise: curriculum eta in [0, 1]; round(eta * (k - f)) of the masked tokens are uniform
            random picks instead of top scores (eta = 1 gives a uniform random mask).
        scale: logit scale, default d ** -0.5.
        generator: randomness for the plan when ``plan`` is not given.
        plan: a :class:`MaskPlan` from :func:`make_plan` (or any int32 tensors of its shapes:
            equal ranks break toward the lower index; ``head`` must lie in [0, H)); the same
            plan gives the same mask on every backend. ``head`` is checked on its device
            without a host sync: on CPU tensors an entry out of range raises ValueError; on a
            GPU it is an asynchronous device-side assertion ("device-side assert triggered" at
            the next synchronization).
        backend: "auto", "reference", "cpp" (CPU tensors) or "triton" (CUDA tensors).

    Returns:
        (B, L) bool, True = masked. Padding is never masked; each sample with n_b >= 2 real
        tokens has exactly k masked.

    Edge rules (docs/design.md, "Rules at the edges"): padded keys are never read; a (head, row)
    whose fp32 logits over the real tokens are not all finite adds nothing to the scores; under
    ``torch.autocast`` float inputs other than float64 are cast to the autocast dtype first, as
    scaled_dot_product_attention does; a ``generator`` cannot be used inside ``torch.compile``.
    """
    (q, k), autocast_off = autocast_inputs(q, k)
    call = check_call(q, k, valid, ratio=ratio, num_per_query=num_per_query, head_mix=head_mix,
                      query_valid=query_valid, mask_self=mask_self, noise=noise, scale=scale,
                      generator=generator, plan=plan, backend=backend)
    with autocast_off:
        return _mask(q, k, call)


def self_guided_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          valid: torch.Tensor | None = None, *, ratio: float, num_per_query: int,
                          head_mix: str = "mean", query_valid: torch.Tensor | None = None,
                          mask_self: bool = False, noise: float = 0.0, scale: float | None = None,
                          generator: torch.Generator | None = None, plan: MaskPlan | None = None,
                          backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The first SMA layer in one op: choose the mask, then attend with it applied.

    Takes the arguments of :func:`self_guided_mask`, plus ``v`` (B, H, L, dv). Returns
    ``out`` (B, H, Q, dv) = softmax(scale q k^T with masked and padded key columns removed) v,
    differentiable with respect to q, k and v, and ``mask`` (B, L) bool. A sample with no real
    token gets a zero output. Keys and values that are padded or masked never reach the output
    or the gradients, whatever they hold (NaN and Inf included); their gradients are zero.
    """
    (q, k, v), autocast_off = autocast_inputs(q, k, v)
    call = check_call(q, k, valid, ratio=ratio, num_per_query=num_per_query, head_mix=head_mix,
                      query_valid=query_valid, mask_self=mask_self, noise=noise, scale=scale,
                      generator=generator, plan=plan, backend=backend)
    v = check_v(v, q, k)
    with autocast_off:
        if ops.has_fused_attention(call.backend, q.dtype):  # mask and attention in one op
            return ops.self_guided_attention(
                q, k, v, call.valid, call.query_pool, call.plan, ratio=call.ratio,
                num_per_query=call.num_per_query, head_mix=call.head_mix,
                mask_self=call.mask_self, noise=call.noise, scale=call.scale,
                backend=call.backend)
        mask = _mask(q, k, call)
        out = ops.masked_attention(q, k, v, kept_tokens(call.valid, mask), scale=call.scale,
                                   backend=call.backend)
    return out, mask


def _mask(q: torch.Tensor, k: torch.Tensor, call: CheckedCall) -> torch.Tensor:
    return ops.self_guided_mask(q, k, call.valid, call.query_pool, call.plan, ratio=call.ratio,
                                num_per_query=call.num_per_query, head_mix=call.head_mix,
                                mask_self=call.mask_self, noise=call.noise, scale=call.scale,
                                backend=call.backend)
