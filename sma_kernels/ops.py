"""The torch.library ops, and the eager path that skips their dispatch.

Custom ops carry the work, so that it runs under ``torch.compile`` and passes
``torch.library.opcheck``:

* ``sma_kernels::self_guided_mask`` -> (B, L) bool. Not differentiable.
* ``sma_kernels::masked_attention`` -> (out, lse), with autograd through q, k, v by
  ``sma_kernels::masked_attention_backward``, over each backend's declared
  ``attention_forward`` / ``attention_backward`` (see :mod:`sma_kernels.backends`).
* ``sma_kernels::self_guided_attention`` -> (out, lse, mask, order, kept), for backends that
  declare the fused pair ``self_guided_attention_forward`` / ``ordered_attention_backward``:
  the mask and the attention in one op, whose saved kept-key ``order`` and ``kept`` count
  spare the backward from rebuilding them (``sma_kernels::ordered_attention_backward``).
  Autograd through q, k, v by way of ``out``; mask, order and kept are not differentiable.

Each op is a plain function registered with ``torch.library.custom_op``. Plain eager calls run
the plain functions (the attention through an ``autograd.Function`` with the op's autograd):
the same backend code without the custom-op dispatch, whose host time (tens of microseconds per
call, see ``bench/host_overhead.py``) is as long as a small attention kernel takes on a GPU.
Whenever something must see the ops (:func:`needs_registered_op`) the registered ops run.
Both paths give the same bits (tests/test_api.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from . import backends
from .plan import MaskPlan


def _mask_impl(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None,
               query_pool: torch.Tensor | None,
               query_rank: torch.Tensor, head: torch.Tensor, token_rank: torch.Tensor, ratio: float,
               num_per_query: int, head_mix: str, mask_self: bool, noise: float, scale: float,
               backend: str) -> torch.Tensor:
    return backends.serving(backend, q.dtype).self_guided_mask(
        q, k, valid, query_pool, MaskPlan(query_rank, head, token_rank), ratio=ratio,
        num_per_query=num_per_query, head_mix=head_mix, mask_self=mask_self, noise=noise, scale=scale)


def _attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                    scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return backends.serving(backend, q.dtype).attention_forward(q, k, v, keep, scale=scale)


def _attention_backward_impl(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                             v: torch.Tensor, keep: torch.Tensor, out: torch.Tensor,
                             lse: torch.Tensor, scale: float, backend: str
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backends.serving(backend, q.dtype).attention_backward(grad_out, q, k, v, keep, out, lse,
                                                                 scale=scale)


def _fused_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
                query_pool: torch.Tensor | None, query_rank: torch.Tensor, head: torch.Tensor,
                token_rank: torch.Tensor, ratio: float, num_per_query: int, head_mix: str,
                mask_self: bool, noise: float, scale: float, backend: str
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    serving = backends.serving(backend, q.dtype)
    if serving.self_guided_attention_forward is None:
        raise ValueError(f"backend={serving.name!r} (serving {backend!r} for {q.dtype}) has no "
                         "fused self_guided_attention; call the mask and masked_attention")
    return serving.self_guided_attention_forward(
        q, k, v, valid, query_pool, MaskPlan(query_rank, head, token_rank), ratio=ratio,
        num_per_query=num_per_query, head_mix=head_mix, mask_self=mask_self, noise=noise,
        scale=scale)


def _ordered_backward_impl(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor, order: torch.Tensor, kept: torch.Tensor,
                           out: torch.Tensor, lse: torch.Tensor, scale: float, backend: str
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backends.serving(backend, q.dtype).ordered_attention_backward(
        grad_out, q, k, v, order, kept, out, lse, scale=scale)


_mask_op = torch.library.custom_op("sma_kernels::self_guided_mask", _mask_impl, mutates_args=())
_attention_op = torch.library.custom_op("sma_kernels::masked_attention", _attention_impl,
                                        mutates_args=())
_attention_backward_op = torch.library.custom_op("sma_kernels::masked_attention_backward",
                                                 _attention_backward_impl, mutates_args=())


_fused_op = torch.library.custom_op("sma_kernels::self_guided_attention", _fused_impl,
                                    mutates_args=())
_ordered_backward_op = torch.library.custom_op("sma_kernels::ordered_attention_backward",
                                               _ordered_backward_impl, mutates_args=())


def _token_flags_fake(k: torch.Tensor, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """A (B, L) tensor like the mask (``valid`` may be None)."""
    return k.new_empty((k.shape[0], k.shape[2]), dtype=dtype)


@_mask_op.register_fake
def _(q, k, valid, query_pool, query_rank, head, token_rank, ratio, num_per_query, head_mix,
      mask_self, noise, scale, backend):
    return _token_flags_fake(k)


@_attention_op.register_fake
def _attention_fake(q, k, v, keep, scale, backend):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty((*q.shape[:3], v.shape[-1])), q.new_empty(q.shape[:3], dtype=lse_dtype)


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, keep, out, lse, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@_fused_op.register_fake
def _(q, k, v, valid, query_pool, query_rank, head, token_rank, ratio, num_per_query, head_mix,
      mask_self, noise, scale, backend):
    out, lse = _attention_fake(q, k, v, valid, scale, backend)
    return (out, lse, _token_flags_fake(k), _token_flags_fake(k, torch.int32),
            k.new_empty(k.shape[:1], dtype=torch.int32))


@_ordered_backward_op.register_fake
def _(grad_out, q, k, v, order, kept, out, lse, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _save_for_backward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       keys: tuple[torch.Tensor, ...], out: torch.Tensor, lse: torch.Tensor,
                       scale: float, backend: str, num_inputs: int) -> None:
    """What an attention backward reads: the inputs, which keys were kept (``keep``, or the
    fused op's ``order`` and ``kept``), the output and its lse."""
    ctx.save_for_backward(q, k, v, *keys, out, lse)
    ctx.scale, ctx.backend, ctx.num_inputs = scale, backend, num_inputs
    # lse is an output for the backward only; left unmaterialized, its gradient costs no launch.
    ctx.set_materialize_grads(False)


def _attention_setup_context(ctx, inputs, output) -> None:
    q, k, v, keep, scale, backend = inputs
    out, lse = output
    _save_for_backward(ctx, q, k, v, (keep,), out, lse, scale, backend, len(inputs))


def _fused_setup_context(ctx, inputs, output) -> None:
    q, k, v, *_, scale, backend = inputs
    out, lse, _, order, kept = output
    _save_for_backward(ctx, q, k, v, (order, kept), out, lse, scale, backend, len(inputs))


def _attention_grads(ctx, grad_out: torch.Tensor, backward: Callable[..., tuple]) -> tuple:
    """(dq, dk, dv) from ``backward(grad_out, q, k, v, *keys, out, lse, scale, backend)``, and
    no gradient for the other inputs."""
    q, k, v, *keys, out, lse = ctx.saved_tensors
    others = (None,) * (ctx.num_inputs - 3)
    if grad_out is None:  # only lse (or the mask) was used, and they carry no gradient
        return (None, None, None, *others)
    d_q, d_k, d_v = backward(grad_out.contiguous(), q, k, v, *keys, out, lse, ctx.scale,
                             ctx.backend)
    return (d_q, d_k, d_v, *others)


_attention_op.register_autograd(
    lambda ctx, grad_out, grad_lse: _attention_grads(ctx, grad_out, _attention_backward_op),
    setup_context=_attention_setup_context)
_fused_op.register_autograd(
    lambda ctx, grad_out, *_: _attention_grads(ctx, grad_out, _ordered_backward_op),
    setup_context=_fused_setup_context)


class _EagerAttention(torch.autograd.Function):
    """``masked_attention`` with its registered autograd, minus the custom-op dispatch.

    Like the op, it has no second derivative: the backward kernels are not differentiable, so
    differentiating through them raises instead of returning wrong numbers.
    """

    @staticmethod
    def forward(ctx, q, k, v, keep, scale, backend):
        # The forward(ctx, ...) form: with a separate setup_context, apply() binds its arguments
        # through inspect.signature on every call, which more than doubles its host time.
        out, lse = _attention_impl(q, k, v, keep, scale, backend)
        _attention_setup_context(ctx, (q, k, v, keep, scale, backend), (out, lse))
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_lse):
        return _attention_grads(ctx, grad_out, _attention_backward_impl)


