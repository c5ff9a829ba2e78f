"""``python -m bench.launches``: how many device launches one call of the public ops makes.

A launch is one Triton kernel run, one compute op of PyTorch (``aten``), or one call of a
compiled C++ op of the package (``sma_kernels_C``). On a GPU each is a kernel launch (an aten op
may launch more than one; a few, such as a device-to-host copy, launch a copy instead); on the
CPU the same count says how many launches the call would make on a GPU, since every backend runs
the same Python around its kernels on either device. The count runs anywhere: Triton's kernels
run under its interpreter (``TRITON_INTERPRET=1``) on CPU tensors.

:func:`count_launches` is the context manager behind it, for tests as well:

* Triton: the innermost launch path (``JITFunction.run`` on a GPU, ``InterpretedFunction.run``
  under the interpreter) is wrapped, so a kernel behind ``triton.autotune`` or
  ``triton.heuristics`` counts once per run. Aten ops issued inside an interpreted run are the
  interpreter's own copies and are not counted.
* aten: a ``TorchDispatchMode`` sees every op; views, metadata queries and bare allocations
  (``empty``, ``empty_strided``, ...) launch nothing and are not counted.
* Host syncs (``.item()``, ``.tolist()``, ``bool(tensor)``, ``nonzero``, a device-to-host copy,
  ...) are listed apart, as :attr:`Launches.syncs`: ``tests/test_no_host_sync.py`` requires none.

The mode would make :func:`sma_kernels.ops.needs_registered_op` send calls through the
registered custom ops, a path whose inner ops a dispatch mode cannot see; the counter hides
itself from that check, so what it counts is the eager path users take (an outer mode, if any,
still counts).

The command prints, per backend available here and per tiny workload (``bench.cases.tiny_cases``),
the launches of: the mask with a generator and with a ready plan; the forward
(``self_guided_attention``) with ``plan=None``, with a generator and with a ready plan; and the
backward of the forward, in bf16 (the workloads' dtype; ``--dtype`` to change it). On a GPU it
also lists the registers and spills of every Triton kernel it compiled (``--fail-on-spills``:
exit 1 if a 16-bit one spills; fp32 inputs take exact fp32 products on the CUDA cores, whose
tiles may not fit in registers, as ``tests/test_triton_sm90.py`` allows). ``--save`` writes
``bench/results/launches-<device>.json`` (``cpu``, ``h100``, ...); the default is ``runs/bench/``
(git-ignored).
"""

from __future__ import annotations

import os

import torch

# Read by Triton when sma_kernels defines its kernels, so it is set before sma_kernels is
# imported: as a command without a GPU, count the interpreter's launches.
if __name__ == "__main__" and "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import argparse
import contextlib
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

from torch.utils._python_dispatch import TorchDispatchMode, is_in_torch_dispatch_mode

import sma_kernels
from sma_kernels import ops
from sma_kernels.backends import declared, unavailable_reasons

from . import cases as bench_cases
from . import measure, report, summary

aten = torch.ops.aten

# Ops that launch nothing: metadata, and allocations without a fill.
NO_LAUNCH = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
             aten.new_empty.default, aten.new_empty_strided.default, aten.lift_fresh.default,
             aten.is_same_size.default, aten.sym_size.int, aten.sym_stride.int,
             aten.sym_numel.default, aten.sym_storage_offset.default, aten.is_contiguous.default,
             aten.is_contiguous.memory_format, aten.set_.source_Storage_storage_offset,
             aten.promote_types.default}
# Ops that make the host wait for the device: a scalar read back (.item(), .tolist(),
# bool(tensor), int(tensor)), or an output whose size depends on the data.
SYNC_OPS = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default,
            aten.equal.default, aten.nonzero.default, aten.masked_select.default,
            aten._unique2.default, aten.unique_consecutive.default, aten.unique_dim.default,
            aten.repeat_interleave.Tensor, aten.allclose.default}


@dataclass
class Launches:
    """What :func:`count_launches` saw: launch names in order, and the host syncs among them."""

    names: list[str] = field(default_factory=list)
    syncs: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)

    def clear(self) -> None:
        self.names.clear()
        self.syncs.clear()

    def summary(self) -> str:
        """'name xN, ...' in first-seen order."""
        return ", ".join(name if n == 1 else f"{name} x{n}" for name, n in Counter(self.names).items())


def _op_name(func: torch._ops.OpOverload) -> str:
    namespace = func.namespace
    name = func.__name__.removesuffix(".default")
    return name if namespace == "aten" else f"{namespace}::{name}"


