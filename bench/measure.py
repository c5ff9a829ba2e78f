"""How the benchmark measures: time, peak extra memory, the machine's ceilings, and the machine.

* Time: the median over repeats after a warm-up call. On a GPU each repeat is bracketed by CUDA
  events and synchronized, so host-side work (the published per-sample loop) counts; on the CPU
  ``torch.utils.benchmark.Timer.blocked_autorange``.
* Peak extra memory: bytes allocated during one call above what was live before it, outputs
  included. GPU: ``torch.cuda.max_memory_allocated`` after a reset. CPU: the allocation events
  that PyTorch's CPU allocator reports to ``torch.profiler`` (``profile_memory=True``), summed in
  time order; memory that kernels take outside PyTorch's allocator (e.g. ``std::vector``) is
  not seen.
* Ceilings, measured in the same run: a large matmul (bf16 on a GPU, fp32 on the CPU) and a
  large device copy (bytes read + written).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils import benchmark

import sma_kernels

MIN_REPEATS = 3  # timed blocks on the CPU, at least
TIMING_METHOD = {"cpu": "torch.utils.benchmark.Timer.blocked_autorange (at least 3 blocks), median, "
                        "after one warm-up call",
                 "cuda": "CUDA events around each call (synchronized), median, after 3 warm-up calls; "
                         "host_median_ms: CPU time until the call returns, median of the same calls"}
MEMORY_METHOD = {"cpu": "torch.profiler allocation events of the CPU allocator: peak of bytes "
                        "allocated minus freed during one call (outputs included)",
                 "cuda": "torch.cuda.max_memory_allocated after reset, minus memory_allocated "
                         "before one call (outputs included)"}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, min_run_time: float) -> dict[str, float]:
    """Median, interquartile range and minimum (ms) of ``fn`` over repeats, and their number."""
    if device.type == "cuda":
        for _ in range(3):
            fn()
        torch.cuda.synchronize(device)
        times: list[float] = []
        host_times: list[float] = []
        while len(times) < 7 or (sum(times) < min_run_time * 1e3 and len(times) < 200):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            issued = time.perf_counter()
            start.record()
            fn()
            end.record()
            # The CPU time to issue the call: when it is close to the GPU time, the call is
            # bound by its host-side work (checks, dispatch, launches), not by its kernels.
            host_times.append((time.perf_counter() - issued) * 1e3)
            end.synchronize()
            times.append(start.elapsed_time(end))
        quartiles = statistics.quantiles(times, n=4)
        return {"median_ms": statistics.median(times), "iqr_ms": quartiles[2] - quartiles[0],
                "min_ms": min(times), "repeats": len(times),
                "host_median_ms": statistics.median(host_times)}
    fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    # Calls longer than min_run_time get a single block: add single runs up to MIN_REPEATS,
    # so that one disturbed run is not the median.
    while len(measurement.times) < MIN_REPEATS:
        measurement = benchmark.Measurement.merge([measurement, timer.timeit(number=1)])[0]
    # min_ms next to the median: on a shared machine the minimum is the least disturbed run.
    # On the CPU a call returns when its work is done: its host time is its time.
    return {"median_ms": measurement.median * 1e3, "iqr_ms": measurement.iqr * 1e3,
            "min_ms": min(measurement.times) * 1e3,
            "repeats": len(measurement.times) * measurement.number_per_run,
            "host_median_ms": measurement.median * 1e3}


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2: the profiler's C++ side logs a line at every start and stop."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _profiled_peak_bytes(fn: Callable[[], Any]) -> int:
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    allocations = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(allocations):
        live += size
        peak = max(peak, live)
    return peak


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated by one call of ``fn`` above what was live before (see module doc)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return peak
    return _profiled_peak_bytes(fn)


def ceilings(device: torch.device, min_run_time: float) -> dict[str, Any]:
    """Measured matmul TFLOP/s and copy GB/s of this device (the roofline for 'achieved')."""
    if device.type == "cuda":
        dtype, n, copy_elements = torch.bfloat16, 8192, 1 << 29
    else:
        dtype, n, copy_elements = torch.float32, 1536, 1 << 25
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    matmul = time_call(lambda: torch.matmul(a, b), device, min_run_time)["median_ms"]
    src = torch.randn(copy_elements, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    copy = time_call(lambda: dst.copy_(src), device, min_run_time)["median_ms"]
    return {"matmul_dtype": str(dtype).removeprefix("torch."), "matmul_size": n,
            "matmul_tflops": 2 * n ** 3 / (matmul * 1e-3) / 1e12,
            "copy_bytes": 2 * src.numel() * src.element_size(),
            "copy_gbps": 2 * src.numel() * src.element_size() / (copy * 1e-3) / 1e9}


def _git_state() -> dict[str, Any]:
    """The commit measured: SMA_KERNELS_COMMIT when set (whether the copy is dirty is then
    unknown), else the checkout's HEAD and whether its tree differs."""
    named = os.environ.get("SMA_KERNELS_COMMIT")
    if named:
        return {"commit": named, "dirty": None}
    return {"commit": _git("rev-parse", "HEAD"), "dirty": _dirty()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, text=True,
                              capture_output=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _dirty() -> bool | None:
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def environment(device: torch.device) -> dict[str, Any]:
    """Device, core count, versions and git commit, for the JSON header."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info: dict[str, Any] = {
        "device": {"type": device.type, "cpu": _cpu_model(), "cpu_cores": os.cpu_count(),
                   "torch_threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "triton": triton_version,
                     "python": platform.python_version(), "sma_kernels": sma_kernels.__version__,
                     "cuda": torch.version.cuda},
        # A copy of the tree (a remote GPU host) names its commit in the env: it may have no
        # .git, or one from another commit, against which the tree looks dirty.
        "git": _git_state(),
        "backends": sma_kernels.backends(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device"].update({"name": props.name, "multiprocessors": props.multi_processor_count,
                               "memory_gb": round(props.total_memory / 1e9, 1)})
    else:
        info["device"]["name"] = info["device"]["cpu"]
    return info


def new_result(schema: str, device: torch.device, **fields: Any) -> dict[str, Any]:
    """A command's JSON result: its ``schema``, the UTC time, :func:`environment` of ``device``,
    then ``fields``."""
    return {"schema": schema, "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **environment(device), **fields}


def write_result(result: dict[str, Any], path: Path) -> Path:
    """Writes ``result`` as JSON at ``path``, making its folder if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def save_cpu_records(schema: str, records: list[dict[str, Any]], folder: Path, prefix: str,
                     **fields: Any) -> None:
    """A CPU command's records as a JSON result (:func:`new_result` with ``fields``), written as
    ``<prefix>-<UTC date and time>.json`` in ``folder``, and the line that says where."""
    result = new_result(schema, torch.device("cpu"), **fields, records=records)
    print(f"wrote {write_result(result, folder / f'{prefix}-{utc_stamp()}.json')}")


def utc_stamp() -> str:
    """The UTC date and time for file names: 20261130-231054."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def device_slug(device_info: dict[str, Any]) -> str:
    """Short file-name tag: 'cpu', or the GPU model ('h100', 'h200', ...)."""
    if device_info["type"] == "cpu":
        return "cpu"
    name = device_info["name"]
    model = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name)
    text = model.group(1) if model else name
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
