"""Public ops: argument checks, the randomness plan, backend choice and torch.library registration.

Two custom ops carry the work, so that both run under ``torch.compile`` and pass
``torch.library.opcheck``:

* ``sma_kernels::self_guided_mask`` -> (B, L) bool. Not differentiable.
* ``sma_kernels::masked_attention`` -> (out, lse), with autograd through q, k, v by
  ``sma_kernels::masked_attention_backward``.

Plain eager calls of the public functions run the same code without the custom-op dispatch
(see "custom ops" below).

Both take a ``backend`` name; each backend supplies the same three functions as
:mod:`sma_kernels.reference` (``self_guided_mask``, ``attention_forward``, ``attention_backward``).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from . import reference
from .plan import MaskPlan, make_plan, rank_order

HEAD_MIXES = ("mean", "random")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT64_MAX = 2**63 - 1


class Backend(NamedTuple):
    """What one backend provides, and on which device type."""

    device_type: str  # "cpu", "cuda", or "any"
    self_guided_mask: Callable[..., torch.Tensor]
    attention_forward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    attention_backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    # self_guided_attention attends with PyTorch's SDPA instead of the masked_attention op.
    uses_sdpa: bool = False


def _load_backends() -> tuple[dict[str, Backend], dict[str, str]]:
    """Backends that loaded here, and for the others the reason they did not."""
    loaded = {"reference": Backend("any", reference.self_guided_mask, reference.attention_forward,
                                   reference.attention_backward)}
    missing: dict[str, str] = {}
    from . import cpu
    if cpu.UNAVAILABLE is None:
        # The mask is the fused kernel; PyTorch's fused CPU attention applies it.
        loaded["cpp"] = Backend("cpu", cpu.self_guided_mask, reference.attention_forward,
                                reference.attention_backward, uses_sdpa=True)
    else:
        missing["cpp"] = cpu.UNAVAILABLE
    from . import triton as triton_backend
    if triton_backend.UNAVAILABLE is None:
        # Under TRITON_INTERPRET=1 the kernels run on CPU tensors (tests without a GPU).
        loaded["triton"] = Backend("any" if triton_backend.INTERPRET else "cuda",
                                   triton_backend.self_guided_mask,
                                   triton_backend.attention_forward, triton_backend.attention_backward)
    else:
        missing["triton"] = triton_backend.UNAVAILABLE
    return loaded, missing


_BACKENDS, _MISSING = _load_backends()
BACKEND_NAMES = ("auto", "reference", "cpp", "triton")
# "auto" picks the first available backend of the tensor's device type, in this order.
_AUTO_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("triton", "reference")}


def backends() -> dict[str, dict[str, Any]]:
    """Every backend: whether it is available here, for which device, and if not, why not."""
    info: dict[str, dict[str, Any]] = {}
    for name in BACKEND_NAMES[1:]:
        if name in _BACKENDS:
            info[name] = {"available": True, "device": _BACKENDS[name].device_type, "reason": None}
        else:
            info[name] = {"available": False, "device": {"cpp": "cpu"}.get(name, "cuda"),
                          "reason": _MISSING[name]}
    return info


def _resolve_backend(backend: object, device: torch.device) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, one of {BACKEND_NAMES}, got {type(backend).__name__}")
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    if backend == "auto":
        order = _AUTO_ORDER.get(device.type, ("reference",))
        return next(name for name in order if name in _BACKENDS)
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r} is not available here: {_MISSING[backend]}")
    wanted = _BACKENDS[backend].device_type
    if wanted != "any" and wanted != device.type:
        raise ValueError(f"backend={backend!r} runs on {wanted} tensors, but the inputs are on {device}")
    return backend


# ----------------------------------------------------------------------------- argument checks

def _check_tensor(name: str, x: object, rank: int, shape_doc: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have shape {shape_doc}, got {tuple(x.shape)}")
    return x


def _check_mask_tensor(name: str, x: object, shape: tuple[int, int], shape_doc: str,
                       device: torch.device) -> torch.Tensor:
    x = _check_tensor(name, x, 2, shape_doc)
    if x.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = real token), got {x.dtype}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape_doc} = {shape}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but q is on {device}")
    return x


def _type_name(value: object) -> str:
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _check_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {_type_name(value)}")


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {_type_name(value)}")
    value = float(value)
    if not -math.inf < value < math.inf:  # also False for NaN; traceable, unlike math.isfinite
        raise ValueError(f"{name} must be finite, got {value}")
    return value


class _Call(NamedTuple):
    """A checked call: tensors on one device, every default filled in."""

    valid: torch.Tensor
    query_pool: torch.Tensor
    plan: MaskPlan
    ratio: float
    num_per_query: int
    head_mix: str
    mask_self: bool
    noise: float
    scale: float
    backend: str


def _check_call(q: object, k: object, valid: object, *, ratio: object, num_per_query: object,
                head_mix: object, query_valid: object, mask_self: object, noise: object,
                scale: object, generator: object, plan: object, backend: object) -> _Call:
    q = _check_tensor("q", q, 4, "(B, H, Q, d)")
    k = _check_tensor("k", k, 4, "(B, H, L, d)")
    for name, x in (("q", q), ("k", k)):
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if k.dtype != q.dtype:
        raise TypeError(f"k must have q's dtype {q.dtype}, got {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"k is on {k.device} but q is on {q.device}")
    batch, heads, num_queries, dim = q.shape
    if k.shape[0] != batch or k.shape[1] != heads or k.shape[3] != dim:
        raise ValueError(f"k must have shape (B, H, L, d) = ({batch}, {heads}, L, {dim}) to match q "
                         f"{tuple(q.shape)}, got {tuple(k.shape)}")
    num_tokens = k.shape[2]
    if min(batch, heads, num_queries, num_tokens, dim) == 0:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must have no empty dimension")

    if valid is None:
        valid = torch.ones(batch, num_tokens, dtype=torch.bool, device=q.device)
    valid = _check_mask_tensor("valid", valid, (batch, num_tokens), "(B, L)", q.device)

    ratio = _check_real("ratio", ratio)
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must lie in (0, 1), got {ratio}")
    if isinstance(num_per_query, bool) or not isinstance(num_per_query, numbers.Integral):
        raise TypeError(f"num_per_query must be an int, got {_type_name(num_per_query)}")
    if not 1 <= num_per_query <= INT64_MAX:
        raise ValueError(f"num_per_query must lie in [1, 2**63 - 1], got {num_per_query}")
    if not isinstance(head_mix, str):
        raise TypeError(f"head_mix must be a str, one of {HEAD_MIXES}, got {type(head_mix).__name__}")
    if head_mix not in HEAD_MIXES:
        raise ValueError(f"head_mix must be one of {HEAD_MIXES}, got {head_mix!r}")
    mask_self = _check_bool("mask_self", mask_self)
    if mask_self and num_queries != num_tokens:
        raise ValueError(f"mask_self=True needs self-attention inputs with Q == L, got Q={num_queries}, "
                         f"L={num_tokens}")
    noise = _check_real("noise", noise)
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must lie in [0, 1], got {noise}")
    if scale is None:
        scale = dim ** -0.5
    else:
        scale = _check_real("scale", scale)
        # The kernels apply the scale in the inputs' dtype: it must be a positive finite number
        # there, or every logit would be 0 or non-finite.
        limits = torch.finfo(q.dtype)
        if not limits.tiny <= scale <= limits.max:
            raise ValueError(f"scale must be positive and finite in {q.dtype}, i.e. within "
                             f"[{limits.tiny:.4g}, {limits.max:.4g}], got {scale}")

    if query_valid is None:
        query_pool = valid if mask_self else torch.ones(batch, num_queries, dtype=torch.bool,
                                                        device=q.device)
    else:
        query_pool = _check_mask_tensor("query_valid", query_valid, (batch, num_queries), "(B, Q)",
                                        q.device)
        if mask_self:  # a chosen query token is masked itself, so it must be a real token
            query_pool = query_pool & valid

    if plan is None:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {_type_name(generator)}")
        if generator is not None and torch.compiler.is_compiling():
            raise TypeError("generator cannot be used inside torch.compile: TorchDynamo does not trace "
                            "torch.Generator objects. Draw a plan outside the compiled function with "
                            "make_plan(..., generator=...) and pass plan=, or seed the global RNG")
        plan = make_plan(batch, num_queries, num_tokens, heads, generator=generator, device=q.device)
    else:
        plan = _check_plan(plan, batch, num_queries, num_tokens, heads, q.device)
    return _Call(valid, query_pool, plan, ratio, int(num_per_query), head_mix, mask_self, noise,
                 scale, _resolve_backend(backend, q.device))


def _check_plan(plan: object, batch: int, num_queries: int, num_tokens: int, heads: int,
                device: torch.device) -> MaskPlan:
    """A user's plan, checked and with its ranks in the form every backend reads.

    Ranks may hold any int32 values (equal ranks break toward the lower index, see
    :func:`sma_kernels.plan.rank_order`), so only ``head`` needs a range check: it indexes the
    heads inside the kernels. The plan is checked on every call, so changing it in place between
    calls is safe.
    """
    if not isinstance(plan, tuple) or len(plan) != 3:
        raise TypeError(f"plan must be a MaskPlan from make_plan, got {_type_name(plan)}")
    plan = MaskPlan(*plan)
    shapes = {"query_rank": (batch, num_queries), "head": (batch, num_queries),
              "token_rank": (batch, num_tokens)}
    for field, shape in shapes.items():
        x = getattr(plan, field)
        if not isinstance(x, torch.Tensor) or x.dtype != torch.int32:
            raise TypeError(f"plan.{field} must be an int32 tensor, got "
                            f"{getattr(x, 'dtype', _type_name(x))}")
        if tuple(x.shape) != shape:
            raise ValueError(f"plan.{field} must have shape {shape} for these inputs, got {tuple(x.shape)}")
        if x.device != device:
            raise ValueError(f"plan.{field} is on {x.device} but q is on {device}")
    _check_head_range(plan.head, heads)
    return MaskPlan(rank_order(plan.query_rank), plan.head, rank_order(plan.token_rank))


def _check_head_range(head: torch.Tensor, heads: int) -> None:
    message = f"plan.head entries must lie in [0, {heads})"
    low, high = head.min(), head.max()
    if _needs_registered_op(head):
        # Traced (torch.compile, make_fx): an in-graph check, with no data-dependent branch.
        torch._assert_async((low >= 0) & (high < heads), message)
        return
    low, high = torch.stack([low, high]).tolist()  # one read-back (a device sync on a GPU)
    if low < 0 or high >= heads:
        raise ValueError(f"{message}, got [{low}, {high}]")


# ----------------------------------------------------------------------------- custom ops
#
# Each op is a plain function registered with torch.library.custom_op. Plain eager calls of the
# public functions call the plain functions (through an autograd.Function for the attention):
# the same backend code without the custom-op dispatch, whose host time (tens of microseconds
# per call, see bench/host_overhead.py) is as long as a small attention kernel takes on a GPU.
# Whenever something must see the ops (see _needs_registered_op) they call the registered ops.

def _mask_impl(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, query_pool: torch.Tensor,
               query_rank: torch.Tensor, head: torch.Tensor, token_rank: torch.Tensor, ratio: float,
               num_per_query: int, head_mix: str, mask_self: bool, noise: float, scale: float,
               backend: str) -> torch.Tensor:
    return _BACKENDS[backend].self_guided_mask(
        q, k, valid, query_pool, MaskPlan(query_rank, head, token_rank), ratio=ratio,
        num_per_query=num_per_query, head_mix=head_mix, mask_self=mask_self, noise=noise, scale=scale)


def _attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                    scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _BACKENDS[backend].attention_forward(q, k, v, keep, scale=scale)


def _attention_backward_impl(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                             v: torch.Tensor, keep: torch.Tensor, out: torch.Tensor,
                             lse: torch.Tensor, scale: float, backend: str
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _BACKENDS[backend].attention_backward(grad_out, q, k, v, keep, out, lse, scale=scale)


_mask_op = torch.library.custom_op("sma_kernels::self_guided_mask", _mask_impl, mutates_args=())
_attention_op = torch.library.custom_op("sma_kernels::masked_attention", _attention_impl,
                                        mutates_args=())
_attention_backward_op = torch.library.custom_op("sma_kernels::masked_attention_backward",
                                                 _attention_backward_impl, mutates_args=())


@_mask_op.register_fake
def _(q, k, valid, query_pool, query_rank, head, token_rank, ratio, num_per_query, head_mix,
      mask_self, noise, scale, backend):
    return valid.new_empty(valid.shape)


@_attention_op.register_fake
def _(q, k, v, keep, scale, backend):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty((*q.shape[:3], v.shape[-1])), q.new_empty(q.shape[:3], dtype=lse_dtype)


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, keep, out, lse, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_setup_context(ctx, inputs, output) -> None:
    q, k, v, keep, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, keep, out, lse)
    ctx.scale, ctx.backend = scale, backend


def _attention_grads(ctx, grad_out: torch.Tensor, backward: Callable[..., tuple]) -> tuple:
    q, k, v, keep, out, lse = ctx.saved_tensors
    d_q, d_k, d_v = backward(grad_out.contiguous(), q, k, v, keep, out, lse, ctx.scale, ctx.backend)
    return d_q, d_k, d_v, None, None, None


_attention_op.register_autograd(
    lambda ctx, grad_out, grad_lse: _attention_grads(ctx, grad_out, _attention_backward_op),
    setup_context=_attention_setup_context)


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


def _needs_registered_op(*tensors: torch.Tensor) -> bool:
    """Whether a call must go through the registered ops: under torch.compile or torch.export,
    a dispatch mode (make_fx, FakeTensorMode), a functorch transform (vmap, torch.func.grad), or
    with a tensor subclass (DTensor). (The ops also check that no output aliases an input; the
    backends return fresh tensors.)"""
    return (torch.compiler.is_compiling() or is_in_torch_dispatch_mode()
            or torch._C._functorch.peek_interpreter_stack() is not None
            or any(type(x) is not torch.Tensor for x in tensors))


def _op_or_impl(op: Callable, impl: Callable, *tensors: torch.Tensor) -> Callable:
    """The registered op if :func:`_needs_registered_op`, else the plain function."""
    return op if _needs_registered_op(*tensors) else impl


# ----------------------------------------------------------------------------- public functions

def _autocast_inputs(*tensors: object) -> tuple[tuple[object, ...], contextlib.AbstractContextManager]:
    """The rule under ``torch.autocast``: the ops behave as scaled_dot_product_attention does.

    When autocast is on for the first tensor's device type, every floating-point input except
    float64 is cast to the autocast dtype, and the op then runs with autocast off, exactly as it
    would on inputs of that dtype: the mask's scores in fp32 from those values on every backend,
    the output in that dtype. Returns the inputs and the context to run the op in.
    """
    first = tensors[0]
    if not isinstance(first, torch.Tensor) or not torch.is_autocast_enabled(first.device.type):
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
    """Choose SMA's self-guided mask from the first layer's attention (DESIGN.md section 2).

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
            plan gives the same mask on every backend.
        backend: "auto", "reference", "cpp" (CPU tensors) or "triton" (CUDA tensors).

    Returns:
        (B, L) bool, True = masked. Padding is never masked; each sample with n_b >= 2 real
        tokens has exactly k masked.

    Edge rules (README, "The rules at the edges"): padded keys are never read; a (head, row)
    whose fp32 logits over the real tokens are not all finite adds nothing to the scores; under
    ``torch.autocast`` float inputs other than float64 are cast to the autocast dtype first, as
    scaled_dot_product_attention does; a ``generator`` cannot be used inside ``torch.compile``.
    """
    (q, k), autocast_off = _autocast_inputs(q, k)
    call = _check_call(q, k, valid, ratio=ratio, num_per_query=num_per_query, head_mix=head_mix,
                       query_valid=query_valid, mask_self=mask_self, noise=noise, scale=scale,
                       generator=generator, plan=plan, backend=backend)
    with autocast_off:
        return _op_or_impl(_mask_op, _mask_impl, q, k, call.valid)(
            q.detach(), k.detach(), call.valid, call.query_pool, *call.plan, call.ratio,
            call.num_per_query, call.head_mix, call.mask_self, call.noise, call.scale, call.backend)


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
    (q, k, v), autocast_off = _autocast_inputs(q, k, v)
    call = _check_call(q, k, valid, ratio=ratio, num_per_query=num_per_query, head_mix=head_mix,
                       query_valid=query_valid, mask_self=mask_self, noise=noise, scale=scale,
                       generator=generator, plan=plan, backend=backend)
    v = _check_tensor("v", v, 4, "(B, H, L, dv)")
    if v.dtype != q.dtype:
        raise TypeError(f"v must have q's dtype {q.dtype}, got {v.dtype}")
    if v.device != q.device:
        raise ValueError(f"v is on {v.device} but q is on {q.device}")
    if tuple(v.shape[:3]) != tuple(k.shape[:3]) or v.shape[3] == 0:
        raise ValueError(f"v must have shape (B, H, L, dv) = {tuple(k.shape[:3])} + (dv,), "
                         f"got {tuple(v.shape)}")
    with autocast_off:
        mask = _op_or_impl(_mask_op, _mask_impl, q, k, call.valid)(
            q.detach(), k.detach(), call.valid, call.query_pool, *call.plan, call.ratio,
            call.num_per_query, call.head_mix, call.mask_self, call.noise, call.scale, call.backend)
        keep = call.valid ^ mask  # = valid & ~mask in one op: padding is never masked
        if _BACKENDS[call.backend].uses_sdpa:
            return reference.sdpa_attention(q, k, v, keep, scale=call.scale), mask
        out, _ = _op_or_impl(_attention_op, _EagerAttention.apply, q, k, v)(q, k, v, keep, call.scale,
                                                                             call.backend)
    return out, mask


def drop_masked(x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE-style repack: move each sample's kept tokens to the front, in order, and re-pad.

    Args:
        x: (B, L, ...) token features.
        keep: (B, L) bool, True = keep (e.g. ``valid & ~mask``); the dropped tokens may sit anywhere.

    Returns:
        ``x_packed`` (B, L', ...) with L' = the largest kept count (zeros past each sample's count),
        ``valid_packed`` (B, L') bool, and ``index`` (B, L') int64: the position in ``x`` of each
        packed token (0 where ``valid_packed`` is False). Differentiable with respect to ``x``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (B, L, ...), got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (B, L, ...), got {tuple(x.shape)}")
    keep = _check_mask_tensor("keep", keep, tuple(x.shape[:2]), "(B, L)", x.device)
    counts = keep.sum(dim=1)
    width = int(counts.max()) if keep.numel() else 0
    # A stable sort of "dropped" flags puts the kept tokens first, in their original order.
    order = (~keep).to(torch.uint8).sort(dim=1, stable=True).indices[:, :width]
    valid_packed = torch.arange(width, device=x.device)[None, :] < counts[:, None]
    index = order.masked_fill(~valid_packed, 0)
    gather_index = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    fill = valid_packed.view(*valid_packed.shape, *([1] * (x.dim() - 2)))
    x_packed = torch.where(fill, torch.gather(x, 1, gather_index), torch.zeros((), dtype=x.dtype,
                                                                                device=x.device))
    return x_packed, valid_packed, index
