"""``python -m bench.profile``: where one call's time goes, kernel by kernel.

The benchmark times whole calls, and at the small workloads a call of the Triton path takes as
long as the CPU takes to issue it (its host time, README "Benchmarks"): the kernels' own time
is hidden behind it. This runs each call under ``torch.profiler`` and reports, per workload,
provider (SDPA with no mask, and an sma-kernels backend called as users call it: a generator on
the device, no plan) and call (the forward, under ``torch.no_grad()`` as the benchmark times it;
forward and backward):

- ``time_ms`` and ``host_ms``: the call's median time and the median time it takes to return
  on the CPU, as the benchmark measures them (``measure.time_call``);
- ``device_ms``: the time the device spends in the call's kernels (and copies), summed: what
  the call would take if its host cost were gone, in a CUDA graph say;
- ``kernels``: that time per kernel name, with its launches per call;
- ``host_functions``: the Python functions that take the most of the host time, by their own
  time under ``cProfile`` (which slows every function call, so compare them with each other,
  not with ``host_ms``), and the launchers with their callees' time: Triton's
  (``JITFunction.run``, ``Autotuner.run``, a compiled kernel's runner) and sma-kernels' direct
  launch (``sma_kernels/triton/launch.py``). They include sma-kernels' backward, which autograd
  runs on a thread of its own for CUDA tensors, out of sight of a profiler of the calling
  thread.

On the CPU there is no device: ``device_ms`` is None, and ``kernels`` lists the ops (aten's,
the C++ backend's) by their own CPU time instead (a smoke run, at the tiny shapes).

Writes ``profile-<device>.json`` under ``--out`` (default ``runs/bench/``, git-ignored;
``--save``: the committed ``bench/results/``) after each workload, so that an interrupted run
keeps the workloads it finished.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from sma_kernels import ops

from . import cases as bench_cases
from . import measure, report, summary
from .providers import Provider, Sdpa, SmaBackend

CALLS = ("fwd", "fwdbwd")
MIN_RUN_TIME = 0.05  # seconds of repeats per timing


def _calls(provider: Provider, x: bench_cases.Inputs) -> dict[str, Callable[[], Any]]:
    """The forward (no autograd graph), and the forward with its backward, of ``provider`` on
    ``x``."""
    leaves = [t.clone().requires_grad_() for t in (x.q, x.k, x.v)]
    grad_out = torch.ones(*x.q.shape[:-1], x.v.shape[-1], dtype=x.v.dtype, device=x.v.device)

    def fwd() -> Any:
        with torch.no_grad():
            return provider.forward(x, x.q, x.k, x.v)

    def fwdbwd() -> Any:
        out, _ = provider.forward(x, *leaves)
        return torch.autograd.grad(out, leaves, grad_out)

    return {"fwd": fwd, "fwdbwd": fwdbwd}


@contextlib.contextmanager
def _backward_profiles() -> Iterator[list[cProfile.Profile]]:
    """Profiles of sma-kernels' backward where autograd runs it on a thread of its own.

    For CUDA tensors the autograd engine runs the backward on its device thread, which a
    cProfile enabled on the calling thread does not see before Python 3.12 (from 3.12 it
    profiles every thread, and a second profiler cannot be enabled). While this is active, each
    backward that runs on another thread than this one is profiled apart; the list collects the
    profiles."""
    profiles: list[cProfile.Profile] = []
    if sys.version_info >= (3, 12):
        yield profiles
        return
    caller = threading.get_ident()
    attention_grads = ops._attention_grads

    def profiled(*args: Any) -> Any:
        if threading.get_ident() == caller:
            return attention_grads(*args)
        profiler = cProfile.Profile()
        profiler.enable()
        try:
            return attention_grads(*args)
        finally:
            profiler.disable()
            profiles.append(profiler)

    with mock.patch.object(ops, "_attention_grads", profiled):
        yield profiles


def _host_functions(fn: Callable[[], Any], device: torch.device, repeats: int,
                    top: int = 12) -> list[dict[str, Any]]:
    """The ``top`` Python functions of ``fn`` by own time under cProfile, per call, and the
    launchers (see the module docstring), whose time is mostly their callees'. A backward that
    autograd runs on its device thread is included (:func:`_backward_profiles`)."""
    profiler = cProfile.Profile()
    with _backward_profiles() as backward_profiles:
        profiler.enable()
        for _ in range(repeats):
            fn()
        profiler.disable()
        measure.synchronize(device)
    stats = pstats.Stats(profiler)
    for backward_profile in backward_profiles:
        stats.add(backward_profile)
    # (file, line, name) -> (calls, _, own s, cumulative s, _)
    rows = [{"function": f"{'/'.join(file.split('/')[-2:])}:{line}({name})" if line else name,
             "calls": calls / repeats, "own_ms": own * 1e3 / repeats,
             "cumulative_ms": cumulative * 1e3 / repeats}
            for (file, line, name), (_, calls, own, cumulative, _) in stats.stats.items()]
    rows.sort(key=lambda row: -row["own_ms"])
    launchers = [row for row in rows[top:]
                 if row["function"].startswith(("runtime/jit.py:", "runtime/autotuner.py:"))
                 and row["function"].endswith("(run)")
                 or row["function"].startswith("triton/launch.py:")
                 and row["function"].endswith("(launch)")
                 or row["function"].startswith("compiler/compiler.py:")
                 and row["function"].endswith("(runner)")]
    return rows[:top] + launchers


def profile_call(fn: Callable[[], Any], device: torch.device, repeats: int) -> dict[str, Any]:
    """``time_ms``, ``host_ms``, ``device_ms``, ``kernels`` and ``host_functions`` of ``fn``
    (see the module docstring)."""
    on_device = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    measure.synchronize(device)  # no kernel of an earlier call in the profile
    with measure.quiet_stderr(), profile(activities=activities) as prof:
        for _ in range(repeats):
            fn()
        measure.synchronize(device)
    kernels = []
    for event in prof.key_averages():
        if on_device and event.device_type == DeviceType.CUDA:
            own_us = event.self_device_time_total
        elif not on_device and "::" in event.key:  # an op (aten::, sma_kernels::), no Python
            own_us = event.self_cpu_time_total
        else:
            continue
        kernels.append({"name": event.key, "launches": event.count / repeats,
                        "ms": own_us / 1e3 / repeats})
    kernels.sort(key=lambda kernel: -kernel["ms"])
    times = measure.time_call(fn, device, MIN_RUN_TIME)
    return {"time_ms": times["median_ms"], "host_ms": times["host_median_ms"],
            "device_ms": sum(kernel["ms"] for kernel in kernels) if on_device else None,
            "kernels": kernels, "host_functions": _host_functions(fn, device, repeats)}


def profile_case(case: bench_cases.Case, providers: list[Provider], device: torch.device,
                 dtype: torch.dtype, repeats: int) -> list[dict[str, Any]]:
    """One record per (provider, call) on ``case``, after warm-up calls (compilation and
    autotuning launch too)."""
    x = bench_cases.make_inputs(case, device, dtype)
    records = []
    for provider in providers:
        provider.prepare(x)
        for call, fn in _calls(provider, x).items():
            for _ in range(2):
                fn()
            records.append({"case": case.name, "shape": list(case.shape),
                            "provider": provider.name, "call": call,
                            **profile_call(fn, device, repeats)})
    return records


def _line(record: dict[str, Any], top: int = 4) -> str:
    device = "-" if record["device_ms"] is None else f"{record['device_ms']:.3f}"
    kernels = ", ".join(f"{kernel['name'][:40]} {kernel['ms']:.3f}"
                        for kernel in record["kernels"][:top])
    return (f"{record['case']:<10} {record['provider']:<11} {record['call']:<6} "
            f"time {record['time_ms']:7.3f} ms  host {record['host_ms']:7.3f} ms  "
            f"device {device:>7} ms  {kernels}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_workload_options(parser: argparse.ArgumentParser, *, cases_default: list[str] | None,
                         cases_help: str, repeats_help: str) -> None:
    """``--device``, ``--cases`` and ``--repeats``, and the output options, of a command that runs
    the workloads (full size on a GPU, tiny on the CPU; see :func:`chosen_workloads`)."""
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", nargs="+", metavar="NAME", default=cases_default,
                        help=cases_help)
    parser.add_argument("--repeats", type=_positive_int, default=None, help=repeats_help)
    report.add_output_options(parser)


def chosen_workloads(parser: argparse.ArgumentParser, args: argparse.Namespace
                     ) -> tuple[torch.device, list[bench_cases.Case]]:
    """The device and the workloads of ``--cases``: at full size on a GPU, tiny on the CPU."""
    device = torch.device(args.device)
    cases = list(bench_cases.WORKLOADS) if device.type == "cuda" else bench_cases.tiny_cases()
    if args.cases:
        unknown = set(args.cases) - {case.name for case in cases}
        if unknown:
            parser.error(f"--cases: unknown workload(s) {sorted(unknown)}")
        cases = [case for case in cases if case.name in args.cases]
    return device, cases


def main(argv: list[str] | None = None) -> int:
    """The command; returns its exit status."""
    parser = argparse.ArgumentParser(prog="python -m bench.profile",
                                     description=summary(__doc__))
    parser.add_argument("--backend", default=None,
                        help="the sma-kernels backend (default: triton on a GPU, cpp on the CPU)")
    add_workload_options(parser, cases_default=None, cases_help="only these workloads",
                         repeats_help="calls profiled per record (default: 20 on a GPU, 2 on "
                                      "the CPU)")
    args = parser.parse_args(argv)
    device, cases = chosen_workloads(parser, args)
    on_device = device.type == "cuda"
    backend = args.backend or ("triton" if on_device else "cpp")
    repeats = args.repeats or (20 if on_device else 2)
    providers = [Sdpa(padding=False), SmaBackend(backend, allow_interpreter=True)]
    reason = providers[1].unavailable(device)
    if reason is not None:
        parser.error(f"--backend {backend}: {reason}")
    dtype = torch.bfloat16 if on_device else torch.float32

    result = measure.new_result(
        "sma-kernels-profile/1", device, dtype=str(dtype).removeprefix("torch."),
        method=f"torch.profiler over {repeats} calls after 2 warm-up calls: device kernels' own "
               "time per call (CPU: the ops' own CPU time); time_ms and host_ms: "
               f"bench.measure.time_call over at least {MIN_RUN_TIME} s",
        records=[])
    path = args.out / f"profile-{measure.device_slug(result['device'])}.json"
    for case in cases:
        records = profile_case(case, providers, device, dtype, repeats)
        for record in records:
            print(_line(record), flush=True)
        result["records"] += records
        measure.write_result(result, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
