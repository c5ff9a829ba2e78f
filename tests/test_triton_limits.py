"""Limits a GPU enforces and the interpreter does not: CUDA's grid size per axis, int32 offset
arithmetic, and the register file at wide head dims. No GPU needed.

The interpreter runs any grid, so a grid that CUDA refuses to launch (more than 65,535 programs
along y or z) passes every interpreter test. Here each launcher's grid is computed for
B * H = 2^20 (a HIGGS batch of 8192 samples with 8 heads is 2^16) without running a kernel, and
the mapping from a grid to its (row, tile) programs is run in the interpreter with a small
stand-in for the x limit, so that it reaches the y axis with a few programs.

An offset that passes 2^31 elements needs a tensor of that size, too large for a test, so the
offset helper of the kernels is run on its own with indices and strides whose products pass
2^31. The fused op itself runs at the longest row the library promises, L = 131,072.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, import_triton_backend

import sma_kernels as sk
from sma_kernels.testing import assert_attention_close_to_fp64, assert_masks_match, padded_valid

triton_backend = import_triton_backend()

import triton
import triton.language as tl

from sma_kernels.triton import attention as attention_kernels
from sma_kernels.triton import kept_keys as kept_key_kernels
from sma_kernels.triton import short_sequence
from sma_kernels.triton._common import (
    GRID_X_MAX,
    GRID_YZ_MAX,
    program_tile,
    tile_grid,
    tile_offsets,
)


def assert_launchable(grid: tuple[int, ...], programs: int) -> None:
    """The grid fits CUDA's limits and has at least ``programs`` programs, at most one spare
    per y row."""
    x, y = grid
    assert 0 <= x <= GRID_X_MAX and 1 <= y <= GRID_YZ_MAX, grid
    assert programs <= x * y < programs + y, (grid, programs)


@pytest.mark.parametrize("rows", [1, 7, 65_535, 65_536, 8192 * 8, 2**20, 2**24, 2**31 - 1])
@pytest.mark.parametrize("tiles", [1, 2, 28, 2304, 65_535])
def test_grid_fits_cuda_limits(rows, tiles):
    assert_launchable(tile_grid(rows, tiles), rows * tiles)


def test_grid_stays_on_x_while_it_fits():
    # One row of programs, numbered (row, tile) row-major: the tiles of a row run together.
    assert tile_grid(8192 * 8, 28) == (8192 * 8 * 28, 1)
    assert tile_grid(1, GRID_X_MAX) == (GRID_X_MAX, 1)
    assert tile_grid(0, 5) == (0, 1)  # nothing to launch


def test_grid_too_large_for_cuda():
    with pytest.raises(ValueError, match="do not fit"):
        tile_grid(GRID_X_MAX, GRID_YZ_MAX + 1)


class RecordedKernel:
    """Stands in for a kernel: records its launch grid, that of each GPU config when it is
    autotuned (``configs``), with the config's meta-parameters."""

    def __init__(self, configs=None):
        self.configs = configs
        self.grids = []

    def __getitem__(self, grid):
        def launch(**kwargs):
            if self.configs is None:
                self.grids.append((grid, {}))
            else:
                self.grids += [(grid(config.kwargs), config.kwargs) for config in self.configs]
        return launch


def expanded(*shape, dtype=torch.float16):
    """A tensor of this shape without memory per element."""
    return torch.zeros((1,) * len(shape), dtype=dtype, device=DEVICE).expand(*shape)


