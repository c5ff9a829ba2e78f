"""Kernel launches that skip Triton's per-call launch path once a kernel is compiled.

``kernel[grid](**kwargs)`` goes through ``Autotuner.run`` (for an autotuned kernel) and
``JITFunction.run`` on every call: they bind the arguments, specialize each one, build the
cache key, look up the autotuned config and the compiled kernel, and check the kernel's
globals. With the 7-60 arguments of these kernels that Python costs 20-39 us per launch on a
2-core VM (``python -m bench.launch_overhead``): over a forward's three launches, more than all
of sma-kernels' other host work in the call. At the small workloads a call is bound by host
time, so the ratio to SDPA pays for it.

A launch here comes in two parts. The tensors are passed as keyword arguments. Everything else
(the grid, the sizes, strides and flags, the meta-parameters) is a :class:`Static`. A launcher
builds it with a memoized function of the shapes, strides, dtype and options it derives them
from (``functools.lru_cache`` over hashable arguments and nothing else), so that a call with
the layout and options of an earlier one gets the same object and builds no argument again.

:func:`launch` does what ``kernel[static.grid](**tensors, **static.scalars)`` does. The first
launch with a given key goes through Triton, which compiles and autotunes as usual and returns
the compiled kernel. :func:`launch` keeps it, with the config the autotuner chose, the kernel's
arguments in order and the grid. A later launch with the same key hands that compiled kernel's
launcher (``compiled.run``, Triton's launcher object that ``JITFunction.run`` ends with, which
calls ``cuLaunchKernel`` from C) the arguments directly.

The key holds what Triton's choice of compiled kernel and config depends on, and more: the
kernel, the current device, the Static (by identity: its scalars are fixed, the key holds it
alive), the tensors' names, and each tensor's dtype and address modulo 16 (Triton marks 16-byte
aligned pointers); a None tensor stays None. So a direct launch runs the kernel Triton would
have run, with the same arguments (``tests/test_triton_launch.py`` compares them launch by
launch). A kernel behind anything but ``triton.autotune``, and a config or kernel with a
pre-launch hook, always go through Triton. While a Triton launch hook is set (a profiler's), a
direct launch goes through the compiled kernel's runner, which hands the hooks their launch
metadata; with none set it calls the launcher without building that metadata. What Triton
reads at every launch and a kept kernel does not: its knobs (``TRITON_DEBUG`` and the like),
and the values of the kernel's globals; after changing either at run time, or an autotuner's
configs, call :func:`clear`.

Under the interpreter (``TRITON_INTERPRET=1``) nothing is compiled and every launch goes
through Triton; ``SMA_KERNELS_DIRECT_LAUNCH=0`` does the same on a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import operator
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from triton import knobs
from triton.runtime import Autotuner, JITFunction
from triton.runtime.driver import driver

from ._common import INTERPRET

DIRECT = not INTERPRET and os.environ.get("SMA_KERNELS_DIRECT_LAUNCH", "1") != "0"
# Keys kept at most; past it the cache starts over (a model whose shapes keep changing). The
# launchers' memoized Statics are bounded alike.
CACHE_LIMIT = 4096

Grid = tuple[int, ...] | Callable[[dict[str, Any]], tuple[int, ...]]


class Static:
    """A launch's grid (a tuple, or a function of the arguments and meta-parameters) and its
    non-tensor arguments. Compared and hashed by identity: build each once per layout and
    options, with a memoized function (see the module docstring)."""

    __slots__ = ("grid", "scalars")

    def __init__(self, grid: Grid, scalars: dict[str, Any]) -> None:
        self.grid = grid
        self.scalars = scalars


def static_builder(builder: Callable[..., Any]) -> Callable[..., Any]:
    """Memoizes a launcher's builder of Statics, a function of hashable arguments only (shapes,
    strides, dtype, options), so that equal arguments give the same Statics."""
    # typed: 1, 1.0 and True are equal keys, but Triton specializes them apart.
    return functools.lru_cache(maxsize=CACHE_LIMIT, typed=True)(builder)


class Kept(NamedTuple):
    """What a launch with a known key needs."""

    kernel: Any  # holds the kernel alive, whose id() is in the key
    compiled: Any  # Triton's CompiledKernel
    # The kernel's arguments in order, from (*the tensors, *fixed).
    pick: Callable[[tuple], Any]
    fixed: tuple  # the scalars, the autotuned config's meta-parameters, the parameters' defaults
    grid: tuple[int, int, int]


_kept: dict[tuple, Kept] = {}
# Reentrant: a Triton hook run by a first launch may launch again.
_first_launch = threading.RLock()


def launch_key(kernel: Any, device: int, static: Static,
               tensors: dict[str, torch.Tensor | None]) -> tuple:
    """The key of a launch on ``device`` (see the module docstring)."""
    return (id(kernel), device, static, *tensors,
            *[None if tensor is None else (tensor.dtype, tensor.data_ptr() % 16)
              for tensor in tensors.values()])


@contextlib.contextmanager
def through_triton() -> Iterator[None]:
    """Every launch through Triton's own launch path while active (for the tools that count or
    compare Triton's launches), as ``SMA_KERNELS_DIRECT_LAUNCH=0`` does for a whole process."""
    global DIRECT
    direct, DIRECT = DIRECT, False
    try:
        yield
    finally:
        DIRECT = direct


