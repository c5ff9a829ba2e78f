"""Few tokens (at most SHORT_LENGTH): the whole self-guided attention of a sample in one
program, so the forward is one launch after the plan's draw; and for short sequences (queries
too, and a tile that fits) a backward in one launch.

At HIGGS-like sizes (L = 28) the work of a sample is a few thousand multiply-adds per head, and
the general path's three launches (score kernel, selection, attention; mask_scores.py,
select.py, attention.py) cost more in launch latency and in the round trips between them than in
arithmetic. Here one program per sample does all of it. Every token of the sample sits in one
(BLOCK_M, BLOCK_K) tile, so neither softmax needs the online (running maximum) form; the query
rows come BLOCK_M at a time (one block up to 128 queries, so up to SHORT_QUERIES), and the head
dims BLOCK_D and BLOCK_DV columns at a time (one chunk while the tile fits, see Registers):

1. The plan: the number of valid tokens, the counts and the threshold of the chosen query rows,
   with the same functions as the score kernel (select.py: ``mask_counts``,
   ``chosen_threshold``, ``chosen_in_block``). The chosen rows are written out: they are the
   forced tokens of ``mask_self``.
2. The token scores, head by head and, within a head, block of rows by block of rows (the
   chosen rows read back): S = scale * q.k for the block's rows and the sample's tokens, each
   chosen row's softmax over the valid tokens, P = exp(S - m) / sum(exp(S - m)) with m the
   row's maximum (one exponential per logit: the whole row is in the tile), and the column sums
   of P over the rows the head mix gives this head (every chosen row under "mean", those whose
   plan head mod H is h under "random"), added into one (BLOCK_K,) fp32 vector in that fixed
   order, then weighted (1/H under "mean"). The rule for non-finite inputs is the score
   kernel's: a row with a non-finite logit over the valid tokens adds nothing, and padded keys
   are loaded as 0.
3. The selection of select.py (``select_row``) over those scores, which writes the mask and
   the kept-key order (kept_keys.py) that the backward reuses.
4. Under ATTEND, the attention, block of rows by block of rows and head by head: the tile's
   logits with every key outside keep = valid & ~mask at -inf, P = exp2(S - max), then
   out = P V / sum(P) chunk by chunk of V's columns, and the lse. The scoring pass already reads
   every valid key, and a sample's keys fit in one tile, so there is nothing to skip by
   gathering the kept ones; dropped keys' K and V are loaded as zeros (load-masked), so what
   they hold, NaN included, reaches no output. A sample with no kept key gets out = 0 and
   lse = +inf, as in attention.py.

Steps 2, 3 and 4 read what the previous step wrote to global memory (the chosen rows, the
scores, the mask), after a barrier; the rows stay in L1/L2.

The backward (``_short_sequence_bwd_kernel``) is one program per (sample, head), over the kept-key
order the forward wrote: the K and V rows of the kept keys gathered through it (a dropped key is
not loaded), delta = rowsum(dO * O), then the FlashAttention-2 recomputation of attention.py on
the whole tile at once: P = exp(S - lse), dS = P * (dO V^T - delta), dV = P^T dO,
dK = scale dS^T Q, dQ = scale dS K. S and dP are computed once (attention.py's dQ and dK/dV
kernels each recompute them), the program is the only writer of its gradient rows (dropped keys
get exact zeros), and it is one launch instead of three.

Registers: a (128, 128) tile at head dim 128 spills on sm_90 in both kernels, at 64 it does not
(up to 250 registers of 255 in the forward), hence SHORT_TILE_VOLUME. The forward keeps every
dot within it by its head-dim chunks (``forward_blocks``), so it takes any head dims; the
backward holds whole rows and takes only the square tiles that fit (``fits_short_backward``;
the others take attention.py's three-launch backward over the same order). A sample of few
queries takes 64-row blocks, its padded rows computed and not stored, unless its keys' tile is
as small as HIGGS's (``SHORT_SMALL_TILE`` says why). The heads' base pointers advance by their
strides, so no head offset is an int32 product.

Determinism: the program's config is a fixed function of the shape (blocks from the sizes,
warps from the tile area), never timed, and the scores are added in a fixed order, so the same
inputs give the same mask bits in every process. The summation order differs from the general
path's, so a near-tie can resolve differently there; this backend's mask function and its fused
forward take this path at the same shapes (``fits_short_forward``) and with the same blocks and
warps for the scores (``forward_blocks``: BLOCK_DV alone depends on V), so they agree bit for
bit.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..plan import MaskPlan
from ._common import (
    INTERPRET_C,
    LOG2E,
    LOG2E_C,
    block_dim,
    dot_precision,
    flags_arg,
    head_tile,
    load_flags,
    load_tile,
    program_tile,
    strides,
    tile_grid,
    tile_offsets,
)
from .attention import kept_key_block, probs_and_grad_logits, store_key_gradients, store_output
from .kept_keys import order_chunk
from .launch import Static, launch, static_builder
from .select import (
    chosen_in_block,
    chosen_threshold,
    float_bits,
    mask_counts,
    plan_heads,
    row_strided,
    select_row,
)

# The longest token axis the one-program forward takes (every key of a sample in one tile), and
# the most queries: they are taken SHORT_ROW_BLOCK at a time, and past SHORT_QUERIES a sample's
# one program would hold the work that the general path spreads over many.
SHORT_LENGTH = 128
SHORT_QUERIES = 1024
SHORT_ROW_BLOCK = 128
# The largest tile volume, rows x tokens x head-dim columns: on sm_90 a (128, 128) tile at head
# dim 128 spills registers, at 64 it does not (tests/test_triton_sm90.py). The forward takes the
# head dims in chunks of at most SHORT_HEAD_BLOCK within it; the backward, which holds whole rows
# of Q, K, V, dO and their gradients, takes only shapes whose whole tile fits.
SHORT_TILE_VOLUME = 128 * 128 * 64
SHORT_HEAD_BLOCK = 128
# Below 64 query rows the forward's blocks are the queries' own only when the keys' tile
# (tokens x head dim) is at most this (HIGGS: 32 x 16): at larger tiles, ptxas under Triton's
# register-allocation option (--regAllocOptLevel=2) spilled a few long-lived values of 16- and
# 32-row programs to an 8-24 B stack, at 56-168 registers, while 64 rows compile without one.
SHORT_SMALL_TILE = 32 * 16


def fits_short_forward(num_q: int, num_k: int) -> bool:
    """Whether the one-program forward (and mask) takes a sample of num_q queries and num_k
    tokens, at any head dims."""
    return num_k <= SHORT_LENGTH and num_q <= SHORT_QUERIES


def fits_short_backward(num_q: int, num_k: int, dim: int, dim_v: int) -> bool:
    """Whether the one-program-per-(sample, head) backward takes this shape: a square tile
    (queries and tokens in blocks of one size; the self-attention of a short sequence) within
    SHORT_TILE_VOLUME. Oblong tiles (16 or 32 queries over 128 tokens, 128 queries over 32
    tokens at head dim 128, ...) spilled registers on sm_90 at 4 and at 8 warps."""
    head_block = max(block_dim(dim), block_dim(dim_v))
    block_q, block_k = block_dim(num_q), block_dim(num_k)
    return (block_q == block_k <= SHORT_LENGTH and head_block <= SHORT_HEAD_BLOCK
            and block_q * block_k * head_block <= SHORT_TILE_VOLUME)


def forward_blocks(num_q: int, num_k: int, dim: int, dim_v: int) -> tuple[int, int, int, int]:
    """The forward's (BLOCK_M, BLOCK_K, BLOCK_D, BLOCK_DV). BLOCK_K holds the whole token axis.
    BLOCK_M is up to SHORT_ROW_BLOCK query rows, at least 64 unless the keys' tile is at most
    SHORT_SMALL_TILE (padded rows instead of a stack frame on sm_90), halved (down to 64) while
    the tile with the whole head dim exceeds SHORT_TILE_VOLUME. The head-dim chunks are the
    widest, up to SHORT_HEAD_BLOCK, that keep the dots within SHORT_TILE_VOLUME, the
    (BLOCK_M, chunk) tiles within 64 elements a thread (as the (128, 128) logits tile at 8
    warps) and the (BLOCK_K, chunk) tiles of K and V within 32 (at 64, d = 128 over 128 tokens,
    Triton 3.6's ptxas spilled 24 B at 255 registers; at 32 it takes 205), and at most 64 for
    fewer than 64 rows (measured on sm_90: V in two chunks of 32 there set up a stack frame, in
    chunks of 64 it does not). BLOCK_M, BLOCK_D and
    the warps set the scores' summation order, so they depend on (Q, L, d) only: the mask
    function (no V) and the fused forward sum in the same order."""
    block_k = block_dim(num_k)
    block_m = min(block_dim(num_q), SHORT_ROW_BLOCK)
    if block_k * block_dim(dim) > SHORT_SMALL_TILE:
        block_m = max(block_m, 64)
    while block_m > 64 and block_m * block_k * block_dim(dim) > SHORT_TILE_VOLUME:
        block_m //= 2
    threads = 32 * _warps(block_m, block_k)
    widest = min(SHORT_HEAD_BLOCK, SHORT_TILE_VOLUME // (block_m * block_k),
                 64 * threads // block_m, 32 * threads // block_k)
    if block_m < 64:
        widest = min(widest, 64)
    return block_m, block_k, min(block_dim(dim), widest), min(block_dim(dim_v), widest)


def _warps(block_m: int, block_k: int) -> int:
    """The kernels' warps: a fixed function of the tile (it sets the reduction trees, so the
    bits), 8 for the larger tiles, whose fp32 logits would not fit in the registers of 4."""
    return 4 if block_m * block_k <= 64 * 64 else 8


@triton.jit
def finite_logits(s, valid):
    """A logit tile as the scores read it, and its rows' non-finite flags: ``s`` at the
    ``valid`` tokens with each non-finite logit (infinite or NaN) counted as 0, -inf at the
    others; and 1.0 for a row with a non-finite valid logit, else 0.0. (A float max: the max of
    a boolean tile compiles, on sm_90, to packing its bits through local memory.)"""
    finite = tl.abs(s) < float("inf")  # False for NaN too
    bad = tl.max(tl.where(valid[None, :] & ~finite, 1.0, 0.0), axis=1)
    return tl.where(valid[None, :], tl.where(finite, s, 0.0), float("-inf")), bad


@triton.jit
def _logits(q_base, k_base, rows, row_ok, cols, col_ok, stride_qm, stride_qd, stride_kn,
            stride_kd, D: tl.constexpr, BLOCK_D: tl.constexpr,
            PRECISION: tl.constexpr):
    """q.k for the (rows, cols) tile of one head, the head dim taken BLOCK_D columns at a time,
    so the Q and K tiles stay within the register budget."""
    offs_d = tl.arange(0, BLOCK_D)
    q = load_tile(q_base, rows, row_ok, stride_qm, offs_d, stride_qd, D)
    k = load_tile(k_base, cols, col_ok, stride_kn, offs_d, stride_kd, D)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    # A runtime loop for the other chunks (none when D <= BLOCK_D): unrolled, their loads would be
    # hoisted and held together.
    for start in range(BLOCK_D, D, BLOCK_D):
        q = load_tile(q_base, rows, row_ok, stride_qm, start + offs_d, stride_qd, D)
        k = load_tile(k_base, cols, col_ok, stride_kn, start + offs_d, stride_kd, D)
        s = tl.dot(q, tl.trans(k), s, input_precision=PRECISION)
    return s


@triton.jit
def _short_sequence_kernel(
    Q, K, V, VALID, POOL, QUERY_RANK, HEAD, TOKEN_RANK, CHOSEN, SCORES, MASK, ORDER, KEPT,
    OUT, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_query_rank, stride_head, stride_token_rank, stride_order_b,
    B, H, NQ, NK, scale, qk_scale, head_weight, ratio_bits, num_per_query, noise_bits,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr, MASK_SELF: tl.constexpr,
    GROUP_BY_HEAD: tl.constexpr, WRITE_ORDER: tl.constexpr, ATTEND: tl.constexpr,
    RADIX_BITS: tl.constexpr, ORDER_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b, _ = program_tile(1)  # one program per sample
    if b < B:  # the grid's partial last row of programs (see tile_grid) has nothing to do
        valid_row, pool_row = VALID, POOL  # None: every token valid, every row in the pool
        if VALID is not None:
            valid_row += b * NK
        if POOL is not None:
            pool_row += b * NQ
        query_rank_row = QUERY_RANK + b * stride_query_rank
        chosen_row = CHOSEN + b * NQ
        offs_m = tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_K)
        valid = load_flags(valid_row, cols, cols < NK)

        # Step 1: the plan's counts and the threshold of its chosen rows.
        n = tl.sum(valid.to(tl.int32), axis=0)  # the whole row is one block
        num_top, num_random, k_q = mask_counts(n, pool_row, valid_row, NQ, ratio_bits,
                                               num_per_query, noise_bits, MASK_SELF, BLOCK_M)
        t, ties = chosen_threshold(pool_row, valid_row, query_rank_row, NQ, k_q, MASK_SELF, BLOCK_M,
                                   RADIX_BITS)

        ties_before = tl.zeros((), tl.int32)
        for start_m in range(0, NQ, BLOCK_M):
            rows = start_m + offs_m
            chosen, ties_before = chosen_in_block(pool_row, valid_row, query_rank_row, rows, NQ,
                                                  t, ties, ties_before, MASK_SELF)
            tl.store(chosen_row + rows, chosen.to(tl.uint8), mask=rows < NQ)
        tl.debug_barrier()  # step 2 reads the chosen rows back

        # Step 2: the token scores, head after head, block of rows after block of rows.
        scores = tl.zeros([BLOCK_K], tl.float32)
        # The heads' bases advance by their stride (no h * stride product, which could pass 2^31
        # in a head-major layout).
        q_head = Q + b * stride_qb
        k_head = K + b * stride_kb
        for h in range(H):
            for start_m in range(0, NQ, BLOCK_M):
                rows = start_m + offs_m
                mine = tl.load(chosen_row + rows, mask=rows < NQ, other=0) != 0
                if GROUP_BY_HEAD:
                    mine = mine & (plan_heads(HEAD + b * stride_head, rows, NQ, H) == h)
                if tl.max(mine.to(tl.int32), axis=0) > 0:
                    s, bad = finite_logits(
                        _logits(q_head, k_head, rows, mine, cols, valid, stride_qm, stride_qd,
                                stride_kn, stride_kd, D, BLOCK_D, PRECISION) * scale,
                        valid)
                    m = tl.max(s, axis=1)
                    m = tl.where(m > float("-inf"), m, 0.0)  # no valid token: row_sum = 0 below
                    # One exponential per logit: P = exp(S - m) / row_sum. (The score kernel
                    # computes exp(S - lse) in a second pass, since its rows span many key
                    # tiles.) Every exponential is finite, so rows that add nothing are weighted
                    # by an exact 0.
                    p = tl.exp2((s - m[:, None]) * LOG2E_C)
                    row_sum = tl.sum(p, axis=1)
                    live = mine & (row_sum > 0.0) & (bad == 0.0)
                    weight = tl.where(live, 1.0 / tl.where(live, row_sum, 1.0), 0.0)
                    scores += tl.sum(p * weight[:, None], axis=0)
            q_head += stride_qh
            k_head += stride_kh
        tl.store(SCORES + b * NK + cols, tl.where(valid, scores * head_weight, float("-inf")),
                 mask=cols < NK)
        tl.debug_barrier()  # the selection's sweeps read every score and chosen row

        # Step 3: the mask and the kept-key order.
        mask_row = MASK + b * NK
        select_row(SCORES + b * NK, valid_row, chosen_row, TOKEN_RANK + b * stride_token_rank,
                   mask_row, ORDER + b * stride_order_b, KEPT + b, NK, num_top, num_random,
                   MASK_SELF, WRITE_ORDER, ORDER_CHUNK, RADIX_BITS, BLOCK_K)

        if ATTEND:  # step 4 reads the finished mask
            tl.debug_barrier()
            keep = valid & (tl.load(mask_row + cols, mask=cols < NK, other=1) == 0)
            for start_m in range(0, NQ, BLOCK_M):
                rows = start_m + offs_m
                row_ok = rows < NQ
                q_head = Q + b * stride_qb
                k_head = K + b * stride_kb
                v_head = V + b * stride_vb
                out_head = OUT + b * stride_ob
                lse_head = LSE + b * H * NQ
                for h in range(H):
                    s = _logits(q_head, k_head, rows, row_ok, cols, keep, stride_qm, stride_qd,
                                stride_kn, stride_kd, D, BLOCK_D, PRECISION) * qk_scale
                    s = tl.where(keep[None, :], s, float("-inf"))
                    m = tl.max(s, axis=1)
                    m = tl.where(m > float("-inf"), m, 0.0)  # no kept key: p = 0, row_sum = 0
                    p = tl.exp2(s - m[:, None])
                    row_sum = tl.sum(p, axis=1)
                    # The output BLOCK_DV columns at a time, from the same P in V's type.
                    if not INTERPRET_C:
                        p = p.to(V.dtype.element_ty)
                    for start_dv in range(0, DV, BLOCK_DV):
                        offs_dv = start_dv + tl.arange(0, BLOCK_DV)
                        v = load_tile(v_head, cols, keep, stride_vn, offs_dv, stride_vd, DV)
                        store_output(out_head, lse_head, tl.dot(p, v, input_precision=PRECISION),
                                     m, row_sum, rows, row_ok, row_ok & (start_dv == 0),
                                     stride_om, offs_dv, stride_od, DV)
                    q_head += stride_qh
                    k_head += stride_kh
                    v_head += stride_vh
                    out_head += stride_oh
                    lse_head += NQ


@triton.jit
def _short_sequence_bwd_kernel(
    Q, K, V, ORDER, KEPT, OUT, DO, LSE, DQ, DK, DV_OUT,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_order_b, B, H, NQ, NK, scale, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One program per (sample, head): every query row and every entry of the kept-key order in
    # one tile, so S and dP are computed once (the general backward recomputes them in its dQ
    # and dK/dV kernels) and each gradient row has this program as its only writer.
    b, h, bh, _ = head_tile(H, 1)
    if b < B:  # the grid's partial last row of programs (see tile_grid) has nothing to do
        rows = tl.arange(0, BLOCK_Q)
        positions = tl.arange(0, BLOCK_K)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        row_ok = rows < NQ
        in_row = positions < NK
        order_row = ORDER + b * stride_order_b
        keys = tl.load(order_row + positions, mask=in_row, other=0)
        listed, k, v = kept_key_block(order_row, 0, tl.load(KEPT + b), positions,
                                       K + b * stride_kb + h * stride_kh,
                                       V + b * stride_vb + h * stride_vh, stride_kn, stride_kd,
                                       stride_vn, stride_vd, offs_d, offs_dv, D, DV)
        q = load_tile(Q + b * stride_qb + h * stride_qh, rows, row_ok, stride_qm, offs_d,
                      stride_qd, D)
        do = load_tile(DO + b * stride_dob + h * stride_doh, rows, row_ok, stride_dom, offs_dv,
                       stride_dod, DV)
        out = load_tile(OUT + b * stride_ob + h * stride_oh, rows, row_ok, stride_om, offs_dv,
                        stride_od, DV).to(tl.float32)
        delta = tl.sum(do.to(tl.float32) * out, axis=1)  # rowsum(dO * O), as in attention.py
        lse2 = tl.load(LSE + bh * NQ + rows, mask=row_ok, other=float("inf")) * LOG2E_C
        p, ds = probs_and_grad_logits(q, k, v, listed, do, lse2, delta, qk_scale, PRECISION)
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        tl.store(DQ + b * stride_dqb + h * stride_dqh
                 + tile_offsets(rows, stride_dqm, offs_d, stride_dqd),
                 (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))
        store_key_gradients(DK + b * stride_dkb + h * stride_dkh,
                            DV_OUT + b * stride_dvb + h * stride_dvh, keys, listed, in_row,
                            dk * scale, dv, stride_dkn, stride_dkd, stride_dvn, stride_dvd,
                            offs_d, offs_dv, D, DV)


class ShortSequenceResult(NamedTuple):
    """What :func:`short_sequence_attention` computes."""

    mask: torch.Tensor  # (B, L) bool, True = masked
    scores: torch.Tensor  # (B, L) fp32 token scores the mask was chosen by (-inf: padding)
    out: torch.Tensor | None  # (B, H, Q, dv) attention output, None without v
    lse: torch.Tensor | None  # (B, H, Q) fp32 log-sum-exp (natural log), None without v


def short_sequence_attention(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, valid: torch.Tensor | None,
        query_pool: torch.Tensor | None, plan: MaskPlan, *, ratio: float, num_per_query: int,
        head_mix: str, mask_self: bool, noise: float, scale: float,
        order_out: tuple[torch.Tensor, torch.Tensor] | None = None) -> ShortSequenceResult:
    """The mask of ``self_guided_mask`` for a short sequence (:func:`fits_short_forward`), and
    with ``v`` the attention over keep = valid & ~mask, in one launch. The arguments are the
    backend's (``query_pool`` intersected with ``valid`` in-kernel under ``mask_self``).
    ``order_out`` receives the kept-key order and count, as in
    :func:`.select.select_from_partials`."""
    batch, heads, num_q, _ = q.shape
    num_k = k.shape[2]
    attend = v is not None
    device = q.device
    mask = torch.empty((batch, num_k), dtype=torch.bool, device=device)
    scores = torch.empty((batch, num_k), dtype=torch.float32, device=device)
    chosen = torch.empty((batch, num_q), dtype=torch.uint8, device=device)
    # Pointers the constexpr switches leave unread take any tensor.
    order, kept = (scores, scores) if order_out is None else order_out
    out = lse = None
    values = k
    if attend:
        out = torch.empty((batch, heads, num_q, v.shape[3]), dtype=q.dtype, device=device)
        lse = torch.empty((batch, heads, num_q), dtype=torch.float32, device=device)
        values = v
    query_rank, head, token_rank = (row_strided(x) for x in (plan.query_rank, plan.head,
                                                             plan.token_rank))
    launch(_short_sequence_kernel,
           _forward_static(q.shape, num_k, values.shape[3], q.stride(), k.stride(),
                           values.stride(), (out if attend else q).stride(), query_rank.stride(0),
                           head.stride(0), token_rank.stride(0), order.stride(0), q.dtype, scale,
                           ratio, num_per_query, noise, head_mix, mask_self,
                           order_out is not None, attend),
           Q=q, K=k, V=values, VALID=flags_arg(valid), POOL=flags_arg(query_pool),
           QUERY_RANK=query_rank, HEAD=head, TOKEN_RANK=token_rank, CHOSEN=chosen, SCORES=scores,
           MASK=mask, ORDER=order, KEPT=kept, OUT=out if attend else scores,
           LSE=lse if attend else scores)
    return ShortSequenceResult(mask, scores, out, lse)


@static_builder
def _forward_static(q_shape: tuple[int, ...], num_k: int, dim_v: int,
                    q_strides: tuple[int, ...], k_strides: tuple[int, ...],
                    v_strides: tuple[int, ...], out_strides: tuple[int, ...],
                    query_rank_stride: int, head_stride: int, token_rank_stride: int,
                    order_stride: int, dtype: torch.dtype, scale: float, ratio: float,
                    num_per_query: int, noise: float, head_mix: str, mask_self: bool,
                    write_order: bool, attend: bool) -> Static:
    batch, heads, num_q, dim = q_shape
    block_m, block_k, block_d, block_dv = forward_blocks(num_q, num_k, dim, dim_v)
    return Static(tile_grid(batch, 1), {
        **strides("q", q_strides, "bhmd"), **strides("k", k_strides, "bhnd"),
        **strides("v", v_strides, "bhnd"), **strides("o", out_strides, "bhmd"),
        "stride_query_rank": query_rank_stride, "stride_head": head_stride,
        "stride_token_rank": token_rank_stride, "stride_order_b": order_stride,
        "B": batch, "H": heads, "NQ": num_q, "NK": num_k, "scale": scale,
        "qk_scale": scale * LOG2E, "head_weight": 1.0 if head_mix == "random" else 1.0 / heads,
        "ratio_bits": float_bits(ratio), "num_per_query": num_per_query,
        "noise_bits": float_bits(noise), "D": dim, "DV": dim_v, "BLOCK_D": block_d,
        "BLOCK_DV": block_dv, "PRECISION": dot_precision(dtype),
        "MASK_SELF": mask_self, "GROUP_BY_HEAD": head_mix == "random",
        "WRITE_ORDER": write_order, "ATTEND": attend, "RADIX_BITS": 4,
        "ORDER_CHUNK": order_chunk(num_k), "BLOCK_M": block_m, "BLOCK_K": block_k,
        "num_warps": _warps(block_m, block_k), "num_stages": 1})


def short_sequence_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                            v: torch.Tensor, order: torch.Tensor, kept: torch.Tensor,
                            out: torch.Tensor, lse: torch.Tensor, *, scale: float
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ, dK and dV of the attention over a kept-key ``order`` and count ``kept`` (the contract
    of :func:`.attention.ordered_attention_backward`) for a short sequence
    (:func:`fits_short_backward`), in one launch."""
    d_q, d_k, d_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    launch(_short_sequence_bwd_kernel,
           _backward_static(q.shape, k.shape[2], v.shape[3], q.stride(), k.stride(), v.stride(),
                            out.stride(), grad_out.stride(), d_q.stride(), d_k.stride(),
                            d_v.stride(), order.stride(0), q.dtype, scale),
           Q=q, K=k, V=v, ORDER=order, KEPT=kept, OUT=out, DO=grad_out, LSE=lse.contiguous(),
           DQ=d_q, DK=d_k, DV_OUT=d_v)
    return d_q, d_k, d_v


