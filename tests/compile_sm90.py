"""Compile recorded Triton kernel launches for an H100 (sm_90), without a GPU.

Run by tests/test_triton_sm90.py in a fresh process without ``TRITON_INTERPRET``, so that the
kernels are real ``JITFunction`` objects. Reads a JSON list of launches on stdin, each
``{"module", "kernel", "signature", "constexprs", "divisible", "options"}`` as a GPU launch would
specialize them, compiles each one with every autotune config of its kernel (or with its own
options when the kernel is not autotuned), and prints one JSON result per compilation, with the
config's index in the kernel's list.

Register and local-memory use come from the cubin (``cuobjdump -res-usage``, which Triton ships
with its NVIDIA backend): on a GPU Triton reads the same figures from the driver, as
``n_regs`` and ``n_spills`` (the local memory in 4-byte words, the stack frame included: what
ptxas spills registers to).
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.errors import CompilationError

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _kernel(launch: dict):
    return getattr(importlib.import_module(launch["module"]), launch["kernel"])


def _jobs(launch: dict) -> list[dict]:
    """One job per GPU config: the config's block sizes and warps replace the recorded ones."""
    configs = getattr(_kernel(launch), "configs", None)  # an Autotuner has them
    if configs is None:
        return [{**launch, "config": 0}]
    return [{**launch, "constexprs": {**launch["constexprs"], **config.kwargs},
             "options": {"num_warps": config.num_warps, "num_stages": config.num_stages},
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


def _resource_usage(cubin: bytes) -> dict:
    """Registers per thread and local memory per thread (stack frame + local arrays, in bytes)
    of the cubin's kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run([str(CUOBJDUMP), "-res-usage", file.name], capture_output=True,
                                text=True, check=True).stdout
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
    result = {key: job[key] for key in ("kernel", "constexprs", "options", "config")}
    try:
        compiled = triton.compile(source, target=TARGET, options=job["options"])
    except (CompilationError, RuntimeError) as error:  # the test fails with the message
        return {**result, "error": f"{type(error).__name__}: {error}"[:3000]}
    return {**result, "shared_bytes": compiled.metadata.shared,
            "loop_async_copies": _loop_async_copies(compiled.asm["ttgir"]),
            "cubin_bytes": len(compiled.asm["cubin"]), **_resource_usage(compiled.asm["cubin"])}


def main() -> None:
    jobs = [job for launch in json.load(sys.stdin) for job in _jobs(launch)]
    with ProcessPoolExecutor(max_workers=2) as pool:
        json.dump(list(pool.map(_compile, jobs)), sys.stdout)


if __name__ == "__main__":
    main()