def clear() -> None:
    """Forget every kept kernel: the next launch of each goes through Triton again."""
    with _first_launch:
        _kept.clear()


def _keep(kernel: Any, compiled: Any, static: Static,
          tensors: dict[str, torch.Tensor | None]) -> Kept | None:
    """What later launches with this key need, or None for a launch that must always go
    through Triton."""
    if compiled is None:  # a Triton hook skipped the compilation
        return None
    function = kernel.fn if isinstance(kernel, Autotuner) else kernel
    if not isinstance(function, JITFunction) or function.pre_run_hooks:
        return None
    fixed = {name: parameter.default for name, parameter in function.signature.parameters.items()
             if parameter.default is not inspect.Parameter.empty and name not in tensors}
    fixed.update(static.scalars)
    if isinstance(kernel, Autotuner):
        if kernel.best_config.pre_hook is not None:
            return None
        fixed.update(kernel.best_config.kwargs)
    if hasattr(compiled, "result"):  # compiled asynchronously (Triton's AsyncCompileMode)
        compiled = compiled.result()
    position = {name: index for index, name in enumerate([*tensors, *fixed])}
    indices = [position[name] for name in function.arg_names]
    if len(indices) > 1:
        pick = operator.itemgetter(*indices)
    else:  # itemgetter of one index returns the item, not a tuple
        def pick(values: tuple, index: int = indices[0]) -> tuple:
            return (values[index],)
    dims = static.grid({**tensors, **fixed}) if callable(static.grid) else static.grid
    return Kept(kernel, compiled, pick, tuple(fixed.values()), (*dims, 1, 1)[:3])


def launch(kernel: Any, static: Static, /, **tensors: torch.Tensor | None) -> None:
    """``kernel[static.grid](**tensors, **static.scalars)``, through the compiled kernel of an
    earlier launch with the same key when there is one. ``kernel`` is a ``triton.jit``
    function, or one behind ``triton.autotune``; ``tensors`` are its tensor arguments, each a
    ``torch.Tensor`` or None (anything else belongs in the Static)."""
    if not DIRECT:
        # Under the lock too: an autotuned launch sets the autotuner's best_config, which a
        # first direct launch in another thread reads (through_triton() turns DIRECT off for
        # every thread at once).
        with _first_launch:
            kernel[static.grid](**tensors, **static.scalars)
        return
    active = driver.active
    device = active.get_current_device()
    key = launch_key(kernel, device, static, tensors)
    kept = _kept.get(key)
    if kept is None:
        # Under the lock, no other launch runs the autotuner before best_config is read (the
        # autograd engine launches the backward from its own thread).
        with _first_launch:
            kept = _keep(kernel, kernel[static.grid](**tensors, **static.scalars), static,
                         tensors)
            if kept is not None:
                if len(_kept) >= CACHE_LIMIT:
                    _kept.clear()
                _kept[key] = kept
        return
    compiled = kept.compiled
    args = kept.pick((*tensors.values(), *kept.fixed))
    grid_x, grid_y, grid_z = kept.grid
    if hooked(knobs.runtime.launch_enter_hook) or hooked(knobs.runtime.launch_exit_hook):
        # The compiled kernel's runner hands the hooks their launch metadata.
        compiled[grid_x, grid_y, grid_z](*args)
        return
    # What that runner runs with no hook to call, without building the metadata or a closure.
    compiled.run(grid_x, grid_y, grid_z, active.get_current_stream(device), compiled.function,
                 compiled.packed_metadata, None, None, None, *args)


def hooked(hook: Any) -> bool:
    """Whether a Triton launch hook calls anything: Triton keeps an empty ``HookChain`` when no
    hook is set (None in older versions)."""
    return bool(getattr(hook, "calls", hook))