def test_launch_grids_fit_cuda_limits_at_a_million_heads(monkeypatch):
    batch, heads, num_q, length, dim = 2**17, 8, 1, 1, 16
    # Per autotuned kernel: its GPU configs, and the rows and the size its grid tiles by which
    # block.
    kernels = {
        "_attention_fwd_kernel": (attention_kernels, attention_kernels._FWD_CONFIGS,
                                  batch * heads, num_q, "BLOCK_M"),
        "_attention_bwd_dkdv_kernel": (attention_kernels, attention_kernels._DKDV_CONFIGS,
                                       batch * heads, length, "BLOCK_N"),
        "_attention_bwd_dq_kernel": (attention_kernels, attention_kernels._DQ_CONFIGS,
                                     batch * heads, num_q, "BLOCK_M")}
    # Kernels with a fixed grid: how many programs each must have. The kept-key order, before
    # the forward and again before the backward: one program per sample.
    fixed = {"_kept_keys_kernel": (kept_key_kernels, batch)}
    recorded = {}
    for name, (module, configs, *_) in kernels.items():
        recorded[name] = RecordedKernel(configs)
        monkeypatch.setattr(module, name, recorded[name])
    for name, (module, _) in fixed.items():
        recorded[name] = RecordedKernel()
        monkeypatch.setattr(module, name, recorded[name])

    q = expanded(batch, heads, num_q, dim)
    k = v = expanded(batch, heads, length, dim)
    keep = expanded(batch, length, dtype=torch.bool)
    out, lse = triton_backend.attention_forward(q, k, v, keep, scale=0.25)
    triton_backend.attention_backward(out, q, k, v, keep, out, lse, scale=0.25)

    for name, (_, configs, rows, size, block) in kernels.items():
        grids = recorded[name].grids
        assert len(grids) == len(configs), f"{name} not launched once"
        for grid, config in grids:
            assert_launchable(grid, rows * -(-size // config[block]))
    for name, (_, programs) in fixed.items():
        assert len(recorded[name].grids) == 2, f"{name} not launched twice"
        for grid, _ in recorded[name].grids:
            assert_launchable((*grid, 1)[:2], programs)


def test_short_sequence_grids_fit_cuda_limits_at_a_million_heads(monkeypatch):
    # The short-sequence kernels: one program per sample forward, per (sample, head) backward.
    batch, heads, length, dim = 2**17, 8, 1, 16
    recorded = {name: RecordedKernel()
                for name in ("_short_sequence_kernel", "_short_sequence_bwd_kernel")}
    for name, kernel in recorded.items():
        monkeypatch.setattr(short_sequence, name, kernel)
    q = k = v = expanded(batch, heads, length, dim)
    valid = expanded(batch, length, dtype=torch.bool)
    plan = sk.MaskPlan(*(expanded(batch, length, dtype=torch.int32) for _ in range(3)))
    out, lse, _, order, kept = triton_backend.self_guided_attention_forward(
        q, k, v, valid, valid, plan, ratio=0.5, num_per_query=1, head_mix="mean",
        mask_self=False, noise=0.0, scale=0.25)
    triton_backend.ordered_attention_backward(out, q, k, v, order, kept, out, lse, scale=0.25)
    for name, programs in (("_short_sequence_kernel", batch),
                           ("_short_sequence_bwd_kernel", batch * heads)):
        ((grid, _),) = recorded[name].grids
        assert_launchable((*grid, 1)[:2], programs)


@triton.jit
def _count_programs(COUNTS, NUM_ROWS, NUM_TILES):
    row, tile = program_tile(NUM_TILES)
    if row < NUM_ROWS:
        tl.atomic_add(COUNTS + row * NUM_TILES + tile, 1)


@pytest.mark.parametrize(("rows", "tiles", "x_max"),
                         [(4, 4, 100), (5, 3, 4), (7, 1, 3), (1, 10, 3), (3, 5, 7)])
def test_every_row_and_tile_gets_one_program(rows, tiles, x_max):
    grid = tile_grid(rows, tiles, x_max=x_max)
    assert grid[0] <= x_max
    counts = torch.zeros((rows, tiles), dtype=torch.int32, device=DEVICE)
    _count_programs[grid](COUNTS=counts, NUM_ROWS=rows, NUM_TILES=tiles)
    assert torch.equal(counts.cpu(), torch.ones(rows, tiles, dtype=torch.int32))


@triton.jit
def _offsets(OUT, ROWS, stride_row, stride_col, NUM_ROWS: tl.constexpr,
             NUM_COLS: tl.constexpr):
    rows = tl.load(ROWS + tl.arange(0, NUM_ROWS))
    cols = tl.arange(0, NUM_COLS)
    tl.store(OUT + tl.arange(0, NUM_ROWS)[:, None] * NUM_COLS + cols[None, :],
             tile_offsets(rows, stride_row, cols, stride_col))


@pytest.mark.parametrize(("stride_row", "stride_col"), [(8 * 8 * 32 * 128, 1), (1, 2**28)])
def test_tile_offsets_are_64_bit(stride_row, stride_col):
    # A sequence-first (L, B, H, d) tensor viewed as (B, H, L, d): the row stride is B * H * d
    # (here B = 128 pixel images), so row 36,863 of a pixel sample sits 9.7e9 elements in.
    # Both strides fit int32, as Triton passes them; the products do not.
    rows = torch.tensor([0, 1, 20_000, 36_863], dtype=torch.int32)
    num_cols = 16
    out = torch.empty((rows.numel(), num_cols), dtype=torch.int64, device=DEVICE)
    _offsets[(1,)](OUT=out, ROWS=rows.to(DEVICE), stride_row=stride_row, stride_col=stride_col,
                   NUM_ROWS=rows.numel(), NUM_COLS=num_cols)
    want = (rows.long()[:, None] * stride_row
            + torch.arange(num_cols, dtype=torch.int64)[None, :] * stride_col)
    assert want.max() >= 2**31  # the case int32 arithmetic would get wrong
    assert torch.equal(out.cpu(), want)


def test_wide_head_dims_autotune_over_the_first_config_only(monkeypatch):
    # Above WIDE_HEAD_BLOCK the larger tiles spill registers on sm_90 (test_triton_sm90.py
    # compiles them), so the autotuner a GPU builds keeps the first, smallest one.
    from sma_kernels.triton import _common

    monkeypatch.setattr(_common, "INTERPRET", False)
    monkeypatch.setattr(_common, "AUTOTUNE", True)
    configs = attention_kernels._FWD_CONFIGS
    tuner = _common.autotune(configs, None, key=attention_kernels._KEY,
                             bounds=attention_kernels._BOUNDS)(attention_kernels._attention_fwd_kernel.fn)
    prune = tuner.early_config_prune
    sizes = {"NQ": 4096, "NK": 4096}
    wide = 2 * _common.WIDE_HEAD_BLOCK
    assert prune(configs, {}, **sizes, BLOCK_D=_common.WIDE_HEAD_BLOCK, BLOCK_DV=64) == configs
    for blocks in ({"BLOCK_D": wide, "BLOCK_DV": 64}, {"BLOCK_D": 32, "BLOCK_DV": wide}):
        assert prune(configs, {}, **sizes, **blocks) == configs[:1]


def test_fused_op_at_the_longest_row():
    # L = 2^17 = 131,072 tokens, past every block of the kernels many times over, with K and V
    # in a sequence-first layout (any strides): the mask is the reference's up to near-ties,
    # the output and gradients meet the fp64 rule.
    g = torch.Generator().manual_seed(17)
    batch, heads, num_q, length, dim = 1, 2, 8, 2**17, 16
    q = torch.randn(batch, heads, num_q, dim, generator=g)
    k, v = (torch.randn(length, batch, heads, dim, generator=g).permute(1, 2, 0, 3)
            for _ in range(2))
    grad_out = torch.randn(batch, heads, num_q, dim, generator=g)
    valid = padded_valid(batch, length, g)
    plan = sk.make_plan(batch, num_q, length, heads, generator=g)
    options = {"ratio": 0.3, "num_per_query": 2, "head_mix": "random", "mask_self": False,
               "noise": 0.2, "plan": plan.to(DEVICE)}
    leaves = [x.to(DEVICE).requires_grad_() for x in (q, k, v)]
    out, mask = sk.self_guided_attention(*leaves, valid.to(DEVICE), backend="triton", **options)
    out.backward(grad_out.to(DEVICE))
    reference_options = {**options, "plan": plan}
    want_mask = sk.self_guided_mask(q, k, valid, backend="reference", **reference_options)
    assert_masks_match(mask.cpu(), want_mask, q, k, valid, **reference_options)

    got = [x.cpu() for x in (out.detach(), *(leaf.grad for leaf in leaves))]
    assert_attention_close_to_fp64(got, q, k, v, grad_out, valid & ~mask.cpu(), scale=dim ** -0.5,
                                   atol=1e-6)
