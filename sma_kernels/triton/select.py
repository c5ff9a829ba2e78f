"""Selection of the masked tokens per sample, without a sort.

One program per sample builds its (L,) mask in three steps, in the reference's order:

1. Forced tokens: under ``mask_self`` the chosen query tokens are always masked.
2. Top scores: the ``num_top`` largest scores among the valid, not forced tokens, ties to the
   lower index. Scores are fp32 and non-negative here, but the search works for any fp32: the
   bits x of a float map to an int32 key that sorts like the float (x for x >= 0, x ^ 0x7FFFFFFF
   for negative x, which reverses the order of the negative range). The threshold t, the
   ``num_top``-th largest key, is the largest t with count(key >= t) >= num_top. It is found by a
   radix search over the 32 bits, RADIX_BITS at a time: keep a prefix ``lo`` with
   count(key >= lo) >= num_top; for the next digit count, in one sweep over the row, the keys
   >= lo + c * 2^shift for every digit value c at once (a (BLOCK, 2^RADIX_BITS) comparison), and
   move lo to the largest c whose count still reaches num_top. 32 / RADIX_BITS sweeps later lo is
   t. Then every key > t is taken, and of the keys == t the first (num_top - count(key > t)) by
   index, using an exclusive prefix count (cumsum) carried across the row's blocks.
3. Random picks (curriculum noise): the ``num_random`` free valid tokens with the smallest plan
   ``token_rank``: the same search on key = ~rank (which reverses the order of every int32),
   and the same tie rule (equal ranks go to the lower index).

The same search picks the chosen query rows in ``_prepare_kernel``, the first launch of the fused
mask: per sample it computes the counts of :func:`sma_kernels.plan.mask_counts` (in float64,
rounding half-to-even, exactly as the plan does), takes the k_q pool rows with the smallest
query rank (key = ~rank, ties to the lower index) and lists them for the score kernels, grouped by plan head under
``head_mix="random"`` (see mask_scores.py).

Rows longer than BLOCK are swept block by block, so any L works (L = 36,864 is the pixel
workload); each sweep re-reads the row from global memory (L2-resident at these sizes), and the
running state is a few scalars, so memory stays O(L) per sample. The mask is built in place in
the output: step 3 reads the tokens steps 1-2 wrote, after a barrier.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..plan import MaskCounts
from ._common import (
    META_FIRST_C,
    META_LAST_C,
    META_RANDOM,
    META_RANDOM_C,
    META_TOP,
    META_TOP_C,
    META_WIDTH,
    META_WIDTH_C,
    autotune,
    next_power_of_2,
)


class SelectConfig(NamedTuple):
    """An autotune config of the selection: BLOCK tokens per sweep step, and the warps."""

    block: int
    warps: int

    def to_triton(self) -> triton.Config:
        return triton.Config({"BLOCK": self.block}, num_warps=self.warps)


_CONFIGS = [config.to_triton() for config in [
    SelectConfig(512, warps=4), SelectConfig(1024, warps=4), SelectConfig(2048, warps=8),
    SelectConfig(4096, warps=16)]]
_INTERPRET_CONFIG = SelectConfig(4096, warps=4).to_triton()
_KEY = ["NK_BUCKET"]
_BOUNDS = {"BLOCK": "NK"}


@triton.jit
def _block_keys(SCORES, VALID, FORCED, TAKEN, RANK, base, offs, NK, STAGE: tl.constexpr,
                HAS_FORCED: tl.constexpr):
    """Order-preserving int32 keys of one block, and which of its entries may be picked.

    STAGE 0: query rows of the pool (VALID) by smallest rank; 1: top scores among the valid, not
    forced tokens; 2: random picks among the valid tokens not taken yet, by smallest rank.
    """
    in_row = offs < NK
    eligible = tl.load(VALID + base + offs, mask=in_row, other=0) != 0
    if STAGE == 1:
        if HAS_FORCED:
            eligible = eligible & (tl.load(FORCED + base + offs, mask=in_row, other=0) == 0)
        bits = tl.load(SCORES + base + offs, mask=in_row, other=0.0).to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    else:  # smallest rank = largest key: ~rank reverses the order of every int32
        if STAGE == 2:
            eligible = eligible & (tl.load(TAKEN + base + offs, mask=in_row, other=1) == 0)
        key = ~tl.load(RANK + base + offs, mask=in_row, other=0)
    return key, eligible


@triton.jit
def _count_above(SCORES, VALID, FORCED, TAKEN, RANK, base, NK, t, STAGE: tl.constexpr,
                 HAS_FORCED: tl.constexpr, BLOCK: tl.constexpr):
    """count(eligible & key > t) over the row."""
    offs = tl.arange(0, BLOCK)
    above = tl.zeros((), tl.int32)
    for start in range(0, NK, BLOCK):
        key, eligible = _block_keys(SCORES, VALID, FORCED, TAKEN, RANK, base, start + offs, NK, STAGE,
                                    HAS_FORCED)
        above += tl.sum((eligible & (key > t)).to(tl.int32), axis=0)
    return above


@triton.jit
def _take_block(key, eligible, t, ties, ties_before):
    """The entries of one block among the ``need`` largest (key, -index) of the row: every key
    above the threshold t, and of the keys equal to t the first ``ties`` by index (``ties_before``
    of them sit in earlier blocks). Returns them and the new ``ties_before``."""
    tie = (eligible & (key == t)).to(tl.int32)
    tie_rank = ties_before + tl.cumsum(tie, axis=0) - tie  # exclusive prefix count
    take = eligible & ((key > t) | ((tie != 0) & (tie_rank < ties)))
    return take, ties_before + tl.sum(tie, axis=0)


@triton.jit
def _kth_largest_key(SCORES, VALID, FORCED, TAKEN, RANK, base, NK, need, STAGE: tl.constexpr,
                     HAS_FORCED: tl.constexpr, BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr):
    """The largest int32 t with count(eligible & key >= t) >= need (need >= 1)."""
    offs = tl.arange(0, BLOCK)
    digits = tl.arange(0, 1 << RADIX_BITS).to(tl.int64)
    lo = tl.full((), -2147483648, tl.int64)  # invariant: count(key >= lo) >= need
    # A runtime loop, not static_range: unrolling 8 sweeps of a loop over the row multiplies
    # the compile time for nothing (each sweep is bound by its row sweep, not by loop overhead).
    for sweep in range(32 // RADIX_BITS):
        shift = tl.full((), 32, tl.int64) - (sweep + 1) * RADIX_BITS
        # lo + c * 2^shift stays inside int32 for every digit: lo's low `shift` bits are 0 and
        # the search interval [lo, lo + 2^(shift + RADIX_BITS)) lies in the int32 range.
        cand = (lo + (digits << shift)).to(tl.int32)
        counts = tl.zeros([1 << RADIX_BITS], tl.int32)
        for start in range(0, NK, BLOCK):
            key, eligible = _block_keys(SCORES, VALID, FORCED, TAKEN, RANK, base, start + offs,
                                        NK, STAGE, HAS_FORCED)
            hit = eligible[:, None] & (key[:, None] >= cand[None, :])
            counts += tl.sum(hit.to(tl.int32), axis=0)
        # counts fall as c grows and counts[0] >= need, so the digit is #(counts >= need) - 1.
        digit = tl.sum((counts >= need).to(tl.int32), axis=0) - 1
        lo = lo + (digit.to(tl.int64) << shift)
    return lo.to(tl.int32)


@triton.jit
def _round_half_even(x):
    """Round a non-negative fp64 scalar half-to-even (torch.round's rule), as int64."""
    whole = x.to(tl.int64)  # truncation is floor for x >= 0
    frac = x - whole.to(tl.float64)
    up = (frac > 0.5) | ((frac == 0.5) & ((whole % 2) == 1))
    return whole + up.to(tl.int64)


@triton.jit
def _prepare_kernel(VALID, POOL, QUERY_RANK, HEAD, ROWS, SEGMENTS, CHOSEN, META, H, NQ, NK,
                    ratio_bits, num_per_query, noise_bits, MASK_SELF: tl.constexpr,
                    GROUP_BY_HEAD: tl.constexpr, RADIX_BITS: tl.constexpr, BLOCK: tl.constexpr):
    """Per sample: the counts of plan.mask_counts, the chosen rows of plan.chosen_rows (as a
    bool row mask and as a table of their indices with each head's segment of it), and the
    valid token range."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    n = tl.zeros((), tl.int32)
    first = tl.zeros((), tl.int32) + NK
    last = tl.zeros((), tl.int32)
    for start in range(0, NK, BLOCK):
        cols = start + offs
        valid = tl.load(VALID + b * NK + cols, mask=cols < NK, other=0) != 0
        n += tl.sum(valid.to(tl.int32), axis=0)
        first = tl.minimum(first, tl.min(tl.where(valid, cols, NK), axis=0))
        last = tl.maximum(last, tl.max(tl.where(valid, cols + 1, 0), axis=0))
    pool = tl.zeros((), tl.int32)
    for start in range(0, NQ, BLOCK):
        rows = start + offs
        pool += tl.sum((tl.load(POOL + b * NQ + rows, mask=rows < NQ, other=0) != 0)
                       .to(tl.int32), axis=0)

    # plan.mask_counts, in float64 like it (the ratios arrive as their float64 bit patterns:
    # a Python float kernel argument would be rounded to fp32).
    ratio = (ratio_bits + tl.zeros((), tl.int64)).to(tl.float64, bitcast=True)
    noise = (noise_bits + tl.zeros((), tl.int64)).to(tl.float64, bitcast=True)
    n_float = n.to(tl.float64)
    n64 = n.to(tl.int64)
    k = tl.maximum(tl.minimum(tl.maximum(_round_half_even(n_float * ratio), 1), n64 - 1), 0)
    k_q = tl.minimum(tl.maximum(_round_half_even(n_float * ratio / num_per_query), 1),
                     pool.to(tl.int64))
    forced = tl.zeros((), tl.int64)
    if MASK_SELF:
        k_q = tl.minimum(k_q, k)
        forced = k_q
    k_rand = _round_half_even((k - forced).to(tl.float64) * noise)

    # plan.chosen_rows: the k_q pool rows with the smallest (query rank, index).
    t = tl.full((), 2147483647, tl.int32)  # k_q = 0: nothing is above it, and no ties are taken
    if k_q > 0:
        t = _kth_largest_key(VALID, POOL, VALID, VALID, QUERY_RANK, b * NQ, NQ, k_q, 0, False,
                             BLOCK, RADIX_BITS)
    ties = k_q.to(tl.int32) - _count_above(VALID, POOL, VALID, VALID, QUERY_RANK, b * NQ, NQ, t, 0,
                                           False, BLOCK)
    ties_before = tl.zeros((), tl.int32)
    for start in range(0, NQ, BLOCK):
        rows = start + offs
        key, eligible = _block_keys(VALID, POOL, VALID, VALID, QUERY_RANK, b * NQ, rows, NQ, 0,
                                    False)
        take, ties_before = _take_block(key, eligible, t, ties, ties_before)
        tl.store(CHOSEN + b * NQ + rows, take.to(tl.uint8), mask=rows < NQ)
    # The table lists them in row order, under GROUP_BY_HEAD grouped by plan head first (one
    # group per head, one sweep each): the score kernels then compute each head only for its
    # own rows. Otherwise one group that every head reads. It reads back the rows this program
    # just chose.
    tl.debug_barrier()
    listed = tl.zeros((), tl.int32)
    for group in range(H if GROUP_BY_HEAD else 1):
        group_start = listed
        for start in range(0, NQ, BLOCK):
            rows = start + offs
            member = tl.load(CHOSEN + b * NQ + rows, mask=rows < NQ, other=0) != 0
            if GROUP_BY_HEAD:
                row_head = tl.load(HEAD + b * NQ + rows, mask=rows < NQ, other=-1)
                member = member & (row_head == group)
            position = listed + tl.cumsum(member.to(tl.int32), axis=0) - member.to(tl.int32)
            tl.store(ROWS + b * NQ + position, rows, mask=member)
            listed += tl.sum(member.to(tl.int32), axis=0)
        if GROUP_BY_HEAD:
            tl.store(SEGMENTS + (b * H + group) * 2, group_start)
            tl.store(SEGMENTS + (b * H + group) * 2 + 1, listed)
    if not GROUP_BY_HEAD:
        for head in range(H):
            tl.store(SEGMENTS + (b * H + head) * 2, 0)
            tl.store(SEGMENTS + (b * H + head) * 2 + 1, listed)

    meta = META + b * META_WIDTH_C
    tl.store(meta + META_TOP_C, (k - forced - k_rand).to(tl.int32))
    tl.store(meta + META_RANDOM_C, k_rand.to(tl.int32))
    tl.store(meta + META_FIRST_C, first)
    tl.store(meta + META_LAST_C, last)


@autotune(_CONFIGS, _INTERPRET_CONFIG, key=_KEY, bounds=_BOUNDS)
@triton.jit(do_not_specialize=["NK_BUCKET"])
def _select_kernel(SCORES, VALID, FORCED, RANK, META, OUT, NK, NK_BUCKET, HAS_FORCED: tl.constexpr,
                   RADIX_BITS: tl.constexpr, BLOCK: tl.constexpr):
    """The mask of sample program_id(0); NK_BUCKET is the autotuning key (see _common.py)."""
    b = tl.program_id(0).to(tl.int64)
    base = b * NK
    offs = tl.arange(0, BLOCK)

    # Steps 1-2: forced tokens and the top scores.
    num_top = tl.load(META + b * META_WIDTH_C + META_TOP_C)
    t = tl.full((), 2147483647, tl.int32)  # with num_top = 0 nothing is taken (ties = 0)
    if num_top > 0:
        t = _kth_largest_key(SCORES, VALID, FORCED, OUT, RANK, base, NK, num_top, 1, HAS_FORCED,
                             BLOCK, RADIX_BITS)
    # How many of the keys equal to t are taken, lowest index first.
    ties = num_top - _count_above(SCORES, VALID, FORCED, OUT, RANK, base, NK, t, 1, HAS_FORCED, BLOCK)
    ties_before = tl.zeros((), tl.int32)
    for start in range(0, NK, BLOCK):
        cols = start + offs
        key, eligible = _block_keys(SCORES, VALID, FORCED, OUT, RANK, base, cols, NK, 1,
                                    HAS_FORCED)
        take, ties_before = _take_block(key, eligible, t, ties, ties_before)
        if HAS_FORCED:
            take = take | (tl.load(FORCED + base + cols, mask=cols < NK, other=0) != 0)
        tl.store(OUT + base + cols, take.to(tl.uint8), mask=cols < NK)

    # Step 3 reads what every thread of this program wrote above.
    tl.debug_barrier()
    num_random = tl.load(META + b * META_WIDTH_C + META_RANDOM_C)
    if num_random > 0:
        t_rand = _kth_largest_key(SCORES, VALID, FORCED, OUT, RANK, base, NK, num_random, 2,
                                  HAS_FORCED, BLOCK, RADIX_BITS)
        ties = num_random - _count_above(SCORES, VALID, FORCED, OUT, RANK, base, NK, t_rand, 2,
                                         HAS_FORCED, BLOCK)
        # The count above reads OUT as it is before this sweep writes it.
        tl.debug_barrier()
        ties_before = tl.zeros((), tl.int32)
        for start in range(0, NK, BLOCK):
            cols = start + offs
            key, eligible = _block_keys(SCORES, VALID, FORCED, OUT, RANK, base, cols, NK, 2,
                                        HAS_FORCED)
            take, ties_before = _take_block(key, eligible, t_rand, ties, ties_before)
            # Only free tokens are written, so no block reads a value another block of this
            # sweep changed.
            tl.store(OUT + base + cols, tl.full([BLOCK], 1, tl.uint8), mask=(cols < NK) & take)


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def prepare(valid: torch.Tensor, query_pool: torch.Tensor, query_rank: torch.Tensor,
            head: torch.Tensor, *, ratio: float, num_per_query: int, mask_self: bool, noise: float,
            num_heads: int, head_mix: str
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One launch for :func:`sma_kernels.plan.mask_counts` and :func:`~sma_kernels.plan.chosen_rows`.

    Returns ``rows`` (B, Q) int32, the table of each sample's chosen row indices (entries past
    k_q are unspecified), ``segments`` (B, num_heads, 2) int32, the [start, end) of the table
    that each head's scores read, ``chosen`` (B, Q) bool and the (B, META_WIDTH) int32 metadata.
    Under ``head_mix="random"`` the table is grouped by the plan's ``head`` (ascending within a
    group) and head h's segment is its own group; under "mean" every segment is [0, k_q).
    """
    batch, num_k = valid.shape
    num_q = query_pool.shape[1]
    device = valid.device
    rows = torch.empty((batch, num_q), dtype=torch.int32, device=device)
    segments = torch.empty((batch, num_heads, 2), dtype=torch.int32, device=device)
    chosen = torch.empty((batch, num_q), dtype=torch.bool, device=device)
    meta = torch.empty((batch, META_WIDTH), dtype=torch.int32, device=device)
    block = min(1024, next_power_of_2(max(num_q, num_k)))
    _prepare_kernel[(batch,)](  # one program per sample
        VALID=valid.contiguous().view(torch.uint8),
        POOL=query_pool.contiguous().view(torch.uint8), QUERY_RANK=query_rank.contiguous(),
        HEAD=head.contiguous(), ROWS=rows, SEGMENTS=segments, CHOSEN=chosen.view(torch.uint8),
        META=meta, H=num_heads, NQ=num_q, NK=num_k, ratio_bits=_float_bits(ratio),
        num_per_query=num_per_query, noise_bits=_float_bits(noise), MASK_SELF=mask_self,
        GROUP_BY_HEAD=head_mix == "random", RADIX_BITS=4, BLOCK=block, num_warps=4)
    return rows, segments, chosen, meta


def select_with_meta(scores: torch.Tensor, valid: torch.Tensor, forced: torch.Tensor | None,
                     meta: torch.Tensor, token_rank: torch.Tensor) -> torch.Tensor:
    """(B, L) bool mask from the scores; counts from ``meta`` (see :func:`prepare`)."""
    batch, num_k = scores.shape
    out = torch.empty((batch, num_k), dtype=torch.bool, device=scores.device)
    valid_u8 = valid.contiguous().view(torch.uint8)
    forced_u8 = valid_u8 if forced is None else forced.contiguous().view(torch.uint8)
    _select_kernel[(batch,)](  # one program per sample
        SCORES=scores.contiguous(), VALID=valid_u8, FORCED=forced_u8,
        RANK=token_rank.contiguous(), META=meta, OUT=out.view(torch.uint8), NK=num_k,
        NK_BUCKET=next_power_of_2(num_k), HAS_FORCED=forced is not None, RADIX_BITS=4)
    return out


def select_tokens(scores: torch.Tensor, valid: torch.Tensor, forced: torch.Tensor,
                  counts: MaskCounts, token_rank: torch.Tensor) -> torch.Tensor:
    """(B, L) bool mask: :func:`sma_kernels.reference.select_tokens` (same arguments) in-kernel.

    ``forced`` (B, L) bool is always masked; ``counts`` gives each sample's ``num_top`` and
    ``num_random``; ``token_rank`` (B, L) int32 is the plan's random order.
    """
    meta = torch.zeros((scores.shape[0], META_WIDTH), dtype=torch.int32, device=scores.device)
    meta[:, META_TOP] = counts.num_top
    meta[:, META_RANDOM] = counts.num_random
    return select_with_meta(scores.float(), valid, forced, meta, token_rank.to(torch.int32))
