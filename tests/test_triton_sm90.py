"""The Triton kernels compile for an H100 (sm_90) with every autotune config, the first config
fits its shared memory, and their streaming loops are software-pipelined. No GPU needed.

The interpreter tests check what the kernels compute, not that they compile: a GPU-only error
(a type that does not lower, too much shared memory) would first show on a GPU. Here each
kernel launch of an interpreter run is recorded with its real arguments, turned into the
specialization a GPU launch would use (integers equal to 1 become constants, multiples of 16 and
aligned pointers are marked divisible by 16), and compiled by Triton's NVIDIA backend for sm_90
in a separate process (tests/compile_sm90.py), once per GPU autotune config.

"Pipelined" means the compiled loop copies its tiles with asynchronous global-to-shared copies
(``ttg.async_copy_global_to_local``), which Triton only emits when it prefetches the next
iteration's loads while the current one computes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import import_triton_backend, padded_valid

import sma_kernels as sk

triton_backend = import_triton_backend()

triton = pytest.importorskip("triton")
from triton.backends.compiler import BaseBackend
from triton.runtime.jit import mangle_type, native_specialize_impl

pytestmark = [
    pytest.mark.skipif(not triton_backend.INTERPRET,
                       reason="records launches under TRITON_INTERPRET=1; on a GPU the other "
                              "tests compile and run the kernels"),
    pytest.mark.skipif("nvidia" not in triton.backends.backends,
                       reason="needs Triton's NVIDIA backend"),
]

H100_SHARED_BYTES = 227 * 1024  # opt-in shared memory per block on sm_90
# Kernels that stream tiles through a loop, whose loads must be prefetched.
PIPELINED = {"_attention_fwd_kernel", "_attention_bwd_dq_kernel", "_attention_bwd_dkdv_kernel",
             "_chosen_row_lse_kernel", "_token_scores_kernel"}
# Options of a launch that are not kernel arguments; the ones the compiler takes are kept.
COMPILE_OPTIONS = ("num_warps", "num_stages")


def _launch_spec(function, args: tuple, kwargs: dict) -> dict:
    """What a GPU launch of ``function`` with these arguments would compile."""
    signature, constexprs, divisible = {}, {}, []
    for name, value in zip(function.arg_names, args):
        if isinstance(value, torch.Tensor):
            signature[name] = mangle_type(value)
            if value.data_ptr() % 16 == 0:
                divisible.append(name)
            continue
        kind, specialization = native_specialize_impl(BaseBackend, value, False, True, True)
        if kind == "constexpr":  # an integer 1
            constexprs[name] = specialization
        else:
            signature[name] = kind
            if specialization == "D":
                divisible.append(name)
    constexprs.update({name: value for name, value in kwargs.items()
                       if name in function.arg_names})
    if "DOT_F32" in constexprs:
        constexprs["DOT_F32"] = False  # the fp32 cast is for the interpreter only
    return {"module": function.fn.__module__, "kernel": function.fn.__name__,
            "signature": signature, "constexprs": constexprs, "divisible": divisible,
            "options": {name: kwargs[name] for name in COMPILE_OPTIONS if name in kwargs}}


def _record_launches(monkeypatch) -> list[dict]:
    """Runs the backend's three ops at workload-like head dims; returns the distinct launches."""
    from triton.runtime.interpreter import InterpretedFunction
    launches: dict[str, dict] = {}
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        spec = _launch_spec(self, args, kwargs)
        launches.setdefault(json.dumps(spec, sort_keys=True), spec)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    g = torch.Generator().manual_seed(0)
    # (d, dv, dtype): proteins and pixels, molecules, HIGGS, the largest head dim, and fp32
    # (exact products).
    for dim, dim_v, dtype in [(32, 128, torch.bfloat16), (64, 64, torch.bfloat16),
                              (16, 16, torch.bfloat16), (128, 128, torch.bfloat16),
                              (128, 128, torch.float32)]:
        batch, heads, length = 2, 2, 64
        q, k = (torch.randn(batch, heads, length, dim, generator=g, dtype=dtype) for _ in "qk")
        v = torch.randn(batch, heads, length, dim_v, generator=g, dtype=dtype)
        valid = padded_valid(batch, length, g)
        out, lse = triton_backend.attention_forward(q, k, v, valid, scale=0.1)
        triton_backend.attention_backward(torch.ones_like(out), q, k, v, valid, out, lse,
                                          scale=0.1)
        plan = sk.make_plan(batch, length, length, heads, generator=g)
        for head_mix, mask_self, noise in [("mean", False, 0.0), ("random", True, 0.5)]:
            triton_backend.self_guided_mask(
                q, k, valid, valid, plan, ratio=0.3, num_per_query=2, head_mix=head_mix,
                mask_self=mask_self, noise=noise, scale=0.1)
    return list(launches.values())


def test_kernels_compile_for_sm90(monkeypatch):
    launches = _record_launches(monkeypatch)
    env = {name: value for name, value in os.environ.items()
           if name not in ("TRITON_INTERPRET", "SMA_KERNELS_AUTOTUNE")}
    worker = Path(__file__).with_name("compile_sm90.py")
    done = subprocess.run([sys.executable, str(worker)], input=json.dumps(launches), env=env,
                          capture_output=True, text=True, timeout=1200, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    compiled = {result["kernel"] for result in results}
    assert PIPELINED <= compiled, f"not recorded: {PIPELINED - compiled}"
    for result in results:
        where = f"{result['kernel']} {result['constexprs']} {result['options']}"
        assert "error" not in result, f"{where}: {result.get('error')}"
        assert result["cubin_bytes"] > 0, where
        # A config that does not fit is skipped by the autotuner (OutOfResources), but the
        # first one, which SMA_KERNELS_AUTOTUNE=0 takes, must fit every specialization.
        if result["config"] == 0:
            assert result["shared_bytes"] <= H100_SHARED_BYTES, \
                f"{where}: {result['shared_bytes']} B of shared memory"
        if result["kernel"] in PIPELINED and result["options"].get("num_stages", 1) >= 2:
            assert result["async_copies"] > 0, f"{where}: loop loads are not pipelined"
