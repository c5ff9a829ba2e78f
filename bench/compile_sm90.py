"""Compile recorded Triton kernel launches for an H100 (sm_90), without a GPU.

Used by ``tests/test_triton_sm90.py`` (registers, spills, shared memory, software pipelining) and
by ``python -m bench.sass_loops`` (the instruction cost of the streaming loops).

Launches are recorded under the interpreter (``TRITON_INTERPRET=1``) with their real arguments
(:func:`recorded_launches`) and turned into the specialization a GPU launch would use: integers
equal to 1 become constants, multiples of 16 and aligned pointers are marked divisible by 16.
:func:`compile_launches` compiles them in a separate process without ``TRITON_INTERPRET``
(``python -m bench.compile_sm90``, which reads the launches as JSON on stdin), so that the
kernels are real ``JITFunction`` objects, once per autotune config of each kernel (or with its
own options when the kernel is not autotuned), and returns one result per compilation, with the
config's index in the kernel's list.

Register and local-memory use come from the cubin (``cuobjdump -res-usage``, which Triton ships
with its NVIDIA backend): on a GPU Triton reads the same figures from the driver, as
``n_regs`` and ``n_spills`` (the local memory in 4-byte words, the stack frame included: what
ptxas spills registers to). The PTX gives the exponentials of a multiply-add
(:func:`contracted_exponents`). Asked for, a result also lists the machine code's streaming
loops (:func:`streaming_loops`, from ``cuobjdump -sass``). The compiler is the installed Triton's,
which may differ from a GPU host's; to compile with the host's version, install it apart and
name its folder in ``SMA_KERNELS_SM90_TRITON`` (recording still uses the installed one)::

    pip install --no-deps --target /tmp/triton-3.6 triton==3.6.0
    SMA_KERNELS_SM90_TRITON=/tmp/triton-3.6 python -m pytest tests/test_triton_sm90.py
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
import triton
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton.compiler.errors import CompilationError
from triton.runtime.jit import mangle_type

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
# Options of a launch that are not kernel arguments; the ones the compiler takes are kept.
COMPILE_OPTIONS = ("num_warps", "num_stages", "maxnreg")
# Opcodes that :func:`streaming_loops` counts apart, each with any further modifiers: the
# tensor-core products, the exponentials, warp shuffles, barriers, shared-memory stores and loads,
# and the waits for warp-group MMAs (ptxas waits after each one where it serializes them).
COUNTED_OPS = ("HGMMA", "HMMA", "MUFU.EX2", "SHFL", "BAR", "STS", "LDS", "WARPGROUP.DEPBAR")


# ----------------------------------------------------------------------------- recording

def launch_spec(function: Any, args: tuple, kwargs: dict) -> dict:
    """What a GPU launch of the interpreted kernel ``function`` with these arguments would
    compile."""
    # Recording only: the compiling process may run another Triton, which may lack it.
    from triton.runtime.jit import native_specialize_impl

    signature, constexprs, divisible = {}, {}, []
    params = inspect.signature(function.fn).parameters
    bound = {**dict(zip(function.arg_names, args)),
             **{name: value for name, value in kwargs.items() if name in params}}
    generic = set(function.kwargs.get("do_not_specialize") or ())  # the autotuning buckets
    for name in function.arg_names:
        value = bound[name]
        if "constexpr" in str(params[name].annotation):
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = mangle_type(value)
            if value.data_ptr() % 16 == 0:
                divisible.append(name)
        else:
            kind, specialization = native_specialize_impl(BaseBackend, value, False,
                                                          name not in generic, True)
            if kind == "constexpr":  # an integer 1
                constexprs[name] = specialization
            else:
                signature[name] = kind
                if specialization == "D":
                    divisible.append(name)
    return {"module": function.fn.__module__, "kernel": function.fn.__name__,
            "signature": signature, "constexprs": constexprs, "divisible": divisible,
            "options": {name: kwargs[name] for name in COMPILE_OPTIONS if name in kwargs}}


@contextlib.contextmanager
def recorded_launches() -> Iterator[list[dict]]:
    """Records the distinct kernel launches run under the interpreter inside the block, into
    the list it yields, as :func:`launch_spec` describes them."""
    from triton.runtime.interpreter import InterpretedFunction
    launches: list[dict] = []
    seen: set[str] = set()
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        spec = launch_spec(self, args, kwargs)
        key = json.dumps(spec, sort_keys=True)
        if key not in seen:
            seen.add(key)
            launches.append(spec)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    try:
        yield launches
    finally:
        InterpretedFunction.run = run


def compile_launches(launches: list[dict], *, sass: bool = False,
                     timeout: float = 1200) -> list[dict]:
    """Compiles the launches for sm_90 in a fresh process, once per GPU config; each result names
    its launch by its index in ``launches``, and with ``sass`` also has its ``loops``
    (:func:`streaming_loops`)."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("TRITON_INTERPRET", "SMA_KERNELS_AUTOTUNE")}
    if os.environ.get("SMA_KERNELS_SM90_TRITON"):  # another Triton, installed apart
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [os.environ["SMA_KERNELS_SM90_TRITON"], env.get("PYTHONPATH")]))
    jobs = [{**launch, "sass": sass} for launch in launches]
    done = subprocess.run([sys.executable, "-m", "bench.compile_sm90"], input=json.dumps(jobs),
                          env=env, capture_output=True, text=True, timeout=timeout, check=False,
                          cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"the sm_90 compile failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


# ----------------------------------------------------------------------------- machine code

def streaming_loops(sass: str) -> list[dict]:
    """The loops of a kernel's SASS that run tensor-core instructions (its streaming loops), in
    program order: each innermost backward branch's body, with its instruction count and the
    counts of :data:`COUNTED_OPS` (per warp and iteration)."""
    instructions = [(int(address, 16), text.strip()) for address, text in
                    re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = []
    for address, text in instructions:
        target = re.search(r"\bBRA\b.*?\b0x([0-9a-f]+)\b", text)
        if target and int(target.group(1), 16) < address:
            start = int(target.group(1), 16)
            body = [line for at, line in instructions if start <= at <= address]
            # An opcode without its guard predicate: "@!P0 BAR.SYNC 0x0" -> BAR.SYNC.
            opcodes = [re.sub(r"^@!?U?P\w+\s+", "", line).split()[0] for line in body]
            counts = {op: sum(code == op or code.startswith(op + ".") for code in opcodes)
                      for op in COUNTED_OPS}
            if counts["HGMMA"] or counts["HMMA"]:
                loops.append({"start": start, "end": address, "instructions": len(body),
                              **counts})
    # Only innermost loops: drop a loop that contains another.
    return [loop for loop in loops
            if not any(other is not loop and loop["start"] <= other["start"]
                       and other["end"] <= loop["end"] for other in loops)]


# ----------------------------------------------------------------------------- the worker

def _kernel(launch: dict) -> Any:
    return getattr(importlib.import_module(launch["module"]), launch["kernel"])


def _jobs(launch: dict) -> list[dict]:
    """One job per GPU config: the config's block sizes and warps replace the recorded ones."""
    configs = getattr(_kernel(launch), "configs", None)  # an Autotuner has them
    if configs is None:
        return [{**launch, "config": 0}]
    return [{**launch, "constexprs": {**launch["constexprs"], **config.kwargs},
             "options": {"num_warps": config.num_warps, "num_stages": config.num_stages,
                         "maxnreg": config.maxnreg},
             "config": index}
            for index, config in enumerate(configs)]


def _loop_async_copies(ttgir: str) -> int:
    """Asynchronous global-to-shared copies inside ``scf.for`` bodies: the loads that a
    software-pipelined loop issues for a later iteration while this one computes."""
    copies, depth = 0, 0
    for line in ttgir.splitlines():
        if depth == 0:
            depth = int("scf.for" in line and line.rstrip().endswith("{"))
            continue
        copies += line.count("ttg.async_copy_global_to_local")
        depth += line.count("{") - line.count("}")
    return copies


def contracted_exponents(ptx: str) -> int:
    """The exponentials (``ex2``) of a kernel's PTX whose argument is a product's multiply-add:
    an ``fma``, or an add or subtract of a plain ``mul.f32``, which ptxas may contract (``.rn``
    forbids it). Such an exponent carries the product's rounding error, which a maximum or lse
    taken from the rounded product does not: exp2(S - m) above 1 at the maximum (see
    ``sma_kernels/triton/_common.py``, ``rounded_product``)."""
    definitions: dict[str, list[tuple[str, list[str]]]] = {}
    exponents = []
    for opcode, operands in re.findall(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.]*)\s+([^;{}]*);",
                                       ptx, re.MULTILINE):
        registers = [operand.strip() for operand in operands.split(",")]
        if opcode.startswith("ex2."):
            exponents.append(registers[1])
        definitions.setdefault(registers[0], []).append((opcode, registers[1:]))

    def plain_product(register: str) -> bool:
        return any(re.fullmatch(r"mul(\.ftz)?\.f32", opcode)
                   for opcode, _ in definitions.get(register, []))

    def multiply_add(register: str) -> bool:
        return any(opcode.startswith("fma.") or (
            re.fullmatch(r"(add|sub)(\.ftz)?\.f32", opcode) is not None
            and any(plain_product(source) for source in sources))
            for opcode, sources in definitions.get(register, []))

    return sum(map(multiply_add, exponents))


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        return subprocess.run([str(CUOBJDUMP), flag, file.name], capture_output=True, text=True,
                              check=True).stdout


