"""The Triton kernels compile for an H100 (sm_90) with every autotune config, the first config
fits its shared memory, their streaming loops are software-pipelined, and the kernels that
subtract a maximum or lse taken from their own logits exponentiate no multiply-add of those
logits (which the interpreter, never contracting, cannot show); the score kernel's
column sums stay within warps, the configs ``python -m bench.score_configs`` times compile
spill-free, and ``python -m bench.sass_loops`` reads every streaming loop, none of which
serializes its warp-group MMAs.
No GPU needed.

The interpreter tests check what the kernels compute, not that they compile: a GPU-only error
(a type that does not lower, too much shared memory) would first show on a GPU. Here each
kernel launch of an interpreter run is recorded with its real arguments and compiled by Triton's
NVIDIA backend for sm_90 in a separate process, once per GPU autotune config
(``bench/compile_sm90.py``).

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

import ast
import itertools
import json
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

from bench import score_configs
from bench.compile_sm90 import compile_launches, recorded_launches
from sma_kernels.triton import mask_scores, short_sequence
from sma_kernels.triton._common import HEAD_BLOCKS, WIDE_HEAD_BLOCK, TileConfig
from sma_kernels.triton.short_sequence import SHORT_LENGTH

H100_SHARED_BYTES = 227 * 1024  # opt-in shared memory per block on sm_90
# Kernels that stream tiles through a loop, and how many of the streamed tiles each iteration
# must prefetch: K and V (forward, dQ), Q and dO (dK/dV), K in each of the score kernel's three
# loops (the lse loop's two copies and the column sums).
PIPELINED = {"_attention_fwd_kernel": 2, "_attention_bwd_dq_kernel": 2,
             "_attention_bwd_dkdv_kernel": 2, "_chosen_row_scores_kernel": 3}
# Above head blocks of WIDE_HEAD_BLOCK the lse loop has one copy (see mask_scores.py).
PIPELINED_WIDE = {**PIPELINED, "_chosen_row_scores_kernel": 2}
# The kernels whose 16-bit launches must not spill registers, at any config.
NO_SPILLS = {"_kept_keys_kernel", "_attention_fwd_kernel",
             "_attention_bwd_dq_kernel", "_attention_bwd_dkdv_kernel",
             "_chosen_row_scores_kernel", "_select_kernel", "_short_sequence_kernel",
             "_short_sequence_bwd_kernel"}
# The kernels that subtract a row's maximum or lse from logits they took it from: no exponential
# there may take a multiply-add of the logits' product, whose rounding error would make the
# maximum's exponent nonzero, or the score kernel's two passes differ (bench/compile_sm90.py,
# contracted_exponents). The backward's exp2(S * scale - lse) keeps its multiply-add.
EXACT_EXPONENTS = {"_attention_fwd_kernel", "_chosen_row_scores_kernel",
                   "_short_sequence_kernel"}


def _run_backend(monkeypatch) -> None:
    """Runs the backend's functions (the mask, the attention, the fused pair) at workload-like
    head dims, the mask and the fused pair on both the short-sequence and the general path, and
    the score kernel at each of its configs."""
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
            # The fused path: the selection writes the kept-key order, the backward reuses it.
            out, lse, _, order, kept = triton_backend.self_guided_attention_forward(
                q, k, v, valid, pool, plan, **options)
            triton_backend.ordered_attention_backward(torch.ones_like(out), q, k, v, order, kept,
                                                      out, lse, scale=0.1)
            if not mask_self:  # every token and query row, as None (the call's defaults)
                triton_backend.self_guided_attention_forward(q, k, v, None, None, plan, **options)
    for dim in (32, 256):  # proteins' and pixels' head dim, and the widest
        _run_score_configs(dim)


def _run_score_configs(dim: int, configs=mask_scores.CANDIDATE_CONFIGS, *,
                       accumulate: bool = True) -> None:
    """The score kernel at each of ``configs``, by default those it may take (its config follows
    from the shape, and these small shapes would not reach BLOCK_M = 64), with a partial row per
    row block and (``accumulate``), where it may take the config, with all of them summed into
    one."""
    g = torch.Generator().manual_seed(dim)
    batch, heads, num_q, length = 1, 2, 64, 100
    q, k = (torch.randn(batch, heads, n, dim, generator=g, dtype=torch.bfloat16)
            for n in (num_q, length))
    valid = padded_valid(batch, length, g)
    plan = sk.make_plan(batch, num_q, length, heads, generator=g)
    for config, max_partials in itertools.product(configs, (mask_scores.MAX_PARTIALS, 1)):
        if max_partials == 1 and (not accumulate
                                  or config.block_m > mask_scores.accumulating_block_m(dim)):
            continue  # not a config the accumulating kernel takes
        mask_scores.chosen_row_scores(q, k, valid, None, plan, ratio=0.9, num_per_query=1,
                                      mask_self=False, noise=0.0, head_mix="mean", scale=0.1,
                                      config=config, max_partials=max_partials)


def test_no_jit_function_returns_none():
    # Triton 3.6 (the H200 host's) cannot compile a jit function that returns None, which the
    # installed Triton may accept: the compile below would not see it.
    sources = Path(sk.__file__).parent / "triton"
    for path in sorted(sources.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(decorator)
                                                         for decorator in node.decorator_list):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Return) and (
                            inner.value is None or ast.unparse(inner.value) == "None"):
                        raise AssertionError(f"{path.name}: {node.name} returns None")


def test_kernels_compile_for_sm90(monkeypatch):
    with recorded_launches() as launches:
        _run_backend(monkeypatch)
    results = compile_launches(launches)
    compiled = {result["kernel"] for result in results}
    assert set(PIPELINED) | NO_SPILLS <= compiled, f"not recorded: {set(PIPELINED) - compiled}"
    assert any(result["contracted_exponents"] for result in results), \
        "no exponential of a multiply-add found anywhere, not even in the backward"
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
        if result["kernel"] in EXACT_EXPONENTS:
            assert result["contracted_exponents"] == 0, \
                f"{where}: {result['contracted_exponents']} exponentials of a multiply-add"
        if result["kernel"] in PIPELINED and result["options"].get("num_stages", 1) >= 2:
            prefetched = (PIPELINED_WIDE if wide else PIPELINED)[result["kernel"]]
            assert result["loop_async_copies"] >= prefetched, \
                f"{where}: {result['loop_async_copies']} tile loads prefetched in the loop"


def test_score_kernel_sums_columns_within_warps():
    # The column sums of the score kernel's second loop reduce over the query rows of each key
    # tile, computed as K Q^T so that those rows lie within a warp: the loop takes no more
    # barriers and shuffles per tile than the row loop's max and sum (the tile in Q K^T order
    # took 10 barriers and 80 shuffles per warp and tile at BLOCK_M = 64, the row loop 2 and 12).
    with recorded_launches() as launches:
        _run_score_configs(32)
    results = compile_launches(launches, sass=True)
    assert {result["constexprs"]["BLOCK_M"] for result in results} == \
        {config.block_m for config in mask_scores.CANDIDATE_CONFIGS}
    for result in results:
        where = f"BLOCK_M = {result['constexprs']['BLOCK_M']}"
        assert "error" not in result, f"{where}: {result.get('error')}"
        *row_loops, columns = result["loops"]  # the lse loop's two copies, the column sums
        assert len(row_loops) == 2, f"{where}: {result['loops']}"
        for rows in row_loops:
            assert columns["BAR"] <= rows["BAR"] and columns["SHFL"] <= rows["SHFL"], \
                f"{where}: row loop {rows}, column loop {columns}"


def test_score_configs_candidates_compile_without_spills():
    # python -m bench.score_configs times these on a GPU, to choose the score kernel's config:
    # each must be one it could take, spill-free and pipelined (at the pixel workload's d = 32).
    candidates = [TileConfig(*candidate) for candidate in score_configs.CANDIDATES]
    with recorded_launches() as launches:
        _run_score_configs(32, candidates, accumulate=False)
    results = compile_launches(launches)
    assert len(results) == len(candidates)
    for result in results:
        where = f"{result['constexprs']['BLOCK_M']}, {result['constexprs']['BLOCK_N']}, " \
                f"{result['options']}"
        assert "error" not in result, f"{where}: {result.get('error')}"
        assert result["local_bytes"] == 0, \
            f"{where}: {result['registers']} registers, {result['local_bytes']} B spilled"
        assert result["loop_async_copies"] >= PIPELINED["_chosen_row_scores_kernel"], where


def test_sass_loops_reports_each_streaming_loop(tmp_path):
    # A fresh process: the script must set TRITON_INTERPRET before Triton is imported.
    done = subprocess.run([sys.executable, "-m", "bench.sass_loops", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, check=False,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "sass-loops-sm90.json").read_text())
    # HIGGS takes the short-sequence kernel, which has no streaming loop.
    assert [record["case"] for record in result["records"]] == ["proteins", "molecules", "pixels"]
    loops = {"_chosen_row_scores_kernel": ["lse", "lse, masked", "column sums"],
             "_attention_fwd_kernel": ["attention"], "_attention_bwd_dkdv_kernel": ["dK dV"],
             "_attention_bwd_dq_kernel": ["dQ"]}
    for record in result["records"]:
        assert {kernel["kernel"] for kernel in record["kernels"]} == set(loops), record["case"]
        for kernel in record["kernels"]:
            assert [loop["loop"] for loop in kernel["loops"]] == loops[kernel["kernel"]]
            assert kernel["local_bytes"] == 0
            for loop in kernel["loops"]:
                # Every logit of the tile is exponentiated, at least once: a tile smaller than
                # its warps cover (64 rows over 8 warps, some 32 x 32 tiles over 4) is computed
                # twice.
                assert 1.0 <= loop["per_logit"]["exponentials"] <= 2.1, (record["case"], loop)
                cycles = loop["sm_cycles_per_logit"]
                assert cycles["floor"] == max(cycles["issue"], cycles["exp"]) > 0
                # Warp-group MMAs overlap: ptxas, where it serializes them (a select on the
                # dK/dV kernel's accumulators after its loop did), waits after every one.
                tile = loop["per_warp_and_tile"]
                if tile["HGMMA"] > 1:
                    assert tile["WARPGROUP.DEPBAR"] < tile["HGMMA"], (record["case"], loop)
