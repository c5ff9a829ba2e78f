"""``python -m bench.launch_overhead``: the host time of the Triton backend's kernel launches, and
what the direct launches of ``sma_kernels/triton/launch.py`` save, measured without a GPU.

Triton's GPU launch path runs here on stand-ins for the driver and the compiler
(``bench/fake_gpu.py``): everything a GPU launch runs in Python, up to the C launcher. Per tiny
workload (``bench.cases.tiny_cases``) and call of ``bench.host_overhead`` (the mask, the forward
and forward+backward as users call them, the forward with a ready plan) it times the call three
ways, in one process:

* ``stubbed``: every kernel replaced by a stub (``bench.host_overhead.stubbed_launches``):
  sma-kernels' own host work, no launch path at all;
* ``triton``: every launch through ``kernel[grid](...)``, Triton's autotuner and
  ``JITFunction.run``, as before direct launches;
* ``direct``: the launches as the backend makes them, each through the compiled kernel kept by
  an earlier launch of the same signature.

``(triton - stubbed) / launches`` is Triton's per-launch cost, ``(direct - stubbed) /
launches`` what is left of it. Each figure is the minimum over blocks of calls.

``--check`` instead runs every call of the backend after a warm-up and makes each of its
launches twice from the same arguments, through Triton and directly (which must not enter
``JITFunction.run``), and compares what reached the compiled kernels' launchers: the same
compiled kernel, grid and stream, and the same arguments (tensors by identity); it does so
without launch hooks and again with an enter and an exit hook set, which must get the same
launch metadata. The stand-in
autotuner times later configs as faster, so the config a direct launch reuses is not simply the
first. Exit status 1 on a difference (``tests/test_triton_launch.py``).
"""

from __future__ import annotations

import os

# Read by Triton when sma_kernels defines its kernels: the launch path of a GPU, not the
# interpreter's.
if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"
    from bench import fake_gpu
    fake_gpu.install()

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import torch
import triton
from triton.compiler.compiler import LazyDict
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

import sma_kernels
from bench import cases as bench_cases
from bench import fake_gpu, measure, report
from bench.host_overhead import METRICS, calls, host_us, stubbed_launches
from sma_kernels import ops
from sma_kernels.triton import kernel_modules
from sma_kernels.triton.launch import hooked, launch, through_triton

from . import summary


def recorded(fn: Callable[[], Any]) -> list[tuple]:
    """The launches ``fn`` makes, as the compiled kernels' launchers receive them."""
    fake_gpu.LAUNCHES.clear()
    fn()
    return list(fake_gpu.LAUNCHES)


def time_routes(case: bench_cases.Case, blocks: int, calls_per_block: int) -> dict[str, Any]:
    record: dict[str, Any] = {"case": case.name, "shape": case.shape}
    for metric, fn in calls(case).items():
        fn()  # compiles (stand-ins) and autotunes
        launches = len(recorded(fn))
        with through_triton():
            triton_us = host_us(fn, blocks, calls_per_block)
            with stubbed_launches():
                stubbed_us = host_us(fn, blocks, calls_per_block)
        direct_us = host_us(fn, blocks, calls_per_block)
        record[metric] = {"launches": launches, "stubbed_us": stubbed_us, "triton_us": triton_us,
                          "direct_us": direct_us,
                          "triton_per_launch_us": (triton_us - stubbed_us) / launches,
                          "direct_per_launch_us": (direct_us - stubbed_us) / launches}
    return record


def check_calls(case: bench_cases.Case) -> dict[str, Callable[[], Any]]:
    """The backend's calls at ``case``, with a fixed plan."""
    x = bench_cases.make_inputs(case, torch.device("cpu"), torch.bfloat16)
    options = {**x.options, "backend": "triton"}
    leaves = [t.clone().requires_grad_() for t in (x.q, x.k, x.v)]
    out, _ = sma_kernels.self_guided_attention(*leaves, x.valid, plan=x.plan, **options)
    grad_out = torch.ones_like(out)

    def forward() -> Any:
        return sma_kernels.self_guided_attention(*leaves, x.valid, plan=x.plan, **options)

    def backward() -> Any:
        return torch.autograd.grad(forward()[0], leaves, grad_out)

    def attention() -> Any:
        keep = torch.ones(x.valid.shape, dtype=torch.bool)
        out = ops.masked_attention(*leaves, keep, scale=0.1, backend="triton")
        return torch.autograd.grad(out, leaves, grad_out)

    return {"mask": lambda: sma_kernels.self_guided_mask(x.q, x.k, x.valid, plan=x.plan,
                                                          **options),
            "forward": forward, "forward+backward": backward, "masked_attention": attention}


