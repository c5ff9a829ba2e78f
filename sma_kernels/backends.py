"""The backends: each declares itself once, as a :class:`Backend`; the rest is derived here.

A backend module (``reference``, ``cpu``, ``triton``) ends with ``BACKEND = Backend(...)``: its
name, where it runs, the dtypes its kernels serve, its functions, and why it is unavailable (a
missing package, no GPU). :func:`backends` and ``backend="auto"`` read that list and nothing
else. To add a backend, write a module with the functions described on :class:`Backend`, end it
with its declaration, and add the module's name to ``_MODULES`` (the order is ``"auto"``'s
preference). Its tests then come from ``tests/`` parametrized over :func:`backends`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def always_available() -> str | None:
    return None


@dataclass(frozen=True)
class Backend:
    """One backend's declaration.

    The functions have the contracts of their namesakes in :mod:`sma_kernels.reference`
    (``valid`` and ``query_pool`` may be None: every token, every query row):

    * ``self_guided_mask(q, k, valid, query_pool, plan, *, ratio, num_per_query, head_mix,
      mask_self, noise, scale) -> (B, L) bool``;
    * ``attention_forward(q, k, v, keep, *, scale) -> (out, lse)`` and
      ``attention_backward(grad_out, q, k, v, keep, out, lse, *, scale) -> (dq, dk, dv)``, which
      the package registers as the ``sma_kernels::masked_attention`` op with its autograd;
    * optionally, a fused pair for ``self_guided_attention``:
      ``self_guided_attention_forward(q, k, v, valid, query_pool, plan, *, ratio, num_per_query,
      head_mix, mask_self, noise, scale) -> (out, lse, mask, order, kept)``, the mask and the
      attention over keep = valid & ~mask in one go, where ``order`` (B, L) int32 lists each
      sample's kept keys ascending then the dropped ones and ``kept`` (B,) int32 counts the
      kept ones; and ``ordered_attention_backward(grad_out, q, k, v, order, kept, out, lse, *,
      scale) -> (dq, dk, dv)``, the attention's backward over that saved order. The package
      registers them as the ``sma_kernels::self_guided_attention`` op; a backend without them
      serves ``self_guided_attention`` as the mask followed by ``attention_forward``.

    Attributes:
        name: what ``backend=`` takes.
        devices: device types whose tensors it accepts (None: any).
        auto_devices: device types for which ``backend="auto"`` may choose it (None: any).
        dtypes: input dtypes its kernels serve.
        fallback: the backend that serves the other float dtypes (None: they are refused).
        unavailable: why it cannot run here, or None when it can.
    """

    name: str
    devices: tuple[str, ...] | None
    auto_devices: tuple[str, ...] | None
    dtypes: tuple[torch.dtype, ...]
    self_guided_mask: Callable[..., torch.Tensor] | None
    attention_forward: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    attention_backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
    self_guided_attention_forward: Callable[..., tuple[torch.Tensor, ...]] | None = None
    ordered_attention_backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
    fallback: str | None = None
    unavailable: Callable[[], str | None] = always_available

    def runs_on(self, device_type: str) -> bool:
        return self.devices is None or device_type in self.devices


_MODULES = ("triton", "cpu", "reference")  # "auto" prefers them in this order


def _declare() -> tuple[dict[str, Backend], dict[str, str | None]]:
    found = [importlib.import_module(f"{__package__}.{module}").BACKEND for module in _MODULES]
    return {b.name: b for b in found}, {b.name: b.unavailable() for b in found}


def declared() -> dict[str, Backend]:
    """Every backend's declaration, by name, in "auto"'s order of preference."""
    return _DECLARED


def unavailable_reasons() -> dict[str, str | None]:
    return _UNAVAILABLE


def names() -> tuple[str, ...]:
    """What ``backend=`` accepts."""
    return ("auto", *declared())


def get(name: str) -> Backend:
    return declared()[name]


def serving(name: str, dtype: torch.dtype) -> Backend:
    """The backend that runs ``name``'s work for inputs of ``dtype``: itself, or its fallback
    (the registered ops take a backend name and apply this, so a direct op call falls back too)."""
    backend = declared()[name]
    if dtype in backend.dtypes or backend.fallback is None:
        return backend
    return serving(backend.fallback, dtype)


def backends() -> dict[str, dict[str, Any]]:
    """Every backend: whether it runs here (and if not, why not), on which devices, for which dtypes.

    ``device`` is "cpu", "cuda" or "any"; ``dtypes`` are the dtypes its kernels serve, and
    ``fallback`` names the backend that serves the other float dtypes (e.g. triton hands float64
    to the reference).
    """
    info: dict[str, dict[str, Any]] = {}
    for name, backend in declared().items():
        reason = unavailable_reasons()[name]
        devices = backend.devices
        info[name] = {
            "available": reason is None,
            "device": "any" if devices is None or len(devices) > 1 else devices[0],
            "dtypes": [str(dtype).removeprefix("torch.") for dtype in backend.dtypes],
            "fallback": backend.fallback,
            "reason": reason,
        }
    return info


def resolve(requested: object, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs a call: ``requested``, or "auto"'s choice, or the fallback for dtype."""
    if not isinstance(requested, str):
        raise TypeError(f"backend must be a str, one of {names()}, got {type(requested).__name__}")
    if requested not in names():
        raise ValueError(f"backend must be one of {names()}, got {requested!r}")
    reasons = unavailable_reasons()
    if requested == "auto":
        for name, backend in declared().items():
            if (reasons[name] is None and dtype in backend.dtypes
                    and (backend.auto_devices is None or device.type in backend.auto_devices)):
                return name
        raise ValueError(f"no backend serves {dtype} tensors on {device}: {backends()}")
    if reasons[requested] is not None:
        raise ValueError(f"backend={requested!r} is not available here: {reasons[requested]}")
    backend = get(requested)
    if not backend.runs_on(device.type):
        raise ValueError(f"backend={requested!r} runs on {', '.join(backend.devices)} tensors, but the "
                         f"inputs are on {device}")
    if dtype not in backend.dtypes:
        if backend.fallback is None:
            raise ValueError(f"backend={requested!r} serves {backends()[requested]['dtypes']}, "
                             f"not {dtype}")
        return resolve(backend.fallback, device, dtype)
    return requested


# Read once, at import (each module declares its backend when imported; the modules import this
# one for Backend, which is defined by now). Plain dicts, so torch.compile traces the lookups.
_DECLARED, _UNAVAILABLE = _declare()