@static_builder
def _backward_static(q_shape: tuple[int, ...], num_k: int, dim_v: int,
                     q_strides: tuple[int, ...], k_strides: tuple[int, ...],
                     v_strides: tuple[int, ...], out_strides: tuple[int, ...],
                     do_strides: tuple[int, ...], dq_strides: tuple[int, ...],
                     dk_strides: tuple[int, ...], dv_strides: tuple[int, ...], order_stride: int,
                     dtype: torch.dtype, scale: float) -> Static:
    batch, heads, num_q, dim = q_shape
    block_q, block_k = block_dim(num_q), block_dim(num_k)
    return Static(tile_grid(batch * heads, 1), {  # one program per (sample, head)
        **strides("q", q_strides, "bhmd"), **strides("k", k_strides, "bhnd"),
        **strides("v", v_strides, "bhnd"), **strides("o", out_strides, "bhmd"),
        **strides("do", do_strides, "bhmd"), **strides("dq", dq_strides, "bhmd"),
        **strides("dk", dk_strides, "bhnd"), **strides("dv", dv_strides, "bhnd"),
        "stride_order_b": order_stride, "B": batch, "H": heads, "NQ": num_q, "NK": num_k,
        "scale": scale, "qk_scale": scale * LOG2E, "D": dim, "DV": dim_v,
        "BLOCK_D": block_dim(dim), "BLOCK_DV": block_dim(dim_v),
        "PRECISION": dot_precision(dtype), "BLOCK_Q": block_q, "BLOCK_K": block_k,
        "num_warps": _warps(block_q, block_k), "num_stages": 1})
