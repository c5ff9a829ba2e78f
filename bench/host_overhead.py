"""``python -m bench.host_overhead``: the CPU time one call of the Triton path spends around its
kernel launches.

A GPU call cannot finish before the CPU has issued all of its work: argument checks, the plan
check, allocations, op dispatch and the launches. At the small workloads that host time, not the
kernels, decides the ratio to SDPA (at HIGGS, SDPA itself takes 70-80 us on an H100 or H200).
This script measures the part of it that is sma-kernels' own code, on any machine: the Triton
backend runs under ``TRITON_INTERPRET=1`` on tiny CPU tensors with every kernel launch replaced
by a stub that only counts it. So what is timed is the Python and PyTorch work around the
launches; the launches themselves (a few microseconds each in Triton's launcher) are not in it.

Per workload, at its tiny shape (``bench.cases.tiny_cases``: the host work depends on the
Triton path, which each tiny case shares with its full size, not on the sizes), it times the
mask, the forward (mask + attention) and forward+backward of the public functions as users call
them (a generator, no plan, the query pool at its default), and the forward with a ready plan,
twice: on their eager path, and through the registered custom ops (the path of torch.compile and
the other tracers; ``ops.needs_registered_op`` is patched to choose). The plan's random draw is
an aten op, so it runs (on tiny tensors) and is timed. Each record lists the Triton kernels a
call launches and, apart, its aten ops (``bench.launches.count_launches``).
Each figure is the minimum over blocks of calls (on a shared machine: the least disturbed).
Writes ``host-overhead-<cpu>-<UTC date>.json`` under ``--out`` (default ``runs/bench/``,
git-ignored; ``--save`` writes to the committed ``bench/results/``).
"""

from __future__ import annotations

import os

# Read by Triton when sma_kernels defines its kernels, so it is set before the imports below
# (bench.launch_overhead imports this module under its own setting).
if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "1"

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from unittest import mock

import torch

import sma_kernels
from sma_kernels import ops

from . import cases as bench_cases
from . import measure, report, summary
from .launches import count_launches


@contextlib.contextmanager
def stubbed_launches() -> Iterator[list[str]]:
    """Replaces every Triton kernel of the backend by a stub; yields the list of launches."""
    from triton.runtime import KernelInterface

    from sma_kernels.triton import kernel_modules

    launched: list[str] = []

    class Stub:
        def __init__(self, name: str) -> None:
            self.name = name

        def __getitem__(self, grid: object) -> Callable[..., None]:
            return lambda *args, **kwargs: launched.append(self.name)

    with contextlib.ExitStack() as stack:
        for module in kernel_modules():
            for name, value in vars(module).items():
                if isinstance(value, KernelInterface):
                    stack.enter_context(mock.patch.object(module, name, Stub(name)))
        yield launched


def host_us(fn: Callable[[], object], blocks: int, calls: int) -> float:
    """Minimum over ``blocks`` blocks of the mean time of ``calls`` calls, in microseconds."""
    fn()
    best = float("inf")
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


METRICS = ("mask", "fwd", "fwdbwd", "fwd_plan")


def calls(case: bench_cases.Case) -> dict[str, Callable[[], object]]:
    """The calls of :data:`METRICS` on ``case``: the mask, forward and forward+backward of the
    public functions as users call them (a generator, the query pool left at its default), and
    the forward with a ready plan."""
    x = bench_cases.make_inputs(case, torch.device("cpu"), torch.float32)
    options = {**x.options, "backend": "triton"}
    generator = torch.Generator().manual_seed(0)
    leaves = [t.clone().requires_grad_() for t in (x.q, x.k, x.v)]

    def forward(**how: object) -> torch.Tensor:
        return sma_kernels.self_guided_attention(*leaves, x.valid, **options, **how)[0]

    grad = torch.ones(case.batch, case.heads, case.queries, case.dim_v)
    return {"mask": lambda: sma_kernels.self_guided_mask(x.q, x.k, x.valid, generator=generator,
                                                         **options),
            "fwd": lambda: forward(generator=generator),
            "fwdbwd": lambda: forward(generator=generator).backward(grad),
            "fwd_plan": lambda: forward(plan=x.plan)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.host_overhead",
                                     description=summary(__doc__))
    report.add_output_options(parser)
    parser.add_argument("--blocks", type=int, default=60)
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args(argv)

    records = []
    with stubbed_launches() as launched:
        for case in bench_cases.tiny_cases():
            record = {"case": case.name, "options": case.options(), "shape": case.shape}
            for metric, fn in calls(case).items():
                launched.clear()
                with count_launches() as seen:  # sees the aten ops (the stubs launch nothing)
                    fn()
                record.setdefault("launches", {})[metric] = list(launched)
                record.setdefault("aten_ops", {})[metric] = list(seen.names)
                for route, through_ops in (("eager", False), ("ops", True)):
                    # "ops": the path torch.compile takes, through the registered custom ops.
                    with mock.patch.object(ops, "needs_registered_op", lambda *_, flag=through_ops: flag):
                        record[f"{route}_{metric}_us"] = host_us(fn, args.blocks, args.calls)
            records.append(record)
            print(f"{case.name:10s}" + "".join(
                f"  {metric} {record[f'eager_{metric}_us']:6.1f} us (ops {record[f'ops_{metric}_us']:6.1f})"
                for metric in METRICS), flush=True)

    measure.save_cpu_records(
        "sma-kernels-host-overhead/1", records, args.out, "host-overhead-cpu",
        method="Triton backend under TRITON_INTERPRET=1, every kernel launch stubbed out; "
               f"minimum over {args.blocks} blocks of the mean of {args.calls} calls")
    return 0


if __name__ == "__main__":
    sys.exit(main())
