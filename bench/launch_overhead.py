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

``--check`` instead runs every call of the backend twice after a warm-up, through Triton and
with direct launches (which must not enter ``JITFunction.run``), and compares what reached the
compiled kernels' launchers, launch by launch: the same compiled kernel, grid and stream, and
the same arguments (each input tensor by identity, the others by dtype, shape and strides,
everything else by value). Exit status 1 on a difference (``tests/test_triton_launch.py``).
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
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import torch
from triton.runtime.jit import JITFunction

import sma_kernels
from bench import cases as bench_cases
from bench import fake_gpu, measure, report
from bench.host_overhead import METRICS, calls, host_us, stubbed_launches
from sma_kernels import ops


@contextmanager
def direct_launches(enabled: bool) -> Iterator[None]:
    from sma_kernels.triton import launch
    with mock.patch.object(launch, "DIRECT", enabled):
        yield


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
        with direct_launches(False):
            triton_us = host_us(fn, blocks, calls_per_block)
            with stubbed_launches():
                stubbed_us = host_us(fn, blocks, calls_per_block)
        direct_us = host_us(fn, blocks, calls_per_block)
        record[metric] = {"launches": launches, "stubbed_us": stubbed_us, "triton_us": triton_us,
                          "direct_us": direct_us,
                          "triton_per_launch_us": (triton_us - stubbed_us) / launches,
                          "direct_per_launch_us": (direct_us - stubbed_us) / launches}
    return record


def check_calls(case: bench_cases.Case) -> tuple[dict[str, Callable[[], Any]], list[torch.Tensor]]:
    """The backend's calls at ``case`` with a fixed plan (the same launches each time), and the
    input tensors."""
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

    inputs = [x.q, x.k, x.v, x.valid, *x.plan, *leaves, grad_out]
    return ({"mask": lambda: sma_kernels.self_guided_mask(x.q, x.k, x.valid, plan=x.plan,
                                                           **options),
             "forward": forward, "forward+backward": backward, "masked_attention": attention},
            inputs)


def _normalized(value: Any, inputs: dict[int, int]) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape), value.stride(),
                inputs.get(value.data_ptr()))
    if type(value).__name__ == "LazyDict":  # launch metadata, a new object per launch
        return ("launch metadata", value.get())
    return value


def check(log: Callable[[str], None] = print) -> list[str]:
    """The differences between direct launches and Triton's, over every tiny workload's calls."""
    problems = []
    for case in bench_cases.tiny_cases():
        fns, inputs = check_calls(case)
        addresses = {tensor.data_ptr(): index for index, tensor in enumerate(inputs)}
        for name, fn in fns.items():
            fn()  # compiles, autotunes, and keeps each launch's compiled kernel
            with direct_launches(False):
                through_triton = recorded(fn)
            with mock.patch.object(JITFunction, "run", autospec=True,
                                   side_effect=JITFunction.run) as triton_run:
                direct = recorded(fn)
            if triton_run.called:
                problems.append(f"{case.name} {name}: {triton_run.call_count} launches went "
                                "through JITFunction.run")
            for launches in (through_triton, direct):
                launches[:] = [(kernel, tuple(_normalized(value, addresses) for value in launch))
                               for kernel, launch in launches]
            where = f"{case.name} {name}"
            if not direct:
                problems.append(f"{where}: no launch recorded")
            elif direct != through_triton:
                problems.append(f"{where}: direct launches {direct} differ from Triton's "
                                f"{through_triton}")
            log(f"{where}: {len(direct)} launches, " + ("same" if direct == through_triton
                                                          else "DIFFERENT"))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.launch_overhead",
                                     description=__doc__.splitlines()[0])
    report.add_output_options(parser)
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--check", action="store_true",
                        help="compare direct launches with Triton's instead of timing")
    args = parser.parse_args(argv)
    if not isinstance(sys.modules["triton.runtime.driver"].driver.active, fake_gpu._Driver):
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
    import triton
    result = measure.new_result(
        "sma-kernels-launch-overhead/1", torch.device("cpu"), triton_version=triton.__version__,
        method="Triton's GPU launch path on stand-ins for the driver and compiler "
               f"(bench/fake_gpu.py); minimum over {args.blocks} blocks of the mean of "
               f"{args.calls} calls",
        records=records)
    print(f"wrote {measure.write_dated_result(result, args.out, 'launch-overhead-cpu')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
