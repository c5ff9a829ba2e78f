"""The Triton mask is deterministic by construction: the same inputs give the same mask bits
under every config of its kernels and in every process (docs/design.md, "Kernels").

What may change bits and what may not (sma_kernels/triton/mask_scores.py and select.py):

* The score kernel's config (BLOCK_M, BLOCK_N, warps) sets the fp32 summation order of the
  log-sum-exp and of the column partials, and so does the number of partial rows that the row
  blocks share (``partial_rows``), so neither is autotuned: both are fixed functions of the
  shape. Every candidate config, with a partial row per block or with a few shared, must still
  give the reference's mask up to float near-ties, and exact ties must go to the lower index
  under each.
* The selection kernel adds the partials of each token in row order whatever its BLOCK, and the
  rest is integer work, so its configs (autotuned) must give the same score and mask bits.
* Two fresh processes must give the same bits (on a GPU each autotunes the selection anew),
  on the general path and on the short-sequence kernel (short_sequence.py, whose config is a
  fixed function of the shape; tests/test_triton_short_sequence.py checks its ties).

Inputs plant ties: q and k hold multiples of 1/2, so every logit is exact in fp32 and tokens
with equal keys have bit-equal scores (exact ties), and other tokens repeat a key up to a few
ulps of one coordinate (near-ties, which a different summation order may flip).
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import DEVICE, import_triton_backend

import sma_kernels as sk
from sma_kernels.plan import default_query_pool
from sma_kernels.testing import assert_masks_match, padded_valid

triton_backend = import_triton_backend()

from sma_kernels.triton import mask_scores, select
from sma_kernels.triton._common import GRID_X_MAX, GRID_YZ_MAX, cdiv
from sma_kernels.triton.mask_scores import (
    CANDIDATE_CONFIGS,
    MAX_PARTIALS,
    chosen_row_scores,
    default_score_config,
    max_chosen_rows,
    partial_rows,
    score_config,
)
from sma_kernels.triton.select import select_from_partials

SCALE = 0.25


def planted_ties(batch, heads, num_q, length, dim, seed):
    """q, k (fp32), valid and a plan with exact and near-tied token keys (module docstring)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (batch, heads, num_q, dim), generator=g).float() / 2
    distinct = torch.randint(-2, 3, (batch, heads, length // 8, dim), generator=g).float() / 2
    # Every token repeats one of length / 8 keys: exact ties everywhere.
    which = torch.randint(length // 8, (batch, 1, length, 1), generator=g)
    k = distinct.gather(2, which.expand(-1, heads, -1, dim))
    # A third of them moves one coordinate by a few ulps: near-ties.
    near = (torch.rand(batch, 1, length, 1, generator=g) < 0.3).float()
    ulps = torch.randint(1, 4, (batch, 1, length, 1), generator=g).float() * 2.0 ** -22
    k[..., :1] += near * ulps
    valid = padded_valid(batch, length, g)
    plan = sk.make_plan(batch, num_q, length, heads, generator=g)
    return q.to(DEVICE), k.to(DEVICE), valid.to(DEVICE), plan.to(DEVICE)


# (head_mix, mask_self, noise); mask_self makes it self-attention (Q = L).
SETUPS = {"cross-mean": ("mean", False, 0.0), "self-random-noise": ("random", True, 0.3)}
BATCH, HEADS, LENGTH, DIM, RATIO, NPQ = 3, 2, 600, 16, 0.3, 2
SHORT = 96  # a length of the short-sequence path


def setup_inputs(setup, length=LENGTH):
    head_mix, mask_self, noise = SETUPS[setup]
    num_q = length if mask_self else 40
    q, k, valid, plan = planted_ties(BATCH, HEADS, num_q, length, DIM, seed=len(setup))
    pool = default_query_pool(valid, num_q, valid if mask_self else None, mask_self)
    kwargs = {"ratio": RATIO, "num_per_query": NPQ, "mask_self": mask_self, "noise": noise,
              "head_mix": head_mix, "scale": SCALE}
    return q, k, valid, pool, plan, kwargs


def triton_mask(q, k, valid, pool, plan, kwargs, *, score=None, selection=None,
                max_partials=MAX_PARTIALS):
    """The backend's two launches, with these configs forced (None: the backend's own)."""
    rows = chosen_row_scores(q, k, valid, pool, plan, **kwargs, config=score,
                             max_partials=max_partials)
    return select_from_partials(rows.partials, rows.block_rows, rows.head_weight, valid,
                                rows.chosen if kwargs["mask_self"] else None, rows.meta,
                                plan.token_rank, config=selection)


def assert_exact_ties_to_lower_index(mask, scores, valid, forced):
    """Among free tokens with bit-equal scores, the ones taken are the lowest indices."""
    for b in range(mask.shape[0]):
        free = (valid[b] & ~forced[b]).nonzero().flatten().tolist()
        by_score = {}
        for j in free:
            by_score.setdefault(scores[b, j].view(torch.int32).item(), []).append(j)
        for tied in by_score.values():
            taken = mask[b, tied].tolist()
            assert taken == sorted(taken, reverse=True), f"sample {b}: ties {tied} took {taken}"


@pytest.mark.parametrize("setup", SETUPS)
def test_every_score_config_gives_the_reference_mask(setup):
    q, k, valid, pool, plan, kwargs = setup_inputs(setup)
    public = {"ratio": RATIO, "num_per_query": NPQ, "head_mix": kwargs["head_mix"],
              "mask_self": kwargs["mask_self"], "noise": kwargs["noise"], "scale": SCALE,
              "plan": plan}
    want = sk.self_guided_mask(q, k, valid, backend="reference", **public)
    # At most 3 partial rows: 1 to 4 units (head, row block) sum into each (none shared in
    # cross-mean at BLOCK_M = 64, 2 units).
    for config, max_partials in itertools.product(CANDIDATE_CONFIGS, (MAX_PARTIALS, 3)):
        mask, scores = triton_mask(q, k, valid, pool, plan, kwargs, score=config,
                                   max_partials=max_partials)
        assert_masks_match(mask, want, q, k, valid, **public)
        # Exact ties are exact under every summation order; noise 0 keeps the check to the
        # top-score step (random picks ignore scores).
        if kwargs["noise"] == 0.0:
            assert_exact_ties_to_lower_index(mask.cpu(), scores.cpu(), valid.cpu(),
                                             torch.zeros_like(valid.cpu()))


@pytest.mark.parametrize("setup", SETUPS)
def test_every_select_config_gives_the_same_bits(setup):
    q, k, valid, pool, plan, kwargs = setup_inputs(setup)
    rows = chosen_row_scores(q, k, valid, pool, plan, **kwargs)
    forced = rows.chosen if kwargs["mask_self"] else None
    results = [select_from_partials(rows.partials, rows.block_rows, rows.head_weight, valid,
                                    forced, rows.meta, plan.token_rank, config=config)
               for config in (*select.CONFIGS, None)]  # None: the autotuned (interpreter) one
    first_mask, first_scores = results[0]
    assert first_mask.sum() > 0
    for mask, scores in results[1:]:
        assert torch.equal(scores.view(torch.int32), first_scores.view(torch.int32))
        assert torch.equal(mask, first_mask)


def test_default_score_config_is_the_shapes_and_ignores_the_batch():
    q, k, valid, pool, plan, kwargs = setup_inputs("cross-mean")
    max_rows = max_chosen_rows(q.shape[2], k.shape[2], RATIO, NPQ)
    mask, scores = triton_mask(q, k, valid, pool, plan, kwargs)
    forced_mask, forced_scores = triton_mask(q, k, valid, pool, plan, kwargs,
                                             score=score_config(max_rows))
    assert torch.equal(scores.view(torch.int32), forced_scores.view(torch.int32))
    assert torch.equal(mask, forced_mask)
    # A sample's bits do not depend on the other samples of its batch.
    alone = sk.MaskPlan(*(field[:1] for field in plan))
    mask_one, scores_one = triton_mask(q[:1], k[:1], valid[:1], pool[:1], alone, kwargs)
    assert torch.equal(scores_one.view(torch.int32), scores[:1].view(torch.int32))
    assert torch.equal(mask_one, mask[:1])


def test_partial_rows_needs_one():
    assert partial_rows(8, 77) == MAX_PARTIALS and partial_rows(8, 4) == 32
    with pytest.raises(ValueError, match="max_partials"):
        partial_rows(8, 4, 0)


def test_accumulating_kernel_takes_smaller_row_blocks_at_wide_heads():
    # 8 heads, mean, self-attention at L = 131,072 (4915 chosen rows): 77 blocks of 64 rows a
    # head, 616 units, more than MAX_PARTIALS, so units share partial rows; above d = 128 that
    # kernel takes blocks of 32 rows (tests/test_triton_sm90.py compiles it spill-free).
    max_rows = max_chosen_rows(131_072, 131_072, 0.15, 4)
    assert 8 * cdiv(max_rows, 64) > MAX_PARTIALS
    assert [default_score_config(max_rows, 8, "mean", dim).block_m for dim in (64, 128, 256)] \
        == [64, 64, 32]
    # A partial row per unit (the pixel workload's 32) keeps 64 at every head dim.
    assert default_score_config(256, 8, "mean", 256).block_m == 64


_FRESH_PROCESS = textwrap.dedent("""
    import hashlib, sys
    sys.path[:0] = {paths!r}
    import torch
    from sma_kernels.triton.short_sequence import short_sequence_attention
    from test_triton_determinism import SETUPS, SHORT, setup_inputs, triton_mask
    for setup in SETUPS:
        results = {{"general": triton_mask(*setup_inputs(setup))}}
        q, k, valid, pool, plan, kwargs = setup_inputs(setup, SHORT)
        results["short"] = short_sequence_attention(q, k, None, valid, pool, plan, **kwargs)[:2]
        for path, (mask, scores) in results.items():
            digest = hashlib.sha256(mask.cpu().numpy().tobytes() + scores.cpu().numpy().tobytes())
            print(setup, path, digest.hexdigest())
""")


def test_fresh_processes_give_the_same_bits():
    tests = Path(__file__).resolve().parent
    script = _FRESH_PROCESS.format(paths=[str(tests)])
    outputs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=900, check=False, cwd=tests.parent)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs.append(done.stdout)
    assert outputs[0] == outputs[1]
    assert len(outputs[0].splitlines()) == 2 * len(SETUPS)


class RecordedLaunch:
    """Stands in for a kernel: records the grid and arguments of each launch, runs nothing."""

    def __init__(self):
        self.grids, self.arguments = [], []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return lambda **kwargs: self.arguments.append(kwargs)


@pytest.mark.parametrize("head_mix", ["mean", "random"])
def test_mask_grids_fit_cuda_limits_past_two_billion_programs(monkeypatch, head_mix):
    # 2^26 samples of 16 heads (meta tensors: no memory) with up to 256 chosen rows: more score
    # programs than the x axis holds.
    batch, heads, num_q, length, dim = 2**26, 16, 256, 4096, 16
    score_kernel, select_kernel = RecordedLaunch(), RecordedLaunch()
    monkeypatch.setattr(mask_scores, "_chosen_row_scores_kernel", score_kernel)
    monkeypatch.setattr(select, "_select_kernel", select_kernel)
    q = torch.empty((batch, heads, num_q, dim), device="meta")
    k = torch.empty((batch, heads, length, dim), device="meta")
    valid = torch.empty((batch, length), dtype=torch.bool, device="meta")
    pool = torch.empty((batch, num_q), dtype=torch.bool, device="meta")
    ranks = torch.empty((batch, num_q), dtype=torch.int32, device="meta")
    plan = sk.MaskPlan(ranks, ranks, torch.empty((batch, length), dtype=torch.int32,
                                                 device="meta"))
    kwargs = {"ratio": 0.25, "num_per_query": 1, "mask_self": False, "noise": 0.0,
              "head_mix": head_mix, "scale": SCALE}
    triton_mask(q, k, valid, pool, plan, kwargs)
    (score_grid,), (select_grid,) = score_kernel.grids, select_kernel.grids
    max_rows = max_chosen_rows(num_q, length, 0.25, 1)
    rows_per_head = cdiv(max_rows, heads) if head_mix == "random" else max_rows
    units = heads * cdiv(max_rows, score_config(rows_per_head).block_m)  # 64, or 256 ("random")
    programs = batch * partial_rows(heads, units // heads)
    # O(L) memory a sample: at most MAX_PARTIALS partial rows, however many units.
    assert score_kernel.arguments[0]["PARTIALS"].shape == (batch, min(units, MAX_PARTIALS), length)
    x, y = score_grid
    assert programs > GRID_X_MAX
    assert x <= GRID_X_MAX and 1 < y <= GRID_YZ_MAX and programs <= x * y < programs + y
    assert select_grid == (batch,)