def _resource_usage(cubin: bytes) -> dict:
    """Registers per thread and local memory per thread (stack frame + local arrays, in bytes)
    of the cubin's kernel."""
    report = _cuobjdump(cubin, "-res-usage")
    usage = {key: int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", report)}
    return {"registers": usage["REG"], "local_bytes": usage["STACK"] + usage["LOCAL"]}


def _compile(job: dict) -> dict:
    kernel = _kernel(job)
    fn = kernel.fn if hasattr(kernel, "configs") else kernel  # an Autotuner wraps its JITFunction
    index = {name: (i,) for i, name in enumerate(fn.arg_names)}
    signature = {**job["signature"], **dict.fromkeys(job["constexprs"], "constexpr")}
    source = ASTSource(fn, signature,
                       constexprs={index[name]: value for name, value in job["constexprs"].items()},
                       attrs={index[name]: [["tt.divisibility", 16]] for name in job["divisible"]})
    result = {key: job[key] for key in ("launch", "kernel", "constexprs", "options", "config")}
    try:
        compiled = triton.compile(source, target=TARGET, options=job["options"])
    except (CompilationError, RuntimeError) as error:  # the caller reports the message
        return {**result, "error": f"{type(error).__name__}: {error}"[:3000]}
    cubin = compiled.asm["cubin"]
    if job.get("sass"):
        result["loops"] = streaming_loops(_cuobjdump(cubin, "-sass"))
    return {**result, "shared_bytes": compiled.metadata.shared,
            "loop_async_copies": _loop_async_copies(compiled.asm["ttgir"]),
            "contracted_exponents": contracted_exponents(compiled.asm["ptx"]),
            "cubin_bytes": len(cubin), **_resource_usage(cubin)}


def main() -> None:
    jobs = [{**job, "launch": index} for index, launch in enumerate(json.load(sys.stdin))
            for job in _jobs(launch)]
    with ProcessPoolExecutor(max_workers=2) as pool:
        json.dump(list(pool.map(_compile, jobs)), sys.stdout)


if __name__ == "__main__":
    main()
