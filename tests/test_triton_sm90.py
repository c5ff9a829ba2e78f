"""The Triton kernels compile for an H100 (sm_90) with every autotune config, the first config
fits its shared memory, and their streaming loops are software-pipelined. No GPU needed.

The interpreter tests check what the kernels compute, not that they compile: a GPU-only error
(a type that does not lower, too much shared memory) would first show on a GPU. Here each
kernel launch of an interpreter run is recorded with its real arguments, turned into the
specialization a GPU launch would use (integers equal to 1 become constants, multiples of 16 and
aligned pointers are marked divisible by 16), and compiled by Triton's NVIDIA backend for sm_90
in a separate process (tests/compile_sm90.py), once per GPU autotune config.

No register spills in the attention and mask kernels: every compilation of a 16-bit launch (the
tensor-core path, which the workloads take) uses no local memory, the figure Triton reports on
a GPU as ``n_spills``. The fp32 launches (exact fp32 dots, on the CUDA cores) are only
compiled: at d = 128 their tiles do not fit in registers at any config.

"Pipelined" means the compiled loop body copies its streamed tiles with asynchronous
global-to-shared copies (``ttg.async_copy_global_to_local``), which Triton only emits when it
prefetches a later iteration's loads while the current one computes. The compiler is the
installed Triton's (the version CI installs), which may differ from a GPU host's.
"""

from __future__ import annotations

import inspect
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import import_triton_backend

import sma_kernels as sk
from sma_kernels.testing import padded_valid

triton_backend = import_triton_backend()

# Skip before importing Triton internals, which other Triton versions may not have.
if not triton_backend.INTERPRET:
    pytest.skip("records launches under TRITON_INTERPRET=1; on a GPU the other tests compile and "
                "run the kernels", allow_module_level=True)
import triton

if "nvidia" not in triton.backends.backends:
    pytest.skip("needs Triton's NVIDIA backend", allow_module_level=True)
from triton.backends.compiler import BaseBackend
from triton.runtime.jit import mangle_type, native_specialize_impl

from sma_kernels.triton import short_sequence
from sma_kernels.triton._common import HEAD_BLOCKS, WIDE_HEAD_BLOCK
from sma_kernels.triton.short_sequence import SHORT_LENGTH

H100_SHARED_BYTES = 227 * 1024  # opt-in shared memory per block on sm_90
# Kernels that stream tiles through a loop, and how many of the streamed tiles each iteration
# must prefetch: K and V (forward, dQ), Q and dO (dK/dV), K in each of the score kernel's two loops.
PIPELINED = {"_attention_fwd_kernel": 2, "_attention_bwd_dq_kernel": 2,
             "_attention_bwd_dkdv_kernel": 2, "_chosen_row_scores_kernel": 2}
# The kernels whose 16-bit launches must not spill registers, at any config.
NO_SPILLS = {"_kept_keys_kernel", "_attention_bwd_prologue_kernel", "_attention_fwd_kernel",
             "_attention_bwd_dq_kernel", "_attention_bwd_dkdv_kernel",
             "_chosen_row_scores_kernel", "_select_kernel", "_short_sequence_kernel",
             "_short_sequence_bwd_kernel"}
# Options of a launch that are not kernel arguments; the ones the compiler takes are kept.
COMPILE_OPTIONS = ("num_warps", "num_stages")


def _launch_spec(function, args: tuple, kwargs: dict) -> dict:
    """What a GPU launch of ``function`` with these arguments would compile."""
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
    if "DOT_F32" in constexprs:
        constexprs["DOT_F32"] = False  # the fp32 cast is for the interpreter only
    return {"module": function.fn.__module__, "kernel": function.fn.__name__,
            "signature": signature, "constexprs": constexprs, "divisible": divisible,
            "options": {name: kwargs[name] for name in COMPILE_OPTIONS if name in kwargs}}


