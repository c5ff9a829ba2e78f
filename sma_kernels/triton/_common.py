"""Helpers shared by the Triton kernel files: interpreter detection, autotuning, tile loads.

``TRITON_INTERPRET=1`` runs every kernel in NumPy, one program at a time, on CPU tensors. Two
things differ there and are decided here once:

* Autotuning would time each config in the interpreter, which is slow and meaningless, so
  :func:`autotune` keeps a single fixed config (large blocks: fewer, bigger NumPy steps).
  ``SMA_KERNELS_AUTOTUNE=0`` does the same on a GPU with each kernel's first config: one
  compilation per kernel variant instead of one per config, for test runs on a fresh machine.
* The interpreter's ``tl.dot`` computes wrong results for bf16 operands, so the kernels take a
  ``DOT_F32`` constexpr that casts dot operands to fp32 under the interpreter only; on a GPU the
  dots stay in the input dtype (tensor cores, fp32 accumulation).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
import triton.testing

# Triton reads the variable when a kernel is decorated, so this must match import time.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = os.environ.get("SMA_KERNELS_AUTOTUNE", "1") != "0"

# Kernels use exp2/log2 (one MUFU instruction each) with a factor log2(e), instead of exp/log:
# same result up to rounding, fewer instructions, no libdevice.
LOG2E = math.log2(math.e)
LOG2E_C: tl.constexpr = tl.constexpr(LOG2E)  # the same number inside the kernels


def autotune(configs: Sequence[triton.Config], interpret_config: triton.Config, key: list[str],
             bounds: dict[str, str]):
    """``triton.autotune`` on a GPU; under the interpreter (or ``SMA_KERNELS_AUTOTUNE=0``), one
    fixed config and no timing.

    ``bounds`` maps a block-size meta-parameter to the kernel argument that bounds it (say
    ``{"BLOCK_N": "NK"}``): configs whose block exceeds the next power of two of that size are
    dropped before timing, since they only add padding (and each config costs a compilation).
    """
    if INTERPRET:
        return triton.autotune(configs=[interpret_config], key=[])
    if not AUTOTUNE:
        return triton.autotune(configs=[configs[0]], key=[])

    def prune(configs, named_args, **_):
        def fits(config):
            return all(config.kwargs[block] <= max(smallest[block],
                                                   next_power_of_2(named_args[size]))
                       for block, size in bounds.items())
        return [config for config in configs if fits(config)]

    def bench(fn, quantiles):
        # Triton's default (25 ms warm-up, 100 ms of repeats per config) makes the first call
        # of every new shape take seconds; a fifth of it still ranks these configs.
        return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)

    smallest = {block: min(config.kwargs[block] for config in configs) for block in bounds}
    return triton.autotune(configs=list(configs), key=key,
                           prune_configs_by={"early_config_prune": prune}, do_bench=bench)


def cdiv(a: int, b: int) -> int:
    """Host-side ceil(a / b). (``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr
    functions, several times slower to call from Python; these run on every launch.)"""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Host-side: the smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


# The autotuned kernels key on NQ_BUCKET and NK_BUCKET, their sizes rounded up to a power of two,
# not on the sizes: a model whose batches are padded to their longest sequence changes L at every
# step, and an exact-size key would re-time every config of every kernel for each new length.
# The kernels take the rounded sizes as extra arguments that only the autotuner reads, exempt
# from specialization so that they add no compilation.
BUCKET_ARGS = ("NQ_BUCKET", "NK_BUCKET")


def size_buckets(num_q: int, num_k: int) -> dict[str, int]:
    """The BUCKET_ARGS of a launch with NQ = num_q and NK = num_k."""
    return {"NQ_BUCKET": next_power_of_2(num_q), "NK_BUCKET": next_power_of_2(num_k)}


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact fp32 products for fp32 inputs (PyTorch's own fp32 matmul
    does not use TF32 by default), the native tensor-core path for fp16/bf16."""
    return "ieee" if dtype == torch.float32 else "tf32"


def block_dim(d: int) -> int:
    """Padded head-dim block: a power of two and at least 16 (``tl.dot``'s minimum K and N)."""
    return max(16, next_power_of_2(d))


@triton.jit
def load_tile(base, rows, row_ok, stride_row, offs_col, stride_col, COLS: tl.constexpr,
              TO_F32: tl.constexpr):
    """The (rows, offs_col) tile at ``base``: zero outside ``row_ok`` and the first COLS columns,
    cast to fp32 when TO_F32 (the interpreter's ``tl.dot``, see above). Inlined by Triton, so a
    load in a loop is still software-pipelined."""
    tile = tl.load(base + rows[:, None] * stride_row + offs_col[None, :] * stride_col,
                   mask=row_ok[:, None] & (offs_col[None, :] < COLS), other=0.0)
    if TO_F32:
        tile = tile.to(tl.float32)
    return tile


# Per-sample int32 metadata of the mask kernels, a (B, META_WIDTH) tensor: num_top, num_random,
# and the first valid token index and one past the last.
META_TOP, META_RANDOM, META_FIRST, META_LAST = 0, 1, 2, 3
META_WIDTH = 4
# The same numbers as compile-time constants for the kernels.
META_TOP_C: tl.constexpr = tl.constexpr(META_TOP)
META_RANDOM_C: tl.constexpr = tl.constexpr(META_RANDOM)
META_FIRST_C: tl.constexpr = tl.constexpr(META_FIRST)
META_LAST_C: tl.constexpr = tl.constexpr(META_LAST)
META_WIDTH_C: tl.constexpr = tl.constexpr(META_WIDTH)
