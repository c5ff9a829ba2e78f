"""Token scores of the self-guided mask without the (B, H, Q, L) attention matrix, in one launch.

score[b, j] = sum over the chosen rows i of A[b, i, j], where A is the softmax over tokens of
S = scale * q.k (padding at -inf), mixed over heads: the mean over heads, or under "random" the
plan's head of row i mod H (floor modulo, so any int32 draw names a head). Only the k_q chosen
rows of each sample matter (the plan picks them), and the softmax runs over the token axis, so
every chosen row needs its full log-sum-exp before any of its probabilities is known.

A unit is a (head, block of BLOCK_M chosen rows) pair of a sample; one program per unit does
all of it (but see "Memory" below):

1. The sample's plan: its valid token range and counts, and its chosen rows by the radix search
   of select.py over the plan's query ranks (:func:`~.select.mask_counts`,
   :func:`~.select.chosen_threshold`; under ``mask_self`` the pool is ``query_pool`` & valid,
   taken as it is read). Every program of a sample repeats this; it reads the
   sample's (L,) valid flags and (Q,) ranks a few times, next to the two loops over (L, d) keys
   below. The program then lists its unit's block r of head h: the chosen rows in index order
   (under "random" only those of plan head h, so that each (row, head) pair the mix uses is
   computed exactly once and "random" costs 1/H of "mean"), rows [r * BLOCK_M,
   (r + 1) * BLOCK_M) of that list. The sample's first program (of head 0 and block 0) also
   writes what the selection needs: the counts, and the chosen rows (the forced tokens of
   ``mask_self``).
2. Loop 1 over the keys: the running maximum m and running sum l = sum exp(S - m) of its rows,
   so lse = m + log(l), as in the FlashAttention forward (no V, no output), and which rows have
   a non-finite logit (below). Invalid tokens are at S = -inf, which takes the flags of the
   tile's tokens, a load and a select per logit. A sample whose valid tokens are contiguous, as
   padding on either side or none leaves them, needs them only on its first and last tile: the
   tiles between run a copy of the loop body without flags (in the sm_90 build 306 warp
   instructions per tile of 64 x 64 instead of 426). A sample with a hole reads them on every
   tile, and so does every sample above head blocks of 128, where the copy spilled registers.
   The tiles run in the same order either way, so the lse is the same.
3. Loop 2 over the keys: P = exp(S - lse), summed over its rows into one (L,) row of column
   partials, a (B, NUM_PARTIALS, L) fp32 buffer: each program writes its own row, no atomics.
   The tile is computed transposed, S^T = K Q^T. A tensor-core tile's rows are split over the
   warps and its columns lie within each warp, so the sum over query rows of a Q K^T tile
   would cross warps, through shared memory and a barrier on every tile; over the columns of
   S^T it runs in registers and a few shuffles.

The selection kernel (select.py) adds a sample's partial rows in row order and weights the sum
(1/H for "mean", 1 for "random"). One program per (sample, head) would be simpler, but the
pixel workload has one sample of 8 heads and 256 chosen rows: row blocks give it 32 programs
instead of 8, and a head's K tiles stay in L2 for its blocks.

Memory. A partial row per unit would cost H * ROW_BLOCKS rows of L per sample, which grows
with k_q, so with L under self-attention: O(L^2) per sample. So a sample has at most
NUM_PARTIALS = min(H * ROW_BLOCKS, MAX_PARTIALS) rows, one program each, and where units
outnumber them (ACCUMULATE) the program of row p runs units p, p + NUM_PARTIALS, ... in turn,
adding each unit's column sums to the ones before in its row (a load and a store per column,
the program's own row). MAX_PARTIALS = 128 rows are 512 bytes a token, O(B * L) in all. The
workloads of bench/README.md have at most 48 units a sample and never accumulate: their
kernel is the one-unit code, compiled without the loop over units.

Determinism. The fp32 order of every sum here is fixed by the config: BLOCK_N sets the tiles of
the lse's running sum, BLOCK_M and num_warps the reduction tree of the column sums over rows
(and the tensor-core instruction of the dots), and NUM_PARTIALS which units share a row. So the
kernel is not autotuned: :func:`score_config` and :func:`partial_rows` are fixed functions of
the shape and the arguments (never of timing, the batch size or the process), and the
selection's own config changes no bit. The same inputs give the same mask bits
in every process, on one GPU model and Triton version.

Non-finite inputs. A (sample, head, chosen row) whose fp32 logits scale * q.k over the sample's
valid tokens are not all finite (a NaN or infinite q or valid k, or a product that overflows)
contributes nothing. Padded keys are loaded as 0, whatever k holds there, so S is 0 at padding
unless q is not finite, and then every valid logit of the row is not finite either. Loop 1 sums
S * 0 over its tiles, element by element (one multiply-add per logit, reduced once after the
loop): 0 for a finite logit, NaN for any other, so a NaN sum flags the row. Such a row, and a
row of a sample without valid tokens, is dead: loop 2 gives it q = 0 and lse = +inf, so its
probabilities are exactly 0, since its S = 0 * k is finite (a non-finite valid k makes every
row's logit there non-finite, so the whole block is dead and skips loop 2). BLOCK_ROWS counts
the live rows summed into each partial row, and the selection adds only partial rows with
some, at valid columns only (the padding columns of a partial row hold values nobody reads).
So the scores are finite at every valid token.

Work: k_q * L * d multiply-adds per sample and loop under "random", H times that under "mean",
a fraction k_q / Q of one attention pass; memory is the partials, NUM_PARTIALS rows of L fp32
per sample, where ROW_BLOCKS covers the most chosen rows a sample of this shape can have.
Logits are scale * q.k in natural units, the fp32 values the rule tests, and exponentials are
exp2((S - m) * log2 e), so no libdevice is needed. (Folding log2 e into the scale, as
attention.py does, would overflow fp32 for finite logits above FLT_MAX / log2 e.) Both loops
stream keys only between the sample's first and last valid token, with no branch in the loop
body, so their K loads are software-pipelined (see attention.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..plan import MaskPlan
from ._common import (
    INTERPRET_C,
    LOG2E_C,
    META_FIRST_C,
    META_LAST_C,
    META_RANDOM_C,
    META_TOP_C,
    META_WIDTH,
    META_WIDTH_C,
    WIDE_HEAD_BLOCK,
    WIDE_HEAD_BLOCK_C,
    TileConfig,
    block_dim,
    cdiv,
    dot_precision,
    flags_arg,
    load_flags,
    load_tile,
    next_power_of_2,
    opaque,
    program_tile,
    rounded_product,
    strides,
    tile_grid,
)
from .launch import Static, launch, static_builder
from .select import (
    chosen_in_block,
    chosen_threshold,
    float_bits,
    mask_counts,
    plan_heads,
    row_strided,
    select_from_partials,
    token_range,
)

# Every config :func:`score_config` can return. They differ in BLOCK_M only: 16 (the smallest
# tl.dot) for the few rows of a head under "random" or of a short sequence, 64 for many.
CANDIDATE_CONFIGS = tuple(TileConfig(block_m, 64, warps=4, stages=3) for block_m in (16, 32, 64))


# Partial rows of column sums per sample at most: 512 bytes a token, the size of a bf16 key of
# H * d = 256, so the scores' memory is O(B * L) at any number of chosen rows. Not a function of
# the batch size (it sets the summation order); 128 programs fill an H100 or H200 at B = 1.
MAX_PARTIALS = 128


def num_row_blocks(max_rows: int, block_m: int) -> int:
    """The blocks of ``block_m`` rows that hold a head's chosen rows, for at most ``max_rows``."""
    return max(1, cdiv(max_rows, block_m))


