"""Selection of the masked tokens per sample, without a sort, and the per-sample plan helpers of
the score kernel (mask_scores.py).

The mask's second launch, ``_select_kernel``, is one program per sample. It first reduces the
score kernel's column partials to the sample's (L,) token scores: per token, the partial rows
(one per (head, chosen-row block) unit, or a few units summed, see mask_scores.py) are added one
after the other in row order, then weighted
(1/H for ``head_mix="mean"``). That order is fixed by the partials' layout, not by BLOCK: each
token's sum is the same fp32 sequence under every config of this kernel, so its configs stay
autotuned without changing a bit. Rows whose units hold no live chosen row (none held, or all
had a non-finite logit) were never written and are skipped. Then it builds the
mask in three steps, in the reference's order:

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
4. For ``self_guided_attention``'s fused forward only (``WRITE_ORDER``): the kept-key order of
   keep = valid & ~mask for the attention kernels, the kept keys ascending then the dropped
   ones, and the number kept (``kept_key_order`` of kept_keys.py, reading the mask just built).

Steps 1-4 are the ``@triton.jit`` function :func:`select_row`, which the short-sequence kernel
(short_sequence.py) runs too, on the scores it computed itself.

The same search picks the chosen query rows inside the score kernel: :func:`mask_counts`
computes a sample's counts of :func:`sma_kernels.plan.mask_counts` (in float64, rounding
half-to-even, exactly as the plan does), :func:`chosen_threshold` and :func:`chosen_in_block`
take the k_q pool rows with the smallest query rank (key = ~rank, ties to the lower index).
Under ``mask_self`` the pool is the ``query_pool`` argument intersected with the valid tokens,
taken as the row is read (no separate op builds it).

Rows longer than BLOCK are swept block by block, so any L works (L = 36,864 is the pixel
workload); each sweep re-reads the row from global memory (L2-resident at these sizes), and the
running state is a few scalars, so memory stays O(L) per sample. The scores and the mask are
built in place in their outputs: each step reads what the previous one wrote, after a barrier.
The plan's rank rows may be strided (a plan is one draw split in three), so they are read
through their row stride and never copied.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..plan import MaskCounts
from ._common import (
    META_RANDOM,
    META_RANDOM_C,
    META_TOP,
    META_TOP_C,
    META_WIDTH,
    META_WIDTH_C,
    autotune,
    flags_arg,
    load_flags,
    next_power_of_2,
)
from .kept_keys import kept_key_order, order_chunk
from .launch import Static, launch, static_builder


def max_registers(num_warps: int) -> int | None:
    """The register cap given to ptxas for a block of ``num_warps`` warps: 255, all a thread may
    have, up to 8 warps; None above (the block's size bounds it). Uncapped, ptxas aimed at 64-80
    registers and, compiled by Triton 3.6, spilled the row offset that step 4 reads at the end
    (8-16 B at 4 and 8 warps); capped, it takes 104-186 and spills nothing. One program per
    sample: occupancy does not matter here."""
    return 255 if num_warps <= 8 else None


class SelectConfig(NamedTuple):
    """An autotune config of the selection: BLOCK tokens per sweep step, and the warps."""

    block: int
    warps: int

    def options(self) -> dict[str, int | None]:
        """The config as launch options of the kernel."""
        return {"BLOCK": self.block, "num_warps": self.warps,
                "maxnreg": max_registers(self.warps)}

    def to_triton(self) -> triton.Config:
        return triton.Config({"BLOCK": self.block}, num_warps=self.warps,
                             maxnreg=max_registers(self.warps))


# Their choice changes no bit of the scores or the mask (see the module docstring).
CONFIGS = (SelectConfig(512, warps=4), SelectConfig(1024, warps=4), SelectConfig(2048, warps=8),
           SelectConfig(4096, warps=16))
_CONFIGS = [config.to_triton() for config in CONFIGS]
_INTERPRET_CONFIG = SelectConfig(4096, warps=4).to_triton()
_KEY = ["NK_BUCKET"]
_BOUNDS = {"BLOCK": "NK"}


@triton.jit
def _block_keys(SCORES, VALID, FORCED, TAKEN, RANK, offs, N, STAGE: tl.constexpr,
                HAS_FORCED: tl.constexpr):
    """Order-preserving int32 keys of one block of a row (the pointers are at the row's first
    entry), and which of its entries may be picked.

    STAGE 0: query rows of the pool (VALID) by smallest rank, under HAS_FORCED (``mask_self``,
    where the chosen rows become the forced tokens) only those whose token is valid (FORCED
    points at the sample's valid row); 1: top scores among the valid, not forced tokens; 2:
    random picks among the valid tokens not taken yet, by smallest rank.
    """
    in_row = offs < N
    eligible = load_flags(VALID, offs, in_row)
    if STAGE == 1:
        if HAS_FORCED:
            eligible = eligible & (tl.load(FORCED + offs, mask=in_row, other=0) == 0)
        bits = tl.load(SCORES + offs, mask=in_row, other=0.0).to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    else:  # smallest rank = largest key: ~rank reverses the order of every int32
        if STAGE == 2:
            eligible = eligible & (tl.load(TAKEN + offs, mask=in_row, other=1) == 0)
        elif HAS_FORCED:  # STAGE 0 under mask_self: the pool rows whose token is valid
            eligible = eligible & load_flags(FORCED, offs, in_row)
        key = ~tl.load(RANK + offs, mask=in_row, other=0)
    return key, eligible


@triton.jit
def _count_above(SCORES, VALID, FORCED, TAKEN, RANK, N, t, STAGE: tl.constexpr,
                 HAS_FORCED: tl.constexpr, BLOCK: tl.constexpr):
    """count(eligible & key > t) over the row."""
    offs = tl.arange(0, BLOCK)
    above = tl.zeros((), tl.int32)
    for start in range(0, N, BLOCK):
        key, eligible = _block_keys(SCORES, VALID, FORCED, TAKEN, RANK, start + offs, N, STAGE,
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
def _kth_largest_key(SCORES, VALID, FORCED, TAKEN, RANK, N, need, STAGE: tl.constexpr,
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
        for start in range(0, N, BLOCK):
            key, eligible = _block_keys(SCORES, VALID, FORCED, TAKEN, RANK, start + offs, N,
                                        STAGE, HAS_FORCED)
            hit = eligible[:, None] & (key[:, None] >= cand[None, :])
            counts += tl.sum(hit.to(tl.int32), axis=0)
        # counts fall as c grows and counts[0] >= need, so the digit is #(counts >= need) - 1.
        digit = tl.sum((counts >= need).to(tl.int32), axis=0) - 1
        lo = lo + (digit.to(tl.int64) << shift)
    return lo.to(tl.int32)


@triton.jit
def _round_half_even(x):
    """Round a non-negative fp64 scalar half-to-even (torch.round's rule), as int64.

    By comparing x with whole + 1/2, not by x - whole: the compiler may fuse that subtraction
    with the product that made x into one FMA, which subtracts from the unrounded product, so
    405 * 0.3 (121.5 in fp64) would round down (Triton 3.6 on sm_90 does)."""
    whole = x.to(tl.int64)  # truncation is floor for x >= 0
    half = whole.to(tl.float64) + 0.5  # exact below 2^52
    up = (x > half) | ((x == half) & ((whole % 2) == 1))
    return whole + up.to(tl.int64)


@triton.jit
def token_range(VALID, NK, BLOCK: tl.constexpr):
    """(n, first, last) of one sample's valid row: its number of valid tokens, the first valid
    index and one past the last (NK and 0 without a valid token)."""
    offs = tl.arange(0, BLOCK)
    n = tl.zeros((), tl.int32)
    first = tl.zeros((), tl.int32) + NK
    last = tl.zeros((), tl.int32)
    for start in range(0, NK, BLOCK):
        cols = start + offs
        valid = load_flags(VALID, cols, cols < NK)
        n += tl.sum(valid.to(tl.int32), axis=0)
        first = tl.minimum(first, tl.min(tl.where(valid, cols, NK), axis=0))
        last = tl.maximum(last, tl.max(tl.where(valid, cols + 1, 0), axis=0))
    return n, first, last


@triton.jit
def mask_counts(n, POOL, VALID, NQ, ratio_bits, num_per_query, noise_bits,
                MASK_SELF: tl.constexpr, BLOCK: tl.constexpr):
    """One sample's counts of plan.mask_counts from its n valid tokens and its query pool row
    (under MASK_SELF only its entries whose VALID token is set): (num_top, num_random, k_q),
    int32. In float64 like the plan (the ratios arrive as their float64 bit patterns: a Python
    float kernel argument would be rounded to fp32)."""
    offs = tl.arange(0, BLOCK)
    pool = tl.zeros((), tl.int32)
    for start in range(0, NQ, BLOCK):
        rows = start + offs
        in_pool = load_flags(POOL, rows, rows < NQ)
        if MASK_SELF:
            in_pool = in_pool & load_flags(VALID, rows, rows < NQ)
        pool += tl.sum(in_pool.to(tl.int32), axis=0)
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
    return (k - forced - k_rand).to(tl.int32), k_rand.to(tl.int32), k_q.to(tl.int32)


@triton.jit
def chosen_threshold(POOL, VALID, RANK, NQ, k_q, MASK_SELF: tl.constexpr, BLOCK: tl.constexpr,
                     RADIX_BITS: tl.constexpr):
    """plan.chosen_rows for one sample (the k_q pool rows with the smallest (query rank, index);
    under MASK_SELF only pool rows whose VALID token is set), as (t, ties) for
    :func:`chosen_in_block`: the rows with key ~rank > t, and the first ``ties`` by index of
    those with key == t."""
    t = tl.full((), 2147483647, tl.int32)  # k_q = 0: nothing is above it, and no ties are taken
    if k_q > 0:
        t = _kth_largest_key(POOL, POOL, VALID, POOL, RANK, NQ, k_q, 0, MASK_SELF, BLOCK,
                             RADIX_BITS)
    ties = k_q - _count_above(POOL, POOL, VALID, POOL, RANK, NQ, t, 0, MASK_SELF, BLOCK)
    return t, ties


@triton.jit
def plan_heads(HEAD, rows, NQ, H):
    """The heads that ``rows`` of a sample read under ``head_mix="random"``: the plan's head
    mod H, floor modulo as torch.remainder (Triton's % keeps the sign of a negative draw), so
    any int32 draw names a head."""
    head = tl.load(HEAD + rows, mask=rows < NQ, other=0) % H
    return tl.where(head < 0, head + H, head)


@triton.jit
def chosen_in_block(POOL, VALID, RANK, rows, NQ, t, ties, ties_before, MASK_SELF: tl.constexpr):
    """Which of ``rows`` (a block of the sample's rows, swept in order) are chosen, by
    :func:`chosen_threshold`'s (t, ties); returns them and the new ``ties_before`` (start at 0)."""
    key, eligible = _block_keys(POOL, POOL, VALID, POOL, RANK, rows, NQ, 0, MASK_SELF)
    return _take_block(key, eligible, t, ties, ties_before)


@triton.jit
def select_row(scores_row, valid_row, forced_row, rank_row, out_row, order_row, kept_out, NK,
               num_top, num_random, HAS_FORCED: tl.constexpr, WRITE_ORDER: tl.constexpr,
               ORDER_CHUNK: tl.constexpr, RADIX_BITS: tl.constexpr, BLOCK: tl.constexpr):
    """Steps 1-4 of the module docstring for one sample whose scores are in ``scores_row``: the
    mask into ``out_row`` and, under WRITE_ORDER, the kept-key order and count. The caller puts
    a barrier between writing the scores (and ``forced_row``) and this call."""
    offs = tl.arange(0, BLOCK)
    # Steps 1-2: forced tokens and the top scores.
    t = tl.full((), 2147483647, tl.int32)  # with num_top = 0 nothing is taken (ties = 0)
    if num_top > 0:
        t = _kth_largest_key(scores_row, valid_row, forced_row, out_row, rank_row, NK, num_top,
                             1, HAS_FORCED, BLOCK, RADIX_BITS)
    # How many of the keys equal to t are taken, lowest index first.
    ties = num_top - _count_above(scores_row, valid_row, forced_row, out_row, rank_row, NK, t, 1,
                                  HAS_FORCED, BLOCK)
    ties_before = tl.zeros((), tl.int32)
    for start in range(0, NK, BLOCK):
        cols = start + offs
        key, eligible = _block_keys(scores_row, valid_row, forced_row, out_row, rank_row, cols,
                                    NK, 1, HAS_FORCED)
        take, ties_before = _take_block(key, eligible, t, ties, ties_before)
        if HAS_FORCED:
            take = take | (tl.load(forced_row + cols, mask=cols < NK, other=0) != 0)
        tl.store(out_row + cols, take.to(tl.uint8), mask=cols < NK)

    # Step 3 reads what every thread of this program wrote above.
    tl.debug_barrier()
    if num_random > 0:
        t_rand = _kth_largest_key(scores_row, valid_row, forced_row, out_row, rank_row, NK,
                                  num_random, 2, HAS_FORCED, BLOCK, RADIX_BITS)
        ties = num_random - _count_above(scores_row, valid_row, forced_row, out_row, rank_row, NK,
                                         t_rand, 2, HAS_FORCED, BLOCK)
        # The count above reads OUT as it is before this sweep writes it.
        tl.debug_barrier()
        ties_before = tl.zeros((), tl.int32)
        for start in range(0, NK, BLOCK):
            cols = start + offs
            key, eligible = _block_keys(scores_row, valid_row, forced_row, out_row, rank_row,
                                        cols, NK, 2, HAS_FORCED)
            take, ties_before = _take_block(key, eligible, t_rand, ties, ties_before)
            # Only free tokens are written, so no block reads a value another block of this
            # sweep changed.
            tl.store(out_row + cols, tl.full([BLOCK], 1, tl.uint8), mask=(cols < NK) & take)

    if WRITE_ORDER:  # step 4 reads the finished mask
        tl.debug_barrier()
        kept_key_order(valid_row, out_row, order_row, kept_out, NK, ORDER_CHUNK, True)


@autotune(_CONFIGS, _INTERPRET_CONFIG, key=_KEY, bounds=_BOUNDS)
@triton.jit(do_not_specialize=["NK_BUCKET"])
def _select_kernel(PARTIALS, BLOCK_ROWS, SCORES, VALID, FORCED, RANK, META, OUT, ORDER, KEPT,
                   NUM_PARTIALS, head_weight, stride_rank, NK, NK_BUCKET,
                   HAS_FORCED: tl.constexpr, WRITE_ORDER: tl.constexpr,
                   ORDER_CHUNK: tl.constexpr, RADIX_BITS: tl.constexpr, BLOCK: tl.constexpr):
    """The scores and the mask of sample program_id(0), and under WRITE_ORDER the kept-key
    order of keep = valid & ~mask (kept_keys.py); NK_BUCKET is the autotuning key (see
    _common.py)."""
    b = tl.program_id(0).to(tl.int64)
    base = b * NK
    offs = tl.arange(0, BLOCK)
    scores_row = SCORES + base
    valid_row, forced_row = VALID, FORCED  # None: every token valid, none forced
    if VALID is not None:
        valid_row += base
    if FORCED is not None:
        forced_row += base
    out_row = OUT + base
    rank_row = RANK + b * stride_rank

    # Step 0: the scores, each token's partials added in row order (see the module docstring).
    for start in range(0, NK, BLOCK):
        cols = start + offs
        valid = load_flags(valid_row, cols, cols < NK)
        acc = tl.zeros([BLOCK], tl.float32)
        for row in range(NUM_PARTIALS):
            if tl.load(BLOCK_ROWS + b * NUM_PARTIALS + row) > 0:
                acc += tl.load(PARTIALS + (b * NUM_PARTIALS + row) * NK + cols, mask=valid,
                               other=0.0)
        tl.store(scores_row + cols, tl.where(valid, acc * head_weight, float("-inf")),
                 mask=cols < NK)
    tl.debug_barrier()  # the sweeps below read every token's score
    select_row(scores_row, valid_row, forced_row, rank_row, out_row, ORDER + base, KEPT + b, NK,
               tl.load(META + b * META_WIDTH_C + META_TOP_C),
               tl.load(META + b * META_WIDTH_C + META_RANDOM_C), HAS_FORCED, WRITE_ORDER,
               ORDER_CHUNK, RADIX_BITS, BLOCK)


def float_bits(x: float) -> int:
    """The float64 bit pattern of ``x`` as an int64 kernel argument (see :func:`mask_counts`)."""
    return struct.unpack("<q", struct.pack("<d", x))[0]


def row_strided(x: torch.Tensor) -> torch.Tensor:
    """``x`` (B, n) itself when its entries are contiguous within a row (a plan's fields are
    column slices of one draw), else a contiguous copy; kernels read it by its row stride."""
    return x if x.stride(1) == 1 or x.shape[1] <= 1 else x.contiguous()


def select_from_partials(partials: torch.Tensor, block_rows: torch.Tensor, head_weight: float,
                         valid: torch.Tensor | None, forced: torch.Tensor | None,
                         meta: torch.Tensor, token_rank: torch.Tensor, *,
                         config: SelectConfig | None = None,
                         order_out: tuple[torch.Tensor, torch.Tensor] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The (B, L) bool mask and the (B, L) fp32 scores it was chosen by, in one launch.

    ``partials`` (B, R, L) fp32 are the score kernel's column partials, ``block_rows`` (B, R)
    int32 how many live chosen rows each partial row summed (rows of 0 are skipped, unwritten), and
    the scores are ``head_weight`` times their sum in row order. ``valid`` (B, L) bool, None
    when every token is valid. ``forced`` (B, L) bool is always masked (None: nothing is),
    ``meta`` holds the counts (see ``_common.META_*``).
    ``config`` launches that config of the kernel instead of the autotuned one (tests).
    ``order_out``, a contiguous (B, L) int32 tensor and a (B,) int32 one, receives the kept-key
    order and count of keep = valid & ~mask (:func:`kept_keys.kept_keys`'s outputs) from the
    same launch.
    """
    batch, num_partials, num_k = partials.shape
    out = torch.empty((batch, num_k), dtype=torch.bool, device=partials.device)
    scores = torch.empty((batch, num_k), dtype=torch.float32, device=partials.device)
    token_rank = row_strided(token_rank)
    # Without order_out the order pointers are never read (WRITE_ORDER is off): any tensor does.
    order, kept = (scores, scores) if order_out is None else order_out
    launch(_select_kernel if config is None else _select_kernel.fn,
           _select_static(batch, num_partials, num_k, head_weight, token_rank.stride(0),
                          forced is not None, order_out is not None, config),
           PARTIALS=partials, BLOCK_ROWS=block_rows, SCORES=scores, VALID=flags_arg(valid),
           FORCED=flags_arg(forced), RANK=token_rank, META=meta, OUT=out,
           ORDER=order, KEPT=kept)
    return out, scores


@static_builder
def _select_static(batch: int, num_partials: int, num_k: int, head_weight: float,
                   rank_stride: int, has_forced: bool, write_order: bool,
                   config: SelectConfig | None) -> Static:
    return Static((batch,), {  # one program per sample
        "NUM_PARTIALS": num_partials, "head_weight": head_weight, "stride_rank": rank_stride,
        "NK": num_k, "NK_BUCKET": next_power_of_2(num_k), "HAS_FORCED": has_forced,
        "WRITE_ORDER": write_order, "ORDER_CHUNK": order_chunk(num_k), "RADIX_BITS": 4,
        **({} if config is None else config.options())})


def select_tokens(scores: torch.Tensor, valid: torch.Tensor, forced: torch.Tensor,
                  counts: MaskCounts, token_rank: torch.Tensor, *,
                  config: SelectConfig | None = None) -> torch.Tensor:
    """(B, L) bool mask: :func:`sma_kernels.reference.select_tokens` (same arguments) in-kernel.

    ``forced`` (B, L) bool is always masked; ``counts`` gives each sample's ``num_top`` and
    ``num_random``; ``token_rank`` (B, L) int32 is the plan's random order. The scores go in as
    the single partial row of weight 1, which reproduces them (up to the sign of a zero).
    """
    batch = scores.shape[0]
    meta = torch.zeros((batch, META_WIDTH), dtype=torch.int32, device=scores.device)
    meta[:, META_TOP] = counts.num_top
    meta[:, META_RANDOM] = counts.num_random
    block_rows = torch.ones((batch, 1), dtype=torch.int32, device=scores.device)
    mask, _ = select_from_partials(scores.float().contiguous()[:, None, :], block_rows, 1.0, valid,
                                   forced, meta, token_rank.to(torch.int32), config=config)
    return mask