def _same(a: Any, b: Any) -> bool:
    """Whether two launch arguments are the same: tensors by identity, the launch metadata (a new
    object per launch) by content, anything else by type and value."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if isinstance(a, LazyDict):
        return isinstance(b, LazyDict) and a.get() == b.get()
    return type(a) is type(b) and a == b


def _effective(args: tuple) -> tuple:
    """A launch as the C launcher acts on it: (grid x, y, z, stream, function, packed metadata,
    launch metadata, enter hook, exit hook, then the kernel's arguments), with hooks that call
    nothing as None, and no launch metadata when no hook reads it."""
    *head, metadata, enter, exit_hook = args[:9]
    enter, exit_hook = (hook if hooked(hook) else None for hook in (enter, exit_hook))
    return (*head, metadata if enter or exit_hook else None, enter, exit_hook, *args[9:])


def _difference(direct: list[tuple], through_triton: list[tuple]) -> str | None:
    """How the launches of one launch() call differ (None: they do not)."""
    if len(direct) != len(through_triton):
        return f"{len(direct)} launches, Triton's {len(through_triton)}"
    for (kernel, args), (triton_kernel, triton_args) in zip(direct, through_triton):
        if kernel is not triton_kernel:
            return "another compiled kernel"
        args, triton_args = _effective(args), _effective(triton_args)
        if len(args) != len(triton_args):
            return f"{len(args)} launch arguments, Triton's {len(triton_args)}"
        for index, (arg, triton_arg) in enumerate(zip(args, triton_args)):
            if not _same(arg, triton_arg):
                return f"launch argument {index} differs (see _effective)"
    return None


def check(log: Callable[[str], None] = print) -> list[str]:
    """The differences between direct launches and Triton's, over every tiny workload's calls.

    After a warm-up call, every launch of a call is made twice from the same arguments: through
    Triton, then directly, which must not enter ``JITFunction.run``."""
    problems: list[str] = []
    compared: list[tuple[str, bool]] = []

    def both_ways(kernel: Any, static: Any, /, **tensors: Any) -> None:
        fake_gpu.LAUNCHES.clear()
        with through_triton():
            launch(kernel, static, **tensors)
        by_triton = list(fake_gpu.LAUNCHES)
        fake_gpu.LAUNCHES.clear()
        with mock.patch.object(JITFunction, "run", autospec=True,
                               side_effect=JITFunction.run) as triton_run:
            launch(kernel, static, **tensors)
        name = _innermost(kernel).__name__
        difference = "nothing launched" if not by_triton else _difference(
            fake_gpu.LAUNCHES, by_triton)
        if triton_run.called:
            problems.append(f"{where}: {name} went through JITFunction.run")
        elif difference:
            problems.append(f"{where}: {name}: {difference}")
        compared.append((name, not triton_run.called))

    for hooks in (False, True):
        for case in bench_cases.tiny_cases():
            for call, fn in check_calls(case).items():
                where = f"{case.name} {call}" + (", launch hooks set" if hooks else "")
                fn()  # compiles, autotunes, and keeps each launch's compiled kernel
                compared.clear()
                known = len(problems)
                with contextlib.ExitStack() as stack:
                    if hooks:
                        stack.enter_context(launch_hooks())
                    for module in kernel_modules():
                        stack.enter_context(mock.patch.object(module, "launch", both_ways))
                    fn()
                if not compared:
                    problems.append(f"{where}: no launch made")
                log(f"{where}: {len(compared)} launches, "
                    + ("same" if len(problems) == known else "DIFFERENT"))
    return problems


@contextlib.contextmanager
def launch_hooks() -> Iterator[None]:
    """A launch-enter and a launch-exit hook set (as a profiler sets them), which take each
    launch's metadata."""
    from triton import knobs

    def hook(metadata: Any) -> None:  # never called: the stand-in launcher only records
        pass

    chains = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    for chain in chains:
        chain.add(hook)
    try:
        yield
    finally:
        for chain in chains:
            chain.remove(hook)


def _innermost(kernel: Any) -> Any:
    """The Python function behind a jit function, autotuned or not."""
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel.fn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.launch_overhead",
                                     description=summary(__doc__))
    report.add_output_options(parser)
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--check", action="store_true",
                        help="compare direct launches with Triton's instead of timing")
    args = parser.parse_args(argv)
    if not isinstance(driver.active, fake_gpu.Driver):
        parser.error("run as python -m bench.launch_overhead (it installs bench.fake_gpu first)")
    if args.check:
        problems = check()
        print("\n".join(problems) or "direct launches pass the same arguments as Triton's")
        return 1 if problems else 0

    records = []
    for case in bench_cases.tiny_cases():
        record = time_routes(case, args.blocks, args.calls)
        records.append(record)
        print(f"{case.name:10s}" + "".join(
            f"  {metric} {record[metric]['direct_us']:6.1f} us (triton {record[metric]['triton_us']:6.1f}, "
            f"stubbed {record[metric]['stubbed_us']:6.1f}, {record[metric]['launches']} launches)"
            for metric in METRICS), flush=True)
    measure.save_cpu_records(
        "sma-kernels-launch-overhead/1", records, args.out, "launch-overhead-cpu",
        triton_version=triton.__version__,
        method="Triton's GPU launch path on stand-ins for the driver and compiler "
               f"(bench/fake_gpu.py); minimum over {args.blocks} blocks of the mean of "
               f"{args.calls} calls")
    return 0


if __name__ == "__main__":
    sys.exit(main())
