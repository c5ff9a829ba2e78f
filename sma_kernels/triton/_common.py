"""Helpers shared by the Triton kernel files: interpreter detection, autotuning and its configs,
launch grids, tile offsets and loads.

``TRITON_INTERPRET=1`` runs every kernel in NumPy, one program at a time, on CPU tensors. Two
things differ there and are decided here once:

* Autotuning would time each config in the interpreter, which is slow and meaningless, so
  :func:`autotune` keeps a single fixed config (large blocks: fewer, bigger NumPy steps).
  ``SMA_KERNELS_AUTOTUNE=0`` does the same on a GPU with each kernel's first config: one
  compilation per kernel variant instead of one per config, for test runs on a fresh machine.
* The interpreter's ``tl.dot`` computes wrong results for bf16 operands, so :func:`load_tile`
  casts the tiles it loads (the dots' operands) to fp32 under the interpreter only (the
  ``INTERPRET_C`` constexpr); on a GPU the dots stay in the input dtype (tensor cores, fp32
  accumulation). The interpreter's dot is
  NumPy's matmul, whose summation order depends on the operands' shapes: the score kernel
  (mask_scores.py) takes one orientation there for both of its passes over the same logits.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import NamedTuple

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
INTERPRET_C: tl.constexpr = tl.constexpr(INTERPRET)


@triton.jit
def rounded_product(x, y):
    """x * y in fp32, rounded on its own: never contracted with a later add into an FMA.

    A contracted ``x * y - c`` rounds once, so it differs from the rounded product minus c by
    that product's rounding error, up to half an ulp of x * y: at large x * y, exponents of such
    differences would not match those of a pass that rounded the product (PTX's ``mul.rn`` is
    never contracted). The interpreter (NumPy) does not contract.
    """
    if INTERPRET_C:
        return x * y
    else:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [x, y],
                                         dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def opaque(x):
    """x (int32), through a copy the compiler can neither see through nor move: what is computed
    from it inside a loop stays in that loop (PTX ``mov`` in a volatile asm statement). The
    interpreter runs no compiler."""
    if INTERPRET_C:
        return x
    else:
        return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.int32,
                                         is_pure=False, pack=1)


# The head-dim blocks of the attention kernels, and the widest at which every config is tried.
HEAD_BLOCKS = ("BLOCK_D", "BLOCK_DV")
WIDE_HEAD_BLOCK = 128
WIDE_HEAD_BLOCK_C: tl.constexpr = tl.constexpr(WIDE_HEAD_BLOCK)


def autotune(configs: Sequence[triton.Config], interpret_config: triton.Config, key: list[str],
             bounds: dict[str, str]):
    """``triton.autotune`` on a GPU; under the interpreter (or ``SMA_KERNELS_AUTOTUNE=0``), one
    fixed config and no timing.

    ``bounds`` maps a block-size meta-parameter to the kernel argument that bounds it (say
    ``{"BLOCK_N": "NK"}``): configs whose block exceeds the next power of two of that size are
    dropped before timing, since they only add padding (and each config costs a compilation).
    Head dims above :data:`WIDE_HEAD_BLOCK` keep the first config only: it has the smallest
    tiles, and the larger ones spill registers there on sm_90 (``tests/test_triton_sm90.py``).
    """
    if INTERPRET:
        return triton.autotune(configs=[interpret_config], key=[])
    if not AUTOTUNE:
        return triton.autotune(configs=[configs[0]], key=[])

    def prune(configs, named_args, **kwargs):
        # The autotuner passes the positional arguments as named_args and the keyword ones as
        # kwargs; the launchers pass everything by keyword.
        args = {**named_args, **kwargs}

        def fits(config):
            return all(config.kwargs[block] <= max(smallest[block], next_power_of_2(args[size]))
                       for block, size in bounds.items())
        if any(args.get(block, 0) > WIDE_HEAD_BLOCK for block in HEAD_BLOCKS):
            return [configs[0]]
        return [config for config in configs if fits(config)]

    def bench(fn, quantiles):
        # Triton's default (25 ms warm-up, 100 ms of repeats per config) makes the first call
        # of every new shape take seconds; a fifth of it still ranks these configs.
        return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)

    smallest = {block: min(config.kwargs[block] for config in configs) for block in bounds}
    return triton.autotune(configs=list(configs), key=key,
                           prune_configs_by={"early_config_prune": prune}, do_bench=bench)


class TileConfig(NamedTuple):
    """An autotune config of a kernel that tiles rows by BLOCK_M and keys (or tokens) by
    BLOCK_N."""

    block_m: int
    block_n: int
    warps: int
    stages: int

    def to_triton(self, **extra: int) -> triton.Config:
        """The ``triton.Config``; ``extra`` adds meta-parameters derived from the blocks."""
        return triton.Config({"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, **extra},
                             num_warps=self.warps, num_stages=self.stages)


def strides(name: str, stride: tuple[int, ...], axes: str) -> dict[str, int]:
    """A tensor's strides (``tensor.stride()``) as kernel keyword arguments: ``strides("q",
    q.stride(), "bhmd")`` is ``{"stride_qb": ..., "stride_qh": ..., "stride_qm": ...,
    "stride_qd": ...}``."""
    return {f"stride_{name}{axis}": value for axis, value in zip(axes, stride, strict=True)}


# CUDA's grid limits: 2^31 - 1 programs along x, 65,535 along y and z.
GRID_X_MAX = 2**31 - 1
GRID_YZ_MAX = 65_535


def tile_grid(rows: int, tiles: int, *, x_max: int = GRID_X_MAX) -> tuple[int, int]:
    """The launch grid of ``rows * tiles`` programs (rows: samples, or (sample, head) pairs;
    tiles: the blocks of one row), which :func:`program_tile` reads back.

    The programs are numbered row-major, the tiles of a row consecutive, and laid along x: CUDA
    starts programs in x-then-y order, so programs that run together share their row's K and V
    in L2. x holds up to 2^31 - 1 programs; only a larger count continues along y, whose last
    grid row is partial: its spare programs fall past the last row, and the kernels skip them.
    (Rows along y, tiles along x, would fail to launch past 65,535 rows: B = 8192 with H = 8.)
    ``x_max`` is CUDA's limit; a smaller one lets a test reach the y axis with a few programs.
    """
    total = rows * tiles
    if total <= x_max:
        return total, 1
    height = cdiv(total, x_max)
    if height > GRID_YZ_MAX:
        raise ValueError(f"{rows} x {tiles} programs do not fit in a CUDA grid")
    return cdiv(total, height), height


def tiles_grid(rows: int, size: int, block: str):
    """The grid of an autotuned kernel with one program per row and tile of its ``block``
    meta-parameter (say "BLOCK_M") over ``size``."""
    return lambda meta: tile_grid(rows, cdiv(size, meta[block]))


@triton.jit
def program_tile(NUM_TILES):
    """(row, tile) of this program in a :func:`tile_grid` of NUM_TILES tiles per row: the row as
    int64 (a (sample, head) pair indexes int64 bases), the tile as int32. A row past the last
    one is a spare program of the grid's partial last y row."""
    linear = tl.program_id(1).to(tl.int64) * tl.num_programs(0) + tl.program_id(0)
    return linear // NUM_TILES, (linear % NUM_TILES).to(tl.int32)