def _record_launches(monkeypatch) -> list[dict]:
    """Runs the backend's functions (the mask, the attention, the fused pair) at workload-like
    head dims, the mask and the fused pair on both the short-sequence and the general path;
    returns the distinct launches."""
    from triton.runtime.interpreter import InterpretedFunction
    launches: dict[str, dict] = {}
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        spec = _launch_spec(self, args, kwargs)
        launches.setdefault(json.dumps(spec, sort_keys=True), spec)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    g = torch.Generator().manual_seed(0)
    # (d, dv, dtype, Q, L): proteins and pixels, molecules, HIGGS, the widest head dim at which
    # every config runs, a wider one (first config only), fp32 (exact products), the largest
    # short-sequence tile whole, the short forward's head-dim chunks at that tile (self-attention
    # at d = 128; 256 latents over 128 tokens), few queries (32 over 64 tokens, padded to 64-row
    # blocks; the HIGGS tile with V in chunks), and a long row (the largest blocks of the kernels
    # not autotuned).
    for dim, dim_v, dtype, num_q, length in [
            (32, 128, torch.bfloat16, 64, 64), (64, 64, torch.bfloat16, 64, 64),
            (16, 16, torch.bfloat16, 64, 64), (128, 128, torch.bfloat16, 64, 64),
            (256, 256, torch.bfloat16, 64, 64), (128, 128, torch.float32, 64, 64),
            (64, 64, torch.bfloat16, 128, 128), (128, 128, torch.bfloat16, 128, 128),
            (32, 128, torch.bfloat16, 256, 128), (64, 64, torch.bfloat16, 32, 64),
            (16, 128, torch.bfloat16, 28, 28), (16, 16, torch.bfloat16, 16, 5000)]:
        batch, heads = 2, 2
        q = torch.randn(batch, heads, num_q, dim, generator=g, dtype=dtype)
        k = torch.randn(batch, heads, length, dim, generator=g, dtype=dtype)
        v = torch.randn(batch, heads, length, dim_v, generator=g, dtype=dtype)
        valid = padded_valid(batch, length, g)
        out, lse = triton_backend.attention_forward(q, k, v, valid, scale=0.1)
        triton_backend.attention_backward(torch.ones_like(out), q, k, v, valid, out, lse,
                                          scale=0.1)
        plan = sk.make_plan(batch, num_q, length, heads, generator=g)
        self_attention = num_q == length  # the tokens are the queries: mask_self applies
        pool = valid if self_attention else torch.ones(batch, num_q, dtype=torch.bool)
        for (head_mix, mask_self, noise), short_length in itertools.product(
                [("mean", False, 0.0), ("random", True, 0.5)], (SHORT_LENGTH, 0)):
            if mask_self and not self_attention:
                continue
            monkeypatch.setattr(short_sequence, "SHORT_LENGTH", short_length)
            options = {"ratio": 0.3, "num_per_query": 2, "head_mix": head_mix,
                       "mask_self": mask_self, "noise": noise, "scale": 0.1}
            triton_backend.self_guided_mask(q, k, valid, pool, plan, **options)
            # The fused path: the selection writes the kept-key order, the backward's prologue
            # computes delta only.
            out, lse, _, order, kept = triton_backend.self_guided_attention_forward(
                q, k, v, valid, pool, plan, **options)
            triton_backend.ordered_attention_backward(torch.ones_like(out), q, k, v, order, kept,
                                                      out, lse, scale=0.1)
            if not mask_self:  # every token and query row, as None (the call's defaults)
                triton_backend.self_guided_attention_forward(q, k, v, None, None, plan, **options)
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
    assert set(PIPELINED) | NO_SPILLS <= compiled, f"not recorded: {set(PIPELINED) - compiled}"
    for result in results:
        where = f"{result['kernel']} {result['constexprs']} {result['options']}"
        assert "error" not in result, f"{where}: {result.get('error')}"
        assert result["cubin_bytes"] > 0, where
        # A config that does not fit is skipped by the autotuner (OutOfResources), but the
        # first one, which SMA_KERNELS_AUTOTUNE=0 takes, must fit every specialization.
        if result["config"] == 0:
            assert result["shared_bytes"] <= H100_SHARED_BYTES, \
                f"{where}: {result['shared_bytes']} B of shared memory"
        # Above WIDE_HEAD_BLOCK the autotuner keeps the first config only (see _common.autotune).
        wide = any(result["constexprs"].get(block, 0) > WIDE_HEAD_BLOCK for block in HEAD_BLOCKS)
        if (result["kernel"] in NO_SPILLS and result["constexprs"].get("PRECISION") != "ieee"
                and not (wide and result["config"] > 0)):
            assert result["local_bytes"] == 0, \
                f"{where}: {result['registers']} registers, {result['local_bytes']} B spilled"
        if result["kernel"] in PIPELINED and result["options"].get("num_stages", 1) >= 2:
            assert result["loop_async_copies"] >= PIPELINED[result["kernel"]], \
                f"{where}: {result['loop_async_copies']} tile loads prefetched in the loop"
