"""Kernel launches that skip Triton's per-call launch path once a kernel is compiled.

``kernel[grid](**kwargs)`` goes through ``Autotuner.run`` (for an autotuned kernel) and
``JITFunction.run`` on every call: they bind the arguments, specialize each one, build the
cache key, look up the autotuned config and the compiled kernel, and check the kernel's
globals. With the 20-60 arguments of these kernels that Python costs 35-60 us per launch on a
2-core VM (``python -m bench.host_overhead``): as much as all of sma-kernels' own host work in a
call. At the small workloads a call is bound by host time, so the ratio to SDPA pays for it.

:func:`launch` does what ``kernel[grid](**kwargs)`` does. The first launch with a given
signature goes through Triton, which compiles and autotunes as usual and returns the compiled
kernel; :func:`launch` keeps it, with the config the autotuner chose and the kernel's argument
order. A later launch with the same signature calls that compiled kernel's own launcher
(``compiled[grid](*args)``, the call ``JITFunction.run`` ends with), a few microseconds.

The signature holds everything Triton's choice of compiled kernel depends on, and more: the
kernel, the current device, the argument names, every int, bool, str and None argument exactly
(Triton specializes ints equal to 1 or divisible by 16 and types them by range), the dtype and
address modulo 16 of every tensor (Triton marks 16-byte-aligned pointers), and the type of the
float arguments (never specialized). So a signature never maps to a compiled kernel that
Triton would not have chosen; an int that changes on every call only sends those calls through
Triton. The launch arguments are the same either way (``tests/test_triton_launch.py`` checks
them argument by argument).

Under the interpreter (``TRITON_INTERPRET=1``) nothing is compiled and every launch goes
through Triton; ``SMA_KERNELS_DIRECT_LAUNCH=0`` does the same on a GPU.
"""

from __future__ import annotations

import inspect
import operator
import os
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from triton.runtime import Autotuner, JITFunction
from triton.runtime.driver import driver

from ._common import INTERPRET

DIRECT = not INTERPRET and os.environ.get("SMA_KERNELS_DIRECT_LAUNCH", "1") != "0"
# Signatures kept at most; past it the cache starts over (a model whose shapes keep changing).
CACHE_LIMIT = 4096

Grid = tuple[int, ...] | Callable[[dict[str, Any]], tuple[int, ...]]


class Compiled(NamedTuple):
    """What a launch with a known signature needs."""

    kernel: Any  # Triton's CompiledKernel
    arguments: Callable[[dict[str, Any]], tuple]  # the kernel's arguments, in order, by name
    fixed: dict[str, Any]  # the autotuned config's meta-parameters and the parameters' defaults


_compiled: dict[tuple, Compiled] = {}
_first_launch = threading.Lock()


def signature(kernel: Any, kwargs: dict[str, Any]) -> tuple:
    """The cache key of a launch (see the module docstring). One expression, not a function per
    argument: it runs on every launch, over up to 60 arguments."""
    return (kernel, driver.active.get_current_device(), *kwargs, *[
        value if (kind := type(value)) is int or kind is str or value is None
        else (value.dtype, value.data_ptr() % 16) if isinstance(value, torch.Tensor)
        else float if kind is float
        else (kind, value)  # a bool (not the int 1), or a constexpr
        for value in kwargs.values()])


def _jit_function(kernel: Any) -> JITFunction:
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn  # behind triton.autotune
    return kernel


def _keep(kernel: Any, compiled: Any) -> Compiled:
    function = _jit_function(kernel)
    fixed = {name: parameter.default for name, parameter in function.signature.parameters.items()
             if parameter.default is not inspect.Parameter.empty}
    if isinstance(kernel, Autotuner):
        fixed.update(kernel.best_config.kwargs)
    return Compiled(compiled, operator.itemgetter(*function.arg_names), fixed)


def launch(kernel: Any, grid: Grid, **kwargs: Any) -> None:
    """``kernel[grid](**kwargs)``, through the compiled kernel of an earlier launch with the same
    signature when there is one. ``kernel`` is a ``triton.jit`` function, or one behind
    ``triton.autotune``; ``grid`` a tuple, or a function of the arguments and meta-parameters."""
    if not DIRECT:
        kernel[grid](**kwargs)
        return
    key = signature(kernel, kwargs)
    entry = _compiled.get(key)
    if entry is None:
        # Under the lock, no other launch runs the autotuner before best_config is read (the
        # autograd engine launches the backward from its own thread).
        with _first_launch:
            compiled = kernel[grid](**kwargs)
            if compiled is not None:  # None: a Triton hook skipped the compilation
                if len(_compiled) >= CACHE_LIMIT:
                    _compiled.clear()
                _compiled[key] = _keep(kernel, compiled)
        return
    arguments = {**entry.fixed, **kwargs}
    if callable(grid):
        grid = grid(arguments)
    grid = (*grid, 1, 1)[:3]  # the compiled kernel's launcher reads three dimensions
    entry.kernel[grid](*entry.arguments(arguments))
