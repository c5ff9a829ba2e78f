"""Argument checks of the public ops: every argument named in its error, defaults filled in.

:func:`check_call` turns the public functions' arguments into a :class:`CheckedCall`, or raises a
``TypeError`` / ``ValueError`` that names the argument and the expected shape. Nothing past this
module sees an unchecked value, so the kernels never index out of bounds.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from . import backends
from .backends import FLOAT_DTYPES
from .plan import MaskPlan, draw_plan, query_pool_argument

HEAD_MIXES = ("mean", "random")
INT64_MAX = 2**63 - 1


class CheckedCall(NamedTuple):
    """A checked call: tensors on one device, every default filled in.

    ``valid``, ``query_pool`` and ``plan`` are what the backends take, not yet reduced: None for
    a ``valid`` or pool that is all set (the default without ``query_valid`` and ``mask_self``),
    which a backend may use without materializing it; under ``mask_self`` each backend
    intersects the pool with ``valid``, and it reads the plan's heads mod H (a plan the call
    draws itself holds the raw draws there), so that none of these costs an op here.
    """

    valid: torch.Tensor | None
    query_pool: torch.Tensor | None
    plan: MaskPlan
    ratio: float
    num_per_query: int
    head_mix: str
    mask_self: bool
    noise: float
    scale: float
    backend: str


def check_tensor(name: str, x: object, rank: int, shape_doc: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have shape {shape_doc}, got {tuple(x.shape)}")
    return x


def check_mask_tensor(name: str, x: object, shape: tuple[int, int], shape_doc: str,
                       device: torch.device, *, on: str = "q",
                       meaning: str = "True = real token") -> torch.Tensor:
    """A (B, L) or (B, Q) bool tensor ``name`` on the device of the tensor named ``on``."""
    x = check_tensor(name, x, 2, shape_doc)
    if x.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor ({meaning}), got {x.dtype}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape_doc} = {shape}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but {on} is on {device}")
    return x


def type_name(value: object) -> str:
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def check_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {type_name(value)}")


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type_name(value)}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type_name(value)}")
    value = float(value)
    if not -math.inf < value < math.inf:  # also False for NaN; traceable, unlike math.isfinite
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_call(q: object, k: object, valid: object, *, ratio: object, num_per_query: object,
                head_mix: object, query_valid: object, mask_self: object, noise: object,
                scale: object, generator: object, plan: object, backend: object) -> CheckedCall:
    q = check_tensor("q", q, 4, "(B, H, Q, d)")
    k = check_tensor("k", k, 4, "(B, H, L, d)")
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

    if valid is not None:
        valid = check_mask_tensor("valid", valid, (batch, num_tokens), "(B, L)", q.device)

    ratio = check_real("ratio", ratio)
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must lie in (0, 1), got {ratio}")
    if isinstance(num_per_query, bool) or not isinstance(num_per_query, numbers.Integral):
        raise TypeError(f"num_per_query must be an int, got {type_name(num_per_query)}")
    if not 1 <= num_per_query <= INT64_MAX:
        raise ValueError(f"num_per_query must lie in [1, 2**63 - 1], got {num_per_query}")
    if not isinstance(head_mix, str):
        raise TypeError(f"head_mix must be a str, one of {HEAD_MIXES}, got {type(head_mix).__name__}")
    if head_mix not in HEAD_MIXES:
        raise ValueError(f"head_mix must be one of {HEAD_MIXES}, got {head_mix!r}")
    mask_self = check_bool("mask_self", mask_self)
    if mask_self and num_queries != num_tokens:
        raise ValueError(f"mask_self=True needs self-attention inputs with Q == L, got Q={num_queries}, "
                         f"L={num_tokens}")
    noise = check_real("noise", noise)
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must lie in [0, 1], got {noise}")
    if scale is None:
        scale = dim ** -0.5
    else:
        scale = check_real("scale", scale)
        # The kernels apply the scale in the inputs' dtype: it must be a positive finite number
        # there, or every logit would be 0 or non-finite.
        limits = torch.finfo(q.dtype)
        if not limits.tiny <= scale <= limits.max:
            raise ValueError(f"scale must be positive and finite in {q.dtype}, i.e. within "
                             f"[{limits.tiny:.4g}, {limits.max:.4g}], got {scale}")

    if query_valid is not None:
        query_valid = check_mask_tensor("query_valid", query_valid, (batch, num_queries), "(B, Q)",
                                        q.device)
    query_pool = query_pool_argument(valid, query_valid, mask_self)

    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type_name(generator)}")
    if plan is None:
        if generator is not None and torch.compiler.is_compiling():
            raise TypeError("generator cannot be used inside torch.compile: TorchDynamo does not trace "
                            "torch.Generator objects. Draw a plan outside the compiled function with "
                            "make_plan(..., generator=...) and pass plan=, or seed the global RNG")
        # make_plan's draw without its remainder: the backends read the heads mod H.
        plan = draw_plan(batch, num_queries, num_tokens, generator=generator, device=q.device)
    else:
        plan = check_plan(plan, batch, num_queries, num_tokens, heads, q.device)
    return CheckedCall(valid, query_pool, plan, ratio, int(num_per_query), head_mix, mask_self, noise,
                 scale, backends.resolve(backend, q.device, q.dtype))


def check_plan(plan: object, batch: int, num_queries: int, num_tokens: int, heads: int,
                device: torch.device) -> MaskPlan:
    """A user's plan, checked.

    Ranks may hold any int32 values (every backend breaks equal ranks toward the lower index), so
    only ``head`` needs a range check: it indexes the heads inside the kernels. The plan is
    checked on every call, so changing it in place between calls is safe.
    """
    if not isinstance(plan, tuple) or len(plan) != 3:
        raise TypeError(f"plan must be a MaskPlan from make_plan, got {type_name(plan)}")
    plan = MaskPlan(*plan)
    shapes = {"query_rank": (batch, num_queries), "head": (batch, num_queries),
              "token_rank": (batch, num_tokens)}
    for field, shape in shapes.items():
        x = getattr(plan, field)
        if not isinstance(x, torch.Tensor) or x.dtype != torch.int32:
            raise TypeError(f"plan.{field} must be an int32 tensor, got "
                            f"{getattr(x, 'dtype', type_name(x))}")
        if tuple(x.shape) != shape:
            raise ValueError(f"plan.{field} must have shape {shape} for these inputs, got {tuple(x.shape)}")
        if x.device != device:
            raise ValueError(f"plan.{field} is on {x.device} but q is on {device}")
    check_head_range(plan.head, heads)
    return plan


def check_head_range(head: torch.Tensor, heads: int) -> None:
    """``plan.head`` in [0, H), checked on the plan's device without reading anything back.

    No host sync, so that a call with a user's plan (moved by ``MaskPlan.to()``, sliced, or
    edited in place) can be captured in a CUDA graph and never waits for the device.
    ``torch._assert_async`` fails at once on CPU tensors, raised here as the ValueError of the
    argument contract; on a GPU it is an asynchronous device-side assertion: an entry out of
    range stops the program with "device-side assert triggered" at the next synchronization,
    and the CUDA context cannot be used afterwards. Under torch.compile it is an in-graph
    assertion, a RuntimeError.
    """
    message = f"plan.head entries must lie in [0, {heads})"
    try:
        torch._assert_async(torch.all(head.clamp(0, heads - 1) == head), message)
    except RuntimeError:
        # Raised at once only for CPU tensors in eager mode: reading the bounds then costs no
        # device sync, and the message names them.
        raise ValueError(f"{message}, got [{int(head.min())}, {int(head.max())}]") from None


def check_v(v: object, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    v = check_tensor("v", v, 4, "(B, H, L, dv)")
    if v.dtype != q.dtype:
        raise TypeError(f"v must have q's dtype {q.dtype}, got {v.dtype}")
    if v.device != q.device:
        raise ValueError(f"v is on {v.device} but q is on {q.device}")
    if tuple(v.shape[:3]) != tuple(k.shape[:3]) or v.shape[3] == 0:
        raise ValueError(f"v must have shape (B, H, L, dv) = {tuple(k.shape[:3])} + (dv,), "
                         f"got {tuple(v.shape)}")
    return v
