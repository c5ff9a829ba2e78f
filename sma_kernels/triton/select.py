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
   ``token_rank``. Ranks are distinct, so the same search on key = L - 1 - rank finds the
   threshold and needs no tie rule.

Rows longer than BLOCK are swept block by block, so any L works (L = 36,864 is the pixel
workload); each sweep re-reads the row from global memory (L2-resident at these sizes), and the
running state is a few scalars, so memory stays O(L) per sample. The mask is built in place in
the output: step 3 reads the tokens steps 1-2 wrote, after a barrier.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..plan import MaskCounts
from ._common import autotune

_CONFIGS = [
    triton.Config({"BLOCK": bl}, num_warps=w)
    for bl, w in [(512, 4), (1024, 4), (2048, 8), (4096, 16)]
]
_INTERPRET_CONFIG = triton.Config({"BLOCK": 4096})


@triton.jit
def _block_keys(SCORES, VALID, FORCED, TAKEN, RANK, base, offs, NK, STAGE: tl.constexpr):
    """Order-preserving int32 keys of one block, and which of its tokens may be picked."""
    in_row = offs < NK
    eligible = tl.load(VALID + base + offs, mask=in_row, other=0) != 0
    if STAGE == 1:  # top scores among the valid, not forced tokens
        eligible = eligible & (tl.load(FORCED + base + offs, mask=in_row, other=0) == 0)
        bits = tl.load(SCORES + base + offs, mask=in_row, other=0.0).to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    else:  # random picks among the valid tokens not taken yet: smallest rank = largest key
        eligible = eligible & (tl.load(TAKEN + base + offs, mask=in_row, other=1) == 0)
        key = (NK - 1) - tl.load(RANK + base + offs, mask=in_row, other=0)
    return key, eligible


@triton.jit
def _kth_largest_key(SCORES, VALID, FORCED, TAKEN, RANK, base, NK, need, STAGE: tl.constexpr,
                     BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr):
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
                                        NK, STAGE)
            hit = eligible[:, None] & (key[:, None] >= cand[None, :])
            counts += tl.sum(hit.to(tl.int32), axis=0)
        # counts fall as c grows and counts[0] >= need, so the digit is #(counts >= need) - 1.
        digit = tl.sum((counts >= need).to(tl.int32), axis=0) - 1
        lo = lo + (digit.to(tl.int64) << shift)
    return lo.to(tl.int32)


@autotune(_CONFIGS, _INTERPRET_CONFIG, key=["NK"], bounds={"BLOCK": "NK"})
@triton.jit
def _select_kernel(SCORES, VALID, FORCED, RANK, NUM_TOP, NUM_RANDOM, OUT, NK,
                   RADIX_BITS: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    base = b * NK
    offs = tl.arange(0, BLOCK)

    # Steps 1-2: forced tokens and the top scores.
    num_top = tl.load(NUM_TOP + b)
    t = tl.full((), 2147483647, tl.int32)  # with num_top = 0 nothing is taken (ties = 0)
    if num_top > 0:
        t = _kth_largest_key(SCORES, VALID, FORCED, OUT, RANK, base, NK, num_top, 1, BLOCK,
                             RADIX_BITS)
    above = 0
    for start in range(0, NK, BLOCK):
        key, eligible = _block_keys(SCORES, VALID, FORCED, OUT, RANK, base, start + offs, NK, 1)
        above += tl.sum((eligible & (key > t)).to(tl.int32), axis=0)
    ties = num_top - above  # how many of the keys equal to t are taken, lowest index first
    ties_before = 0
    for start in range(0, NK, BLOCK):
        cols = start + offs
        key, eligible = _block_keys(SCORES, VALID, FORCED, OUT, RANK, base, cols, NK, 1)
        tie = (eligible & (key == t)).to(tl.int32)
        tie_rank = ties_before + tl.cumsum(tie, axis=0) - tie  # exclusive prefix count
        take = eligible & ((key > t) | ((tie != 0) & (tie_rank < ties)))
        take = take | (tl.load(FORCED + base + cols, mask=cols < NK, other=0) != 0)
        tl.store(OUT + base + cols, take.to(tl.uint8), mask=cols < NK)
        ties_before += tl.sum(tie, axis=0)

    # Step 3 reads what every thread of this program wrote above.
    tl.debug_barrier()
    num_random = tl.load(NUM_RANDOM + b)
    if num_random > 0:
        t_rand = _kth_largest_key(SCORES, VALID, FORCED, OUT, RANK, base, NK, num_random, 2,
                                  BLOCK, RADIX_BITS)
        for start in range(0, NK, BLOCK):
            cols = start + offs
            key, eligible = _block_keys(SCORES, VALID, FORCED, OUT, RANK, base, cols, NK, 2)
            # Ranks are distinct: exactly num_random keys reach the threshold. Only free tokens
            # are written, so no block reads a value another block of this sweep changed.
            tl.store(OUT + base + cols, tl.full([BLOCK], 1, tl.uint8),
                     mask=(cols < NK) & eligible & (key >= t_rand))


def select_tokens(scores: torch.Tensor, valid: torch.Tensor, forced: torch.Tensor,
                  counts: MaskCounts, token_rank: torch.Tensor) -> torch.Tensor:
    """(B, L) bool mask: :func:`sma_kernels.reference.select_tokens` (same arguments) in-kernel.

    ``forced`` (B, L) bool is always masked; ``counts`` gives each sample's ``num_top`` and
    ``num_random``; ``token_rank`` (B, L) int32 is the plan's random order.
    """
    batch, num_k = scores.shape
    out = torch.empty((batch, num_k), dtype=torch.bool, device=scores.device)
    _select_kernel[(batch,)](
        scores.float().contiguous(), valid.contiguous().view(torch.uint8),
        forced.contiguous().view(torch.uint8), token_rank.to(torch.int32).contiguous(),
        counts.num_top.to(torch.int32).contiguous(), counts.num_random.to(torch.int32).contiguous(),
        out.view(torch.uint8), num_k, RADIX_BITS=4)
    return out