@triton.jit
def head_tile(H, NUM_TILES):
    """:func:`program_tile` for rows that are (sample, head) pairs of H heads a sample: the
    sample, the head, the pair's row index (all int64), and the tile."""
    bh, tile = program_tile(NUM_TILES)
    return bh // H, bh % H, bh, tile


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
def tile_offsets(rows, stride_row, cols, stride_col):
    """int64 element offsets of the (rows, cols) tile of a matrix with these strides.

    The indices are widened before the products: a row index times its stride passes 2^31 in a
    sequence-first layout (L, B, H, d) viewed as (B, H, L, d), whose row stride is B * H * d,
    and Triton passes strides below 2^31 as int32."""
    return (rows.to(tl.int64)[:, None] * stride_row
            + cols.to(tl.int64)[None, :] * stride_col)


@triton.jit
def load_tile(base, rows, row_ok, stride_row, offs_col, stride_col, COLS: tl.constexpr):
    """The (rows, offs_col) tile at ``base``: zero outside ``row_ok`` and the first COLS columns,
    cast to fp32 under the interpreter (its ``tl.dot``, see above). Inlined by Triton, so a load
    in a loop is still software-pipelined."""
    tile = tl.load(base + tile_offsets(rows, stride_row, offs_col, stride_col),
                   mask=row_ok[:, None] & (offs_col[None, :] < COLS), other=0.0)
    if INTERPRET_C:
        tile = tile.to(tl.float32)
    return tile


# Flag rows (the valid tokens, the query pool) that are all set are not materialized: the host
# passes None, which Triton compiles as a constant, so such a call fills no (B, L) tensor first.
# A kernel offsets such a pointer to its row under `if FLAGS is not None` in its own body: a
# jit function cannot return None on every Triton version (3.6 cannot).
# Bool tensors go to the kernels as they are: Triton reads and writes a bool pointer as bytes
# (int8), so no uint8 view is needed, which would cost two tensor ops per flags argument.
def flags_arg(flags: torch.Tensor | None) -> torch.Tensor | None:
    """A (B, n) bool flags tensor as the kernels read it (contiguous), or None (all set)."""
    return None if flags is None else flags.contiguous()


@triton.jit
def load_flags(FLAGS, offs, ok):
    """The flags at ``offs`` where ``ok`` (False elsewhere); all set for a None row."""
    if FLAGS is None:
        return ok
    else:
        return tl.load(FLAGS + offs, mask=ok, other=0) != 0


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