class _EagerSelfGuidedAttention(torch.autograd.Function):
    """``sma_kernels::self_guided_attention`` with its registered autograd, minus the custom-op
    dispatch (as :class:`_EagerAttention`); mask, order and kept are integer outputs, which
    autograd leaves without gradient."""

    @staticmethod
    def forward(ctx, *inputs):
        outputs = _fused_impl(*inputs)
        _fused_setup_context(ctx, inputs, outputs)
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, *_):
        return _attention_grads(ctx, grad_out, _ordered_backward_impl)


def needs_registered_op(*tensors: torch.Tensor | None) -> bool:
    """Whether a call must go through the registered ops: under torch.compile or torch.export,
    a dispatch mode (make_fx, FakeTensorMode), a functorch transform (vmap, torch.func.grad), or
    with a tensor subclass (DTensor). (The ops also check that no output aliases an input; the
    backends return fresh tensors.)"""
    return (torch.compiler.is_compiling() or is_in_torch_dispatch_mode()
            or torch._C._functorch.peek_interpreter_stack() is not None
            or any(type(x) is not torch.Tensor for x in tensors if x is not None))


def _op_or_impl(op: Callable, impl: Callable, *tensors: torch.Tensor | None) -> Callable:
    """The registered op if :func:`needs_registered_op`, else the plain function."""
    return op if needs_registered_op(*tensors) else impl


