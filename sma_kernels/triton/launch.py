"""Kernel launches that skip Triton's per-call launch path once a kernel is compiled.

``kernel[grid](**kwargs)`` goes through ``Autotuner.run`` (for an autotuned kernel) and
``JITFunction.run`` on every call: they bind the arguments, specialize each one, build the
cache key, look up the autotuned config and the compiled kernel, and check the kernel's
globals. With the 7-60 arguments of these kernels that Python costs 35-65 us per launch on a
2-core VM (``python -m bench.launch_overhead``): as much as all of sma-kernels' own host work in
a call. At the small workloads a call is bound by host time, so the ratio to SDPA pays for it.

:func:`launch` does what ``kernel[grid](**kwargs)`` does. The first launch with a given key
goes through Triton, which compiles and autotunes as usual and returns the compiled kernel;
:func:`launch` keeps it, with the config the autotuner chose and the kernel's argument order. A
later launch with the same key calls that compiled kernel's own launcher
(``compiled[grid](*args)``, the call ``JITFunction.run`` ends with): 13-26 us on the same VM,
most of it building the key.

The key holds what Triton's choice of compiled kernel and config depends on, and more: the
kernel, the current device, the argument names, every int, float, bool, str and None argument
by value (Triton specializes ints equal to 1 or divisible by 16 and types them by range), and
each tensor's dtype and address modulo 16 (Triton marks 16-byte-aligned pointers). So a direct
launch runs the kernel Triton would have run, with the same arguments
(``tests/test_triton_launch.py`` compares them launch by launch). An argument of another type,
a kernel behind anything but ``triton.autotune``, and a config or kernel with a pre-launch hook
always go through Triton. What Triton reads at every launch and a kept kernel does not: its
knobs (``TRITON_DEBUG`` and the like), and the values of the kernel's globals; after changing
either at run time, or an autotuner's configs, call :func:`clear`.

Under the interpreter (``TRITON_INTERPRET=1``) nothing is compiled and every launch goes
through Triton; ``SMA_KERNELS_DIRECT_LAUNCH=0`` does the same on a GPU.
"""

from __future__ import annotations

import inspect
import os
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from triton.runtime import Autotuner, JITFunction
from triton.runtime.driver import driver

from ._common import INTERPRET

DIRECT = not INTERPRET and os.environ.get("SMA_KERNELS_DIRECT_LAUNCH", "1") != "0"
# Keys kept at most; past it the cache starts over (a model whose shapes keep changing).
CACHE_LIMIT = 4096

Grid = tuple[int, ...] | Callable[[dict[str, Any]], tuple[int, ...]]


class Kept(NamedTuple):
    """What a launch with a known key needs."""

    compiled: Any  # Triton's CompiledKernel
    arg_names: tuple[str, ...]  # the kernel's parameters, in order
    fixed: dict[str, Any]  # the autotuned config's meta-parameters and the parameters' defaults


_kept: dict[tuple, Kept] = {}
# Reentrant: a Triton hook run by a first launch may launch again.
_first_launch = threading.RLock()
_KEYED_BY_VALUE = (int, float, bool, str, type(None))


def launch_key(kernel: Any, kwargs: dict[str, Any]) -> tuple | None:
    """The key of a launch (see the module docstring), or None when an argument is of a type it
    does not cover (the launch then goes through Triton)."""
    key = [kernel, driver.active.get_current_device(), *kwargs]
    for value in kwargs.values():
        kind = type(value)
        if kind in _KEYED_BY_VALUE:
            key += (kind, value)  # the type too: True == 1 and 1 == 1.0, but Triton tells them apart
        elif isinstance(value, torch.Tensor):
            key += (value.dtype, value.data_ptr() % 16)
        else:
            return None
    return tuple(key)


def clear() -> None:
    """Forget every kept kernel: the next launch of each goes through Triton again."""
    with _first_launch:
        _kept.clear()


def _keep(kernel: Any, compiled: Any) -> Kept | None:
    """What later launches need, or None for a launch that must always go through Triton."""
    if compiled is None:  # a Triton hook skipped the compilation
        return None
    function = kernel.fn if isinstance(kernel, Autotuner) else kernel
    if not isinstance(function, JITFunction) or function.pre_run_hooks:
        return None
    fixed = {name: parameter.default for name, parameter in function.signature.parameters.items()
             if parameter.default is not inspect.Parameter.empty}
    if isinstance(kernel, Autotuner):
        if kernel.best_config.pre_hook is not None:
            return None
        fixed.update(kernel.best_config.kwargs)
    if hasattr(compiled, "result"):  # compiled asynchronously (Triton's AsyncCompileMode)
        compiled = compiled.result()
    return Kept(compiled, tuple(function.arg_names), fixed)


def launch(kernel: Any, grid: Grid, /, **kwargs: Any) -> None:
    """``kernel[grid](**kwargs)``, through the compiled kernel of an earlier launch with the same
    key when there is one. ``kernel`` is a ``triton.jit`` function, or one behind
    ``triton.autotune``; ``grid`` a tuple, or a function of the arguments and meta-parameters."""
    key = launch_key(kernel, kwargs) if DIRECT else None
    kept = None if key is None else _kept.get(key)
    if kept is None:
        if key is None:
            kernel[grid](**kwargs)
            return
        # Under the lock, no other launch runs the autotuner before best_config is read (the
        # autograd engine launches the backward from its own thread).
        with _first_launch:
            kept = _keep(kernel, kernel[grid](**kwargs))
            if kept is not None:
                if len(_kept) >= CACHE_LIMIT:
                    _kept.clear()
                _kept[key] = kept
        return
    arguments = {**kept.fixed, **kwargs}
    dims = grid(arguments) if callable(grid) else grid
    # The compiled kernel's launcher reads three grid dimensions.
    kept.compiled[(*dims, 1, 1)[:3]](*[arguments[name] for name in kept.arg_names])
