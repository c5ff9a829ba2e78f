"""Triton's GPU launch path without a GPU: a stand-in driver and compiler for host-time studies.

Under ``TRITON_INTERPRET=1`` a launch goes through the interpreter, not through the code a GPU
launch runs (``Autotuner.run``, ``JITFunction.run``, the compiled kernel's launcher), so the
interpreter says nothing about that code's cost or about launches that bypass it
(``sma_kernels/triton/launch.py``). :func:`install` makes that path run on a CPU-only machine:

* the active driver reports device 0, stream 0 and an sm_90 target;
* compiling a kernel makes a :class:`FakeCompiledKernel`, one per specialization as Triton
  caches them, whose launcher records its arguments instead of launching (the real
  ``CompiledKernel.__getitem__`` and ``launch_metadata`` run on it);
* autotuning times each config faster than the one before, so the autotuner keeps the last one
  it tried;
* the Triton backend is declared available and accepts CPU tensors.

Everything up to the C launcher runs as on a GPU; the launcher itself (a C function that reads
the arguments and calls ``cuLaunchKernel``) and the kernels do not. ``TRITON_INTERPRET`` must be
unset or ``0`` when sma_kernels is imported, so use it in a fresh process: call :func:`install`
before importing sma_kernels.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
from typing import Any
from unittest import mock

import torch


class FakeCompiledKernel:
    """A compiled kernel that records each launch's arguments into :data:`LAUNCHES`."""

    function = None
    packed_metadata = None
    src = None  # not from Triton's front end: launch metadata without the kernel's own part

    def __init__(self, name: str) -> None:
        self.name = name

    def _init_handles(self) -> None:  # nothing to load
        pass

    def run(self, *launch: Any) -> None:
        # (grid x, y, z, stream, function, packed metadata, launch metadata, enter hook,
        # exit hook, *the kernel's arguments): what CompiledKernel's launcher passes the C one.
        LAUNCHES.append((self, launch))


LAUNCHES: list[tuple[FakeCompiledKernel, tuple]] = []


class Driver:
    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> Any:
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)


def install() -> None:
    """Sets up the stand-ins (see the module docstring) and imports sma_kernels under them."""
    if "sma_kernels" in sys.modules:
        raise RuntimeError("bench.fake_gpu.install() must run before sma_kernels is imported")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("bench.fake_gpu needs TRITON_INTERPRET unset or 0")
    import triton.testing
    from triton.compiler import CompiledKernel
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    FakeCompiledKernel.__getitem__ = CompiledKernel.__getitem__
    FakeCompiledKernel.launch_metadata = CompiledKernel.launch_metadata
    driver.set_active(Driver())

    def compile_fake(self, key, signature, device, constexprs, options, attrs, warmup):
        kernel = FakeCompiledKernel(self.fn.__name__)
        self.device_caches[device][0][key] = kernel
        return kernel

    JITFunction._do_compile = compile_fake

    timings = itertools.count(1000, -1)

    def bench_faster_and_faster(fn, warmup=None, rep=None, quantiles=None, **kwargs):
        # Later configs time as faster, so an autotuner keeps the last one it tried, not the
        # first (which a launch that ignored the autotuner's choice would take).
        timing = float(next(timings))
        return [timing] * len(quantiles) if quantiles else timing

    triton.testing.do_bench = bench_faster_and_faster
    with mock.patch.object(torch.cuda, "is_available", lambda: True):
        import sma_kernels  # noqa: F401  (declares the Triton backend available)
    backends = sys.modules["sma_kernels.backends"]
    backends._DECLARED["triton"] = dataclasses.replace(backends._DECLARED["triton"], devices=None)