def _eager(function: type[torch.autograd.Function], impl: Callable,
           *inputs: torch.Tensor) -> Callable:
    """``function.apply`` when autograd records the call, else ``impl``, the same computation
    without the autograd node (under no_grad or inference_mode, or without inputs that require
    grad: 10-20 us less host time per call)."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in inputs):
        return function.apply
    return impl


def self_guided_mask(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None,
                     query_pool: torch.Tensor | None, plan: MaskPlan, *, ratio: float,
                     num_per_query: int, head_mix: str, mask_self: bool, noise: float, scale: float,
                     backend: str) -> torch.Tensor:
    """The named backend's mask, through the op when it must be seen (q and k are detached)."""
    return _op_or_impl(_mask_op, _mask_impl, q, k, valid, query_pool)(
        q.detach(), k.detach(), valid, query_pool, *plan, ratio, num_per_query, head_mix, mask_self,
        noise, scale, backend)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, *,
                     scale: float, backend: str) -> torch.Tensor:
    """The named backend's attention over the ``keep`` keys, differentiable in q, k and v."""
    out, _ = _op_or_impl(_attention_op, _eager(_EagerAttention, _attention_impl, q, k, v), q, k, v)(
        q, k, v, keep, scale, backend)
    return out


def has_fused_attention(backend: str, dtype: torch.dtype) -> bool:
    """Whether the backend that serves ``backend`` for ``dtype`` declares the fused
    ``self_guided_attention`` pair (see :class:`sma_kernels.backends.Backend`)."""
    return backends.serving(backend, dtype).self_guided_attention_forward is not None


def self_guided_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          valid: torch.Tensor | None, query_pool: torch.Tensor | None,
                          plan: MaskPlan, *, ratio: float,
                          num_per_query: int, head_mix: str, mask_self: bool, noise: float,
                          scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, mask) from the named backend's fused pair, through the op when it must be seen;
    ``out`` is differentiable in q, k and v."""
    eager = _eager(_EagerSelfGuidedAttention, _fused_impl, q, k, v)
    out, _, mask, _, _ = _op_or_impl(_fused_op, eager, q, k, v, valid)(
        q, k, v, valid, query_pool, *plan, ratio, num_per_query, head_mix, mask_self, noise, scale,
        backend)
    return out, mask