def _syncs(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> bool:
    """Whether the host waits for the device: a sync op, indexing with a bool mask (its output
    size depends on the data), or a copy from an accelerator to the CPU."""
    if func in SYNC_OPS:
        return True
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
        return any(isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)
                   for index in args[1])
    if func is aten._to_copy.default:
        source, target = args[0], kwargs.get("device")
        return source.device.type != "cpu" and target is not None and torch.device(target).type == "cpu"
    if func is aten.copy_.default:
        target, source = args[0], args[1]
        return (isinstance(source, torch.Tensor) and source.device.type != "cpu"
                and target.device.type == "cpu")
    return False


class _OpLaunches(TorchDispatchMode):
    """Records each op that launches work, unless a Triton kernel run is in progress."""

    def __init__(self, launches: Launches, in_kernel: list[int]) -> None:
        super().__init__()
        self.launches = launches
        self.in_kernel = in_kernel

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.in_kernel[0] and func not in NO_LAUNCH and not func.is_view:
            name = _op_name(func)
            self.launches.names.append(name)
            if _syncs(func, args, kwargs):
                self.launches.syncs.append(name)
        return func(*args, **kwargs)


def _triton_launch_paths() -> list[tuple[type, str]]:
    """The classes whose ``run`` is the innermost launch of a Triton kernel."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError:
        return []
    return [(JITFunction, "run"), (InterpretedFunction, "run")]


@contextlib.contextmanager
def count_launches() -> Iterator[Launches]:
    """Count the launches made inside the ``with`` block (see the module docstring).

    Yields a :class:`Launches` that fills as the block runs: ``names`` holds one entry per
    launch (``triton:<kernel>``, an aten op's name, or ``<namespace>::<op>``), ``syncs`` the
    host syncs among them.
    """
    launches = Launches()
    in_kernel = [0]  # > 0 while an interpreted Triton kernel runs: its aten ops are its own

    def counted(run: Callable[..., Any]) -> Callable[..., Any]:
        def run_counted(self, *args, grid, warmup, **kwargs):
            if warmup:
                return run(self, *args, grid=grid, warmup=warmup, **kwargs)
            launches.names.append(f"triton:{self.fn.__name__}")
            in_kernel[0] += 1
            try:
                return run(self, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                in_kernel[0] -= 1
        return run_counted

    tolist = torch.Tensor.tolist

    def tolist_seen(self: torch.Tensor) -> Any:
        # A CPU tensor's tolist() reads memory without dispatching an op: counted as the sync it
        # would be on a GPU (on any machine). A GPU tensor's dispatches its copy to the host,
        # which the op counter counts as the sync.
        if not in_kernel[0] and self.device.type == "cpu":
            launches.syncs.append("tolist")
        return tolist(self)

    outer_mode = is_in_torch_dispatch_mode()
    with contextlib.ExitStack() as stack:
        for owner, name in _triton_launch_paths():
            stack.enter_context(mock.patch.object(owner, name, counted(getattr(owner, name))))
        if declared()["triton"].self_guided_mask is not None:  # the Triton backend runs here
            from sma_kernels.triton.launch import through_triton
            # A direct launch (sma_kernels/triton/launch.py) skips JITFunction.run: send every
            # launch through it, where it is counted. Either way one launch() is one kernel.
            stack.enter_context(through_triton())
        stack.enter_context(mock.patch.object(torch.Tensor, "tolist", tolist_seen))
        # Keep the eager path: the counter's own mode must not route calls through the ops.
        stack.enter_context(mock.patch.object(ops, "is_in_torch_dispatch_mode",
                                              lambda *args, **kwargs: outer_mode))
        stack.enter_context(_OpLaunches(launches, in_kernel))
        yield launches


# ----------------------------------------------------------------------------- the command

CALLS = ("mask (generator)", "mask (plan)", "forward (plan=None)", "forward (generator)",
         "forward (plan)", "backward")


def calls(case: bench_cases.Case, backend: str, device: torch.device, seed: int = 0,
          dtype: torch.dtype = torch.float32) -> dict[str, Callable[[], Launches]]:
    """Per call of :data:`CALLS`, a function that makes the call and returns its launches. For
    "backward" the forward runs first, uncounted."""
    x = bench_cases.make_inputs(case, device, dtype, seed)
    # As users call it: the query pool left at its default (every row, or valid under mask_self).
    options = {**x.options, "backend": backend}
    generator = torch.Generator(device=device).manual_seed(seed)
    leaves = [t.clone().requires_grad_() for t in (x.q, x.k, x.v)]

    def counted(fn: Callable[[], Any]) -> Callable[[], Launches]:
        def run() -> Launches:
            with count_launches() as launches:
                fn()
            return launches
        return run

    def attention(**how: Any) -> Callable[[], Any]:
        return lambda: sma_kernels.self_guided_attention(*leaves, x.valid, **options, **how)

    def backward() -> Launches:
        out, _ = attention(generator=generator)()
        grad_out = torch.ones_like(out)
        # autograd.grad with a dense grad_out: no seed gradient, no accumulation into .grad
        return counted(lambda: torch.autograd.grad(out, leaves, grad_out))()

    return {
        "mask (generator)": counted(lambda: sma_kernels.self_guided_mask(
            x.q, x.k, x.valid, generator=generator, **options)),
        "mask (plan)": counted(lambda: sma_kernels.self_guided_mask(
            x.q, x.k, x.valid, plan=x.plan, **options)),
        "forward (plan=None)": counted(attention()),
        "forward (generator)": counted(attention(generator=generator)),
        "forward (plan)": counted(attention(plan=x.plan)),
        "backward": backward,
    }


def measure_launches(backends: list[str], device: torch.device, dtype: torch.dtype,
                     log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """One record per (backend, tiny workload, call): its launch count, launches and syncs."""
    records = []
    for backend in backends:
        for case in bench_cases.tiny_cases():
            for call, run in calls(case, backend, device, dtype=dtype).items():
                run()  # warm-up: Triton's JIT compilation and autotuning launch too
                launches = run()
                records.append({"backend": backend, "case": case.name, "shape": list(case.shape),
                                "call": call, "launches": len(launches),
                                "names": list(launches.names), "syncs": list(launches.syncs)})
                log(f"{backend:>9}  {case.name:<9}  {call:<19}  {len(launches):3d}  "
                    f"{launches.summary()}" + (f"  HOST SYNCS: {', '.join(launches.syncs)}"
                                               if launches.syncs else ""))
    return records


def available_backends(device: torch.device) -> list[str]:
    """The backends that run on ``device`` here (triton on the CPU: under the interpreter)."""
    reasons = unavailable_reasons()
    return [name for name, backend in declared().items()
            if reasons[name] is None and backend.runs_on(device.type)]


def compiled_kernels() -> list[dict[str, Any]]:
    """Registers and spills of every Triton kernel of the backend compiled in this process (a GPU
    only: the interpreter compiles nothing), one entry per compiled variant."""
    from triton.runtime.jit import JITFunction

    from sma_kernels import triton as triton_backend

    found = []
    for module in triton_backend.kernel_modules():
        for value in vars(module).values():
            while value is not None and not isinstance(value, JITFunction):
                value = getattr(value, "fn", None)  # behind triton.autotune / triton.heuristics
            if value is None:
                continue
            for kernel_cache, *_ in value.device_caches.values():
                for kernel in kernel_cache.values():
                    kernel._init_handles()  # loads the binary: n_regs and n_spills are read then
                    found.append({"kernel": value.fn.__name__, "n_regs": kernel.n_regs,
                                  "n_spills": kernel.n_spills})
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.launches",
                                     description=summary(__doc__))
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    report.add_output_options(parser)
    parser.add_argument("--backends", nargs="+", metavar="NAME", help="only these backends")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--fail-on-spills", action="store_true",
                        help="exit 1 if a Triton kernel compiled by this (16-bit) run spills "
                             "registers (GPU only)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.fail_on_spills and args.dtype == "float32":
        parser.error("--fail-on-spills checks 16-bit launches (fp32 ones may spill)")
    dtype = getattr(torch, args.dtype)
    backends = args.backends or available_backends(device)

    records = measure_launches(backends, device, dtype)
    result = measure.new_result(
        "sma-kernels-launches/1", device, dtype=args.dtype,
        triton_interpreter=os.environ.get("TRITON_INTERPRET") == "1",
        method="bench.launches.count_launches: Triton kernel runs plus aten compute ops (views, "
               "metadata and bare allocations excluded), one call after a warm-up call",
        records=records)
    spilling = []
    if device.type == "cuda" and "triton" in backends:
        result["compiled_kernels"] = compiled_kernels()
        spilling = [entry for entry in result["compiled_kernels"] if entry["n_spills"]]
        print(f"{len(result['compiled_kernels'])} compiled Triton kernels, "
              f"{len(spilling)} spilling registers: {spilling}")
    path = measure.write_result(
        result, args.out / f"launches-{measure.device_slug(result['device'])}.json")
    print(f"wrote {path}")
    return 1 if args.fail_on_spills and spilling else 0


if __name__ == "__main__":
    sys.exit(main())