def partial_rows(heads: int, row_blocks: int, max_partials: int = MAX_PARTIALS) -> int:
    """The partial rows per sample for ``heads * row_blocks`` units (a block of a head's chosen
    rows): one each, or units p, p + R, ... summed into row p of R = ``max_partials``."""
    if max_partials < 1:
        raise ValueError(f"max_partials must be at least 1, got {max_partials}")
    return min(heads * row_blocks, max_partials)


def max_chosen_rows(num_q: int, num_k: int, ratio: float, num_per_query: int) -> int:
    """The most chosen rows a sample of this shape can have: plan.mask_counts's k_q for a sample
    whose num_k tokens are all valid (k_q grows with the valid count, and float64 rounding is
    monotone), at most num_q."""
    return min(num_q, max(1, round(num_k * ratio / num_per_query)))


def score_config(rows_per_head: int, max_block_m: int = 64) -> TileConfig:
    """The score kernel's config for at most ``rows_per_head`` chosen rows per (sample, head)
    (k_q under "mean", k_q / H under "random" on average) and blocks of at most ``max_block_m``
    rows: a fixed function of the shape, since it sets the summation order (see the module
    docstring)."""
    block_m = min(max_block_m, max(16, next_power_of_2(rows_per_head)))
    return next(config for config in CANDIDATE_CONFIGS if config.block_m == block_m)


def accumulating_block_m(head_dim: int) -> int:
    """The largest BLOCK_M of a kernel that sums several units into a partial row: both loops'
    precomputed values stay live across the loop over units, and at head dims above 128 a block
    of 64 rows spilled registers on sm_90 (``tests/test_triton_sm90.py``)."""
    return 32 if block_dim(head_dim) > WIDE_HEAD_BLOCK else 64


def default_score_config(max_rows: int, heads: int, head_mix: str, head_dim: int,
                         max_partials: int = MAX_PARTIALS) -> TileConfig:
    """The config the score kernel takes for at most ``max_rows`` chosen rows per sample (see
    :func:`max_chosen_rows`), each head's share of them under "random", at ``head_dim``."""
    rows_per_head = cdiv(max_rows, heads) if head_mix == "random" else max_rows
    config = score_config(rows_per_head)
    blocks = num_row_blocks(max_rows, config.block_m)
    if partial_rows(heads, blocks, max_partials) < heads * blocks:  # units share partial rows
        config = score_config(rows_per_head, accumulating_block_m(head_dim))
    return config


@triton.jit
def _lse_step(q, k_base, valid_row, start_n, m_i, l_i, non_finite, stride_kn, stride_kd, scale,
              NK, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
              PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """Loop 1's running (m, l, non_finite) after the key tile at ``start_n``. Its invalid tokens
    are -inf; a tile not MASKED has none, and reads no flags and selects nothing."""
    cols = start_n + tl.arange(0, BLOCK_N)
    if MASKED:
        valid = load_flags(valid_row, cols, cols < NK)
    else:
        valid = tl.full([BLOCK_N], True, tl.int1)
    k = load_tile(k_base, cols, valid, stride_kn, tl.arange(0, BLOCK_D), stride_kd, D)
    s = rounded_product(tl.dot(q, tl.trans(k), input_precision=PRECISION), scale)
    non_finite += s * 0.0
    if MASKED:
        s = tl.where(valid[None, :], s, float("-inf"))
    # A row with a non-finite logit may compute NaN here: it is dead below.
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp2((s - m_new[:, None]) * LOG2E_C)
    l_i = l_i * tl.exp2((m_i - m_new) * LOG2E_C) + tl.sum(p, axis=1)
    return m_new, l_i, non_finite


@triton.jit
def _chosen_row_scores_kernel(
    Q, K, VALID, POOL, QUERY_RANK, HEAD, CHOSEN, META, PARTIALS, BLOCK_ROWS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_rank, stride_head,
    B, H, NQ, NK, ROW_BLOCKS, NUM_PARTIALS, scale, ratio_bits, num_per_query, noise_bits,
    D: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ROWS_FROM_PLAN: tl.constexpr, MASK_SELF: tl.constexpr, GROUP_BY_HEAD: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    RADIX_BITS: tl.constexpr, SWEEP: tl.constexpr, LIST_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """PARTIALS[b, p] = the column sums of the probabilities of the units p, p + NUM_PARTIALS,
    ... < H * ROW_BLOCKS, unit u being block u % ROW_BLOCKS of head u // ROW_BLOCKS's chosen rows,
    and BLOCK_ROWS[b, p] their live rows (0: row not written). More than one unit per partial
    row (ACCUMULATE) only where H * ROW_BLOCKS exceeds NUM_PARTIALS. Rows from the plan
    (ROWS_FROM_PLAN; CHOSEN and META are then written), else from CHOSEN."""
    # One program per (sample, partial row); the sample is int64.
    b, partial = program_tile(NUM_PARTIALS)
    if b < B:  # the grid's partial last row of programs (see tile_grid) has nothing to do
        valid_row, pool_row = VALID, POOL  # None: every token valid, every row in the pool
        if VALID is not None:
            valid_row += b * NK
        if POOL is not None:
            pool_row += b * NQ
        rank_row = QUERY_RANK + b * stride_rank
        head_row = HEAD + b * stride_head
        chosen_row = CHOSEN + b * NQ
        partial_row = PARTIALS + (b * NUM_PARTIALS + partial) * NK
        n, first, last = token_range(valid_row, NK, SWEEP)
        t = tl.zeros((), tl.int32)
        ties = tl.zeros((), tl.int32)
        if ROWS_FROM_PLAN:
            num_top, num_random, k_q = mask_counts(n, pool_row, valid_row, NQ, ratio_bits,
                                                   num_per_query, noise_bits, MASK_SELF, SWEEP)
            t, ties = chosen_threshold(pool_row, valid_row, rank_row, NQ, k_q, MASK_SELF, SWEEP,
                                       RADIX_BITS)
            if partial == 0:  # the program that records the sample's plan
                meta = META + b * META_WIDTH_C
                tl.store(meta + META_TOP_C, num_top)
                tl.store(meta + META_RANDOM_C, num_random)
                tl.store(meta + META_FIRST_C, first)
                tl.store(meta + META_LAST_C, last)

        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        slots = tl.arange(0, BLOCK_M)
        offs_l = tl.arange(0, LIST_BLOCK)
        # Only the tiles from the first to the last valid token: no branch in the loop bodies,
        # so the K loads are prefetched (see attention.py).
        sample_key_start = (first // BLOCK_N) * BLOCK_N
        num_live = tl.zeros((), tl.int32)  # rows added to the partial row so far
        # A loop of one constant trip when not ACCUMULATE, which the compiler removes. Only
        # the loops over the keys inside are software-pipelined (num_stages=1 says so here;
        # the Triton 3.9 build is the same without it).
        num_units = tl.cdiv(H * ROW_BLOCKS - partial, NUM_PARTIALS) if ACCUMULATE else 1
        for unit_step in tl.range(num_units, num_stages=1):
            unit = partial + unit_step * NUM_PARTIALS
            # The tiles' offsets follow from key_start, the same in every unit: hoisted out of
            # the loop over units, those of both loops would stay live across both (spills at
            # head dims from 128 on sm_90), so each unit takes it anew.
            key_start = opaque(sample_key_start) if ACCUMULATE else sample_key_start
            key_tiles = tl.cdiv(tl.maximum(last - key_start, 0), BLOCK_N)
            h = (unit // ROW_BLOCKS).to(tl.int64)
            r = unit % ROW_BLOCKS

            # The unit's rows: slots [r * BLOCK_M, (r + 1) * BLOCK_M) of head h's list of
            # chosen rows in index order, gathered by a (LIST_BLOCK, BLOCK_M) match per block.
            rows = tl.zeros([BLOCK_M], tl.int32)
            listed = tl.zeros((), tl.int32) - r * BLOCK_M  # the list's entries before the unit
            ties_before = tl.zeros((), tl.int32)
            for start in range(0, NQ, LIST_BLOCK):
                candidates = start + offs_l
                if ROWS_FROM_PLAN:
                    member, ties_before = chosen_in_block(pool_row, valid_row, rank_row,
                                                          candidates, NQ, t, ties, ties_before,
                                                          MASK_SELF)
                    if unit == 0:  # the sample's chosen rows, written once
                        tl.store(chosen_row + candidates, member.to(tl.uint8),
                                 mask=candidates < NQ)
                else:
                    member = tl.load(chosen_row + candidates, mask=candidates < NQ, other=0) != 0
                if GROUP_BY_HEAD:
                    member = member & (plan_heads(head_row, candidates, NQ, H) == h)
                count = member.to(tl.int32)
                slot = listed + tl.cumsum(count, axis=0) - count
                hit = member[:, None] & (slot[:, None] == slots[None, :])
                rows += tl.sum(tl.where(hit, candidates[:, None], 0), axis=0)
                listed += tl.sum(count, axis=0)
            num_rows = tl.minimum(tl.maximum(listed, 0), BLOCK_M)

            if num_rows > 0:
                row_ok = slots < num_rows
                q = load_tile(Q + b * stride_qb + h * stride_qh, rows, row_ok, stride_qm, offs_d,
                              stride_qd, D)
                k_base = K + b * stride_kb + h * stride_kh

                # Loop 1: lse of the rows, over the tiles in order. Where the sample's valid
                # tokens are contiguous, the tiles from inner_start to inner_end hold valid
                # tokens only and read no flags: all but a first tile that starts before the
                # first valid token and a last one that ends past the last. Otherwise every
                # tile is read as one that may hold invalid tokens.
                m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
                l_i = tl.zeros([BLOCK_M], tl.float32)
                # S * 0 per logit, reduced after the loop: NaN for a row with a non-finite logit.
                non_finite = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                inner_end = key_start
                # Above head blocks of 128 the second copy spilled registers on sm_90 (Triton
                # 3.6, d = 256): there every tile reads the flags.
                if BLOCK_D <= WIDE_HEAD_BLOCK_C:
                    inner_start = key_start
                    if n == last - first:
                        inner_start += tl.where(first > key_start, BLOCK_N, 0)
                        inner_end = tl.maximum(inner_start, last - last % BLOCK_N)
                    if inner_start > key_start:
                        m_i, l_i, non_finite = _lse_step(
                            q, k_base, valid_row, key_start, m_i, l_i, non_finite, stride_kn,
                            stride_kd, scale, NK, D, BLOCK_D, BLOCK_N, PRECISION, MASKED=True)
                    for start_n in range(inner_start, inner_end, BLOCK_N):
                        m_i, l_i, non_finite = _lse_step(
                            q, k_base, valid_row, start_n, m_i, l_i, non_finite, stride_kn,
                            stride_kd, scale, NK, D, BLOCK_D, BLOCK_N, PRECISION, MASKED=False)
                for start_n in range(inner_end, last, BLOCK_N):
                    m_i, l_i, non_finite = _lse_step(
                        q, k_base, valid_row, start_n, m_i, l_i, non_finite, stride_kn,
                        stride_kd, scale, NK, D, BLOCK_D, BLOCK_N, PRECISION, MASKED=True)
                # Live rows: in the block, with finite logits (an ordered == is false for NaN,
                # under any fast-math flags), and with valid tokens.
                live = row_ok & (l_i > 0.0) & (tl.sum(non_finite, axis=1) == 0.0)
                unit_live = tl.sum(live.to(tl.int32), axis=0)

                if unit_live > 0:
                    # Loop 2: the column sums of P = exp(S - lse) over the rows, as S^T = K Q^T
                    # (see the module docstring), on the same tiles from the last to the first.
                    # Dead rows get q = 0 and lse = +inf: their P is exactly 0. In loop 1's order
                    # the compiler shares loop 2's prefetch of the first tiles (their pointers
                    # and masks) with loop 1's, which keeps them live across all of loop 1: more
                    # registers (140 instead of 76 at d = 128 on sm_90), and ptxas spilled some
                    # of them. Backwards, loop 2 also starts on the tiles loop 1 read last, in L2.
                    lse = tl.where(live, m_i + tl.log2(tl.where(live, l_i, 1.0)) / LOG2E_C,
                                   float("inf"))
                    q = tl.where(live[:, None], q, 0.0)
                    q_t = tl.trans(q)
                    if ACCUMULATE:
                        # The partial row's earlier sums, stored by other threads of this
                        # program: a barrier orders their stores before these loads. Columns
                        # below summed_to hold them: all, or none before the first live unit.
                        tl.debug_barrier()
                        summed_to = tl.where(num_live > 0, NK, 0)
                    for start_n in range(key_start + (key_tiles - 1) * BLOCK_N,
                                         key_start - BLOCK_N, -BLOCK_N):
                        cols = start_n + offs_n
                        valid = load_flags(valid_row, cols, cols < NK)
                        k = load_tile(k_base, cols, valid, stride_kn, offs_d, stride_kd, D)
                        # The very logits of loop 1, bit for bit, or P = exp(S - lse) is off by
                        # a factor exp(difference): the product rounded on its own, and under
                        # the interpreter loop 1's orientation (docs/design.md, "Kernels").
                        if INTERPRET_C:
                            s_t = tl.trans(tl.dot(q, tl.trans(k), input_precision=PRECISION))
                        else:
                            s_t = tl.dot(k, q_t, input_precision=PRECISION)
                        s_t = rounded_product(s_t, scale)
                        # At most 0: P <= 1 even where the two dots round a sum apart (16-bit
                        # inputs below BLOCK_M = 64 take two kinds of MMA, see the design).
                        p_t = tl.exp2(tl.minimum(s_t - lse[None, :], 0.0) * LOG2E_C)
                        column_sums = tl.sum(p_t, axis=1)
                        if ACCUMULATE:
                            # 0 before the first: its sums are stored as they are.
                            column_sums += tl.load(partial_row + cols, mask=cols < summed_to,
                                                   other=0.0)
                        tl.store(partial_row + cols, column_sums, mask=cols < NK)
                    num_live += unit_live
        tl.store(BLOCK_ROWS + b * NUM_PARTIALS + partial, num_live)


class RowScores(NamedTuple):
    """What the score kernel hands to the selection (:func:`.select.select_from_partials`)."""

    partials: torch.Tensor  # (B, R, L) fp32 column partials, R = partial_rows(H, row blocks)
    block_rows: torch.Tensor  # (B, R) int32 live rows summed into each (0: not written)
    head_weight: float  # 1/H under "mean", 1 under "random"
    chosen: torch.Tensor  # (B, Q) bool chosen rows (written only when they come from a plan)
    meta: torch.Tensor  # (B, META_WIDTH) int32 counts and valid range (the same)


def _launch(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None,
            pool: torch.Tensor | None,
            query_rank: torch.Tensor, head: torch.Tensor, chosen: torch.Tensor, *, max_rows: int,
            head_mix: str, scale: float, config: TileConfig | None, rows_from_plan: bool,
            mask_self: bool, ratio: float, num_per_query: int, noise: float,
            max_partials: int) -> RowScores:
    batch, heads = q.shape[:2]
    num_k = k.shape[2]
    if config is None:
        config = default_score_config(max_rows, heads, head_mix, q.shape[3], max_partials)
    blocks = num_row_blocks(max_rows, config.block_m)
    num_partials = partial_rows(heads, blocks, max_partials)
    partials = torch.empty((batch, num_partials, num_k), dtype=torch.float32, device=q.device)
    block_rows = torch.empty((batch, num_partials), dtype=torch.int32, device=q.device)
    meta = torch.empty((batch, META_WIDTH), dtype=torch.int32, device=q.device)
    query_rank, head = row_strided(query_rank), row_strided(head)
    launch(_chosen_row_scores_kernel,
           _score_static(q.shape, num_k, q.stride(), k.stride(), query_rank.stride(0),
                         head.stride(0), q.dtype, scale, head_mix == "random", config, blocks,
                         num_partials, rows_from_plan, mask_self, ratio, num_per_query, noise),
           Q=q, K=k, VALID=flags_arg(valid), POOL=flags_arg(pool), QUERY_RANK=query_rank,
           HEAD=head, CHOSEN=chosen, META=meta, PARTIALS=partials,
           BLOCK_ROWS=block_rows)
    return RowScores(partials, block_rows, 1.0 if head_mix == "random" else 1.0 / heads, chosen,
                     meta)


@static_builder
def _score_static(q_shape: tuple[int, ...], num_k: int, q_strides: tuple[int, ...],
                  k_strides: tuple[int, ...], rank_stride: int, head_stride: int,
                  dtype: torch.dtype, scale: float, group_by_head: bool, config: TileConfig,
                  row_blocks: int, num_partials: int, rows_from_plan: bool, mask_self: bool,
                  ratio: float, num_per_query: int, noise: float) -> Static:
    batch, heads, num_q, dim = q_shape
    return Static(tile_grid(batch, num_partials), {
        **strides("q", q_strides, "bhmd"), **strides("k", k_strides, "bhnd"),
        "stride_rank": rank_stride, "stride_head": head_stride, "B": batch, "H": heads,
        "NQ": num_q, "NK": num_k, "ROW_BLOCKS": row_blocks, "NUM_PARTIALS": num_partials,
        "scale": scale,
        "ratio_bits": float_bits(ratio), "num_per_query": num_per_query,
        "noise_bits": float_bits(noise), "D": dim, "BLOCK_D": block_dim(dim),
        "PRECISION": dot_precision(dtype),
        "ROWS_FROM_PLAN": rows_from_plan, "MASK_SELF": mask_self,
        "GROUP_BY_HEAD": group_by_head, "ACCUMULATE": num_partials < heads * row_blocks,
        "RADIX_BITS": 4,
        "SWEEP": min(512, next_power_of_2(max(num_q, num_k))), "LIST_BLOCK": 32,
        "BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "num_warps": config.warps,
        "num_stages": config.stages})


def chosen_row_scores(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None,
                      query_pool: torch.Tensor | None, plan: MaskPlan, *, ratio: float,
                      num_per_query: int, mask_self: bool, noise: float, head_mix: str,
                      scale: float, config: TileConfig | None = None,
                      max_partials: int = MAX_PARTIALS) -> RowScores:
    """The mask's first launch: the counts and chosen rows of the plan, and the column partials
    of the token scores. ``valid`` and ``query_pool`` are the backends' arguments (None: every
    token, every row; the pool intersected with ``valid`` in-kernel under ``mask_self``),
    ``plan.head`` any int32 (read mod H). ``config`` replaces :func:`score_config`'s, and
    ``max_partials`` :data:`MAX_PARTIALS` (tests)."""
    chosen = torch.empty((q.shape[0], q.shape[2]), dtype=torch.bool, device=q.device)
    return _launch(
        q, k, valid, query_pool, plan.query_rank, plan.head, chosen,
        max_rows=max_chosen_rows(q.shape[2], k.shape[2], ratio, num_per_query),
        head_mix=head_mix, scale=scale, config=config, rows_from_plan=True, mask_self=mask_self,
        ratio=ratio, num_per_query=num_per_query, noise=noise, max_partials=max_partials)


def token_scores(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, chosen: torch.Tensor,
                 head: torch.Tensor, *, head_mix: str, scale: float,
                 config: TileConfig | None = None,
                 max_partials: int = MAX_PARTIALS) -> torch.Tensor:
    """(B, L) fp32: :func:`sma_kernels.reference.token_scores` (same arguments) from the score
    kernel and the selection kernel's reduction, with the rows given by ``chosen`` (B, Q) bool
    instead of a plan, and nothing selected."""
    rows = _launch(q, k, valid, valid, head, head, chosen.contiguous(), max_rows=q.shape[2],
                   head_mix=head_mix, scale=scale, config=config, rows_from_plan=False,
                   mask_self=False, ratio=0.0, num_per_query=1, noise=0.0,
                   max_partials=max_partials)
    no_picks = torch.zeros_like(rows.meta)
    _, scores = select_from_partials(rows.partials, rows.block_rows, rows.head_weight, valid,
                                     None, no_picks, torch.zeros_like(valid, dtype=torch.int32))
    return scores
