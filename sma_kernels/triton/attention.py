"""Masked attention with the self-guided mask applied: FlashAttention forward and backward over
the kept keys only.

Every kernel reads the keys through ``order`` and ``kept`` (kept_keys.py): per sample, the kept
key indices ascending, then the dropped ones, and how many are kept. Masked keys are scattered,
so skipping whole key tiles would save almost nothing; walking ``order`` instead, a kernel
gathers the K and V rows of kept keys only, BLOCK_N at a time (row addresses from the indices,
in int64), and a masked or padded key costs nothing, not even a load. Only the tail of the last
block (positions past ``kept``) is masked. ``attention_forward(q, k, v, keep)`` builds the order
in a launch of its own (``masked_attention``); :func:`ordered_attention_forward` takes a ready
one, which ``self_guided_attention``'s fused forward gets from the selection kernel.

Forward (one program per (sample, head, query tile)). For a tile of BLOCK_M query rows we stream
the ceil(kept / BLOCK_N) blocks of kept keys and keep, per row, the running maximum m and the
running sum l = sum exp(S - m), rescaling the output accumulator by exp(m_old - m_new) whenever
the maximum grows (the online softmax of FlashAttention). The loop runs over the full blocks
with no mask and no branch, so Triton prefetches the next block's indices, K and V while
computing; the last block, if partial, follows the loop, its tail's columns at S = -inf and
their K and V loaded as zeros. The dQ kernel walks the blocks the same way. (Above head blocks
of 128 the loop takes every block, masked: see :func:`narrow_heads`.) At the end
out = acc / l and lse = m + log(l) per row.
``keep`` is per (sample, token), the same for every row and head, so a row has no kept key only
when its whole sample has none: then the loop does not run, out = 0 and lse = +inf, which makes
exp(S - lse) = 0 in the backward instead of NaN (the reference's rule).

Backward (FlashAttention-2 recomputation). With P = exp(S - lse) recomputed block by block from
the saved lse, and delta = rowsum(dO * O):
    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dQ = scale dS K,   dK = scale dS^T Q.
Two launches, so that every output element has exactly one writer and no atomics are needed
(deterministic bits), over the order the forward used (``self_guided_attention``'s fused op
saves it; ``masked_attention``'s backward rebuilds it from ``keep`` in a launch of its own):
* dQ first: one program per (sample, head, query tile) computes delta for its rows from the dO
  and O tiles, and their lse in base 2 (lse * log2 e), and writes both, then accumulates dQ
  over the same blocks of kept keys as the forward. (There they cost one O tile and a multiply
  per row, once, and no launch; inside the dK/dV kernel every key block would recompute them:
  the conversion to base 2 alone was 8 of the 253 sm_90 instructions per warp of its loop's
  32 x 64 tile.)
* dK/dV, after it, reading that delta and base-2 lse: one program per (sample, head, block of
  BLOCK_N consecutive entries of ``order``) accumulates dK and dV of its kept keys over all
  query tiles and writes their rows; its dropped entries get exact zeros, so no separate zero
  fill is needed, and each key row has one writer, because ``order`` is a permutation. A block
  with no kept entry skips the query loop.

Dropped keys (``keep`` False: padded or masked) influence no output or gradient, whatever they
hold, NaN and Inf included: no kernel loads them.

Exponentials are base 2: S is computed as (scale * log2 e) q.k, so exp(x) becomes exp2(x') and
no libdevice call is needed (the kernels also run under ``TRITON_INTERPRET=1``). The saved lse
is in natural-log units, as the reference returns it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    BUCKET_ARGS,
    LOG2E,
    LOG2E_C,
    WIDE_HEAD_BLOCK_C,
    TileConfig,
    autotune,
    block_dim,
    dot_precision,
    head_tile,
    load_tile,
    rounded_product,
    size_buckets,
    strides,
    tile_offsets,
    tiles_grid,
)
from .kept_keys import kept_keys
from .launch import Static, launch, static_builder

# Every config compiles for sm_90 without register spills at the head dims of the workloads
# (tests/test_triton_sm90.py): where a larger block would spill, it has more warps or a smaller
# BLOCK_M. The dK/dV kernel holds two (BLOCK_N, d) fp32 accumulators, so its BLOCK_N = 128
# configs use BLOCK_M <= 32 and 8 warps.
_FWD_TILES = [TileConfig(32, 32, warps=4, stages=3), TileConfig(64, 64, warps=4, stages=3),
              TileConfig(64, 128, warps=8, stages=3), TileConfig(128, 64, warps=8, stages=3),
              TileConfig(128, 128, warps=8, stages=2)]
_DQ_TILES = [TileConfig(32, 32, warps=4, stages=2), TileConfig(64, 64, warps=4, stages=2),
             TileConfig(64, 128, warps=8, stages=2), TileConfig(128, 64, warps=8, stages=2)]
_DKDV_TILES = [TileConfig(32, 32, warps=4, stages=2), TileConfig(32, 64, warps=4, stages=2),
               TileConfig(16, 128, warps=8, stages=2), TileConfig(32, 128, warps=8, stages=2)]
_FWD_CONFIGS = [config.to_triton() for config in _FWD_TILES]
_DQ_CONFIGS = [config.to_triton() for config in _DQ_TILES]
_DKDV_CONFIGS = [config.to_triton() for config in _DKDV_TILES]
# Under the interpreter: one config, blocks small enough that the tests still cover several
# blocks, large enough to keep NumPy busy per step.
_INTERPRET_TILES = TileConfig(32, 32, warps=4, stages=1)
_BOUNDS = {"BLOCK_M": "NQ", "BLOCK_N": "NK"}
_KEY = [*BUCKET_ARGS, "BLOCK_D", "BLOCK_DV"]


@triton.jit
def kept_key_block(order_row, start, num_kept, offs_n, k_base, v_base, stride_kn, stride_kd,
                    stride_vn, stride_vd, offs_d, offs_dv, D: tl.constexpr, DV: tl.constexpr,
                    FULL: tl.constexpr = False):
    """Which of the ``order`` positions start + offs_n hold a kept key (all but the tail of the
    last block), and the K and V rows of those keys; zeros elsewhere, nothing else is read.
    FULL: the caller knows every position holds one (a constant mask, so unmasked loads)."""
    positions = start + offs_n
    if FULL:
        listed = tl.full(offs_n.shape, 1, tl.int1)
    else:
        listed = positions < num_kept
    keys = tl.load(order_row + positions, mask=listed, other=0)
    k = load_tile(k_base, keys, listed, stride_kn, offs_d, stride_kd, D)
    v = load_tile(v_base, keys, listed, stride_vn, offs_dv, stride_vd, DV)
    return listed, k, v


@triton.jit
def _rows_in(start, offs_m, NQ, FULL_ROWS: tl.constexpr):
    """Which rows start + offs_m lie below NQ; FULL_ROWS: the caller knows all do (a constant
    mask, so unmasked loads)."""
    if FULL_ROWS:
        return tl.full(offs_m.shape, 1, tl.int1)
    return offs_m < NQ - start


@triton.jit
def _query_tile(q_base, do_base, start, offs_m, stride_qm, stride_qd, stride_dom, stride_dod,
                offs_d, offs_dv, NQ, D: tl.constexpr, DV: tl.constexpr,
                FULL_ROWS: tl.constexpr = False):
    """Q and dO of the query rows start + offs_m, for the backward; zeros past NQ. The bases
    advance by ``start`` and the tiles' offsets depend on ``offs_m`` only, so in a loop over
    ``start`` the offsets are computed once and an address costs one 64-bit add."""
    row_ok = _rows_in(start, offs_m, NQ, FULL_ROWS)
    start = tl.cast(start, tl.int64)
    q = load_tile(q_base + start * stride_qm, offs_m, row_ok, stride_qm, offs_d, stride_qd, D)
    do = load_tile(do_base + start * stride_dom, offs_m, row_ok, stride_dom, offs_dv, stride_dod,
                   DV)
    return q, do


@triton.jit
def _row_stat(base, start, offs_m, NQ, FULL_ROWS: tl.constexpr = False):
    """A per-row statistic of the backward (lse, base-2 lse, delta) at rows start + offs_m; 0
    past NQ, finite, so that those rows' P is 1 and dS 0, and their zero Q and dO add nothing."""
    return tl.load(base + start + offs_m, mask=_rows_in(start, offs_m, NQ, FULL_ROWS), other=0.0)


@triton.jit
def _dkdv_tile(dk, dv, k, v, listed, q_base, do_base, lse2_base, delta_base, start, offs_m,
               stride_qm, stride_qd, stride_dom, stride_dod, offs_d, offs_dv, NQ, qk_scale,
               D: tl.constexpr, DV: tl.constexpr, PRECISION: tl.constexpr,
               FULL_ROWS: tl.constexpr):
    """dK (unscaled) and dV of a block of keys after the query rows start + offs_m."""
    q, do = _query_tile(q_base, do_base, start, offs_m, stride_qm, stride_qd, stride_dom,
                        stride_dod, offs_d, offs_dv, NQ, D, DV, FULL_ROWS)
    lse2 = _row_stat(lse2_base, start, offs_m, NQ, FULL_ROWS)
    delta = _row_stat(delta_base, start, offs_m, NQ, FULL_ROWS)
    p_t, ds_t = probs_and_grad_logits(q, k, v, listed, do, lse2, delta, qk_scale, PRECISION,
                                      KEYS_AS_ROWS=True, FULL=True)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def store_output(out_base, lse_row, acc, m, row_sum, rows, row_ok, lse_ok, stride_om, offs_dv,
                 stride_od, DV: tl.constexpr):
    """The forward's epilogue for a tile of query rows: out = acc / row_sum and the lse
    (natural log) from the running maximum m (base 2) and row_sum, stored where ``lse_ok``
    (the rows' first column chunk, when the output is written chunk by chunk). A row without a
    kept key (row_sum = 0, acc = 0) gets out = 0 and lse = +inf, so the backward's
    exp(S - lse) is 0."""
    has_key = row_sum > 0.0
    out = acc / tl.where(has_key, row_sum, 1.0)[:, None]
    lse = tl.where(has_key, (m + tl.log2(tl.where(has_key, row_sum, 1.0))) / LOG2E_C,
                   float("inf"))
    tl.store(out_base + tile_offsets(rows, stride_om, offs_dv, stride_od),
             out.to(out_base.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(lse_row + rows, lse, mask=lse_ok)


@triton.jit
def _store_key_rows(base, keys, kept, dropped, x, stride_row, offs_col, stride_col,
                    COLS: tl.constexpr):
    """x's rows at the keys of the ``kept`` entries, zeros at those of the ``dropped`` ones."""
    offsets = tile_offsets(keys, stride_row, offs_col, stride_col)
    columns = offs_col[None, :] < COLS
    tl.store(base + offsets, x.to(base.dtype.element_ty), mask=kept[:, None] & columns)
    tl.store(base + offsets, tl.zeros_like(x).to(base.dtype.element_ty),
             mask=dropped[:, None] & columns)


@triton.jit
def store_key_gradients(dk_base, dv_base, keys, kept, in_row, dk, dv, stride_dkn, stride_dkd,
                        stride_dvn, stride_dvd, offs_d, offs_dv, D: tl.constexpr,
                        DV: tl.constexpr):
    """dK and dV rows of a block of entries of the kept-key order, written to the entries'
    keys: ``kept`` entries their rows of ``dk`` and ``dv``, the other entries of ``in_row``
    (dropped keys) zeros, whatever ``dk`` and ``dv`` hold there. So no zero fill is needed and
    each key row has one writer (the order is a permutation). Two masked stores, not a select
    on the accumulators: after the dK/dV kernel's loop a select made ptxas serialize every
    warp-group MMA of the loop (sm_90)."""
    dropped = in_row & ~kept
    _store_key_rows(dk_base, keys, kept, dropped, dk, stride_dkn, offs_d, stride_dkd, D)
    _store_key_rows(dv_base, keys, kept, dropped, dv, stride_dvn, offs_dv, stride_dvd, DV)


@triton.jit
def narrow_heads(BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Whether both head-dim blocks are at most WIDE_HEAD_BLOCK: only then do the loops take
    their faster forms, which hold more registers. The loops over blocks of kept keys (forward,
    dQ) take the full blocks only, with no mask, the last block following (if partial, its tail
    masked), else every block, masked; the dK/dV loop holds its query tiles' offsets across the
    loop (see _query_tile), else recomputes them per tile. Above, the second copy of the block's
    code, and the held offsets, made the first config spill registers on sm_90
    (tests/test_triton_sm90.py)."""
    return (BLOCK_D <= WIDE_HEAD_BLOCK_C) & (BLOCK_DV <= WIDE_HEAD_BLOCK_C)


@triton.jit
def _attend_block(acc, m_i, l_i, q, order_row, start, num_kept, offs_n, k_base, v_base,
                  stride_kn, stride_kd, stride_vn, stride_vd, offs_d, offs_dv, qk_scale,
                  D: tl.constexpr, DV: tl.constexpr,
                  PRECISION: tl.constexpr, FULL: tl.constexpr):
    """The online softmax over one block of kept keys: the new output accumulator, running
    maximum m (base 2) and running sum l. The largest logit's exponent is exactly 0: the
    exponent subtracts m from the very product the maximum took (rounded_product). The sm_90
    build otherwise contracted S * qk_scale - m into one multiply-add, whose exponent at the
    maximum is the product's rounding error, up to half an ulp of m: a weight above 1, and
    exp2 overflows from logits near 2^31."""
    listed, k, v = kept_key_block(order_row, start, num_kept, offs_n, k_base, v_base, stride_kn,
                                  stride_kd, stride_vn, stride_vd, offs_d, offs_dv, D, DV, FULL)
    s = rounded_product(tl.dot(q, tl.trans(k), input_precision=PRECISION), qk_scale)
    if not FULL:
        s = tl.where(listed[None, :], s, float("-inf"))
    # Every block starts with a kept key, so m_new is finite from the first block on, unless
    # every kept logit so far is -inf (an infinite input): the exponentials are then taken
    # against 0, so they are 0 (not -inf - -inf = NaN) and the row ends with out = 0 and
    # lse = +inf, as the reference's.
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_base = tl.where(m_new > float("-inf"), m_new, 0.0)
    alpha = tl.exp2(m_i - m_base)
    p = tl.exp2(s - m_base[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@autotune(_FWD_CONFIGS, _INTERPRET_TILES.to_triton(), key=_KEY, bounds=_BOUNDS)
@triton.jit(do_not_specialize=BUCKET_ARGS)
def _attention_fwd_kernel(
    Q, K, V, ORDER, KEPT, OUT, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_order_b,
    B, H, NQ, NK, qk_scale, NQ_BUCKET, NK_BUCKET,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (sample, head, query tile); int64 (sample, head) and bases: B*H*L*dv can
    # pass 2^31 elements at the pixel workload.
    b, h, bh, pid_m = head_tile(H, tl.cdiv(NQ, BLOCK_M))
    if b < B:  # the grid's partial last row of programs (see tile_grid) has nothing to do
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        row_ok = rows < NQ

        q = load_tile(Q + b * stride_qb + h * stride_qh, rows, row_ok, stride_qm, offs_d,
                      stride_qd, D)
        order_row = ORDER + b * stride_order_b
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        num_kept = tl.load(KEPT + b)
        peel = narrow_heads(BLOCK_D, BLOCK_DV)
        full_end = num_kept - num_kept % BLOCK_N if peel else num_kept
        for start in range(0, full_end, BLOCK_N):
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, order_row, start, num_kept, offs_n,
                                          k_base, v_base, stride_kn, stride_kd, stride_vn,
                                          stride_vd, offs_d, offs_dv, qk_scale, D, DV,
                                          PRECISION, peel)
        if full_end < num_kept:
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, order_row, full_end, num_kept,
                                          offs_n, k_base, v_base, stride_kn, stride_kd,
                                          stride_vn, stride_vd, offs_d, offs_dv, qk_scale, D, DV,
                                          PRECISION, False)

        store_output(OUT + b * stride_ob + h * stride_oh, LSE + bh * NQ, acc, m_i, l_i, rows,
                     row_ok, row_ok, stride_om, offs_dv, stride_od, DV)


@triton.jit
def probs_and_grad_logits(q, k, v, listed, do, lse2, delta, qk_scale, PRECISION: tl.constexpr,
                          KEYS_AS_ROWS: tl.constexpr = False, FULL: tl.constexpr = False):
    """P = exp(S - lse) (0 off the listed keys and on rows without keys) and
    dS = P * (dO V^T - delta) for one (query tile, block of kept keys); under KEYS_AS_ROWS their
    transposes (keys x queries), computed as K Q^T and V dO^T. The dK/dV kernel takes those: they
    are the A operands of its products (dV += P^T dO, dK += dS^T Q) as the tensor cores return
    them, where P's transpose would go through shared memory on every tile. FULL: no mask on
    the keys, because every key of the block is listed, or because the caller discards the
    rows of P^T and dS^T of the others (each is a key's own; the dK/dV kernel)."""
    if KEYS_AS_ROWS:
        s = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        dp = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        lse2, delta, listed = lse2[None, :], delta[None, :], listed[:, None]
    else:
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        lse2, delta, listed = lse2[:, None], delta[:, None], listed[None, :]
    # lse2 = +inf (a row without kept keys) gives 0.
    p = tl.exp2(s * qk_scale - lse2)
    if not FULL:
        p = tl.where(listed, p, 0.0)
    return p, p * (dp - delta)


@autotune(_DKDV_CONFIGS, _INTERPRET_TILES.to_triton(), key=_KEY, bounds=_BOUNDS)
@triton.jit(do_not_specialize=BUCKET_ARGS)
def _attention_bwd_dkdv_kernel(
    Q, K, V, ORDER, KEPT, DO, LSE2, DELTA, DK, DV_OUT,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_order_b,
    B, H, NQ, NK, scale, qk_scale, NQ_BUCKET, NK_BUCKET,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (sample, head, block of BLOCK_N entries of the sample's order).
    b, h, bh, pid_n = head_tile(H, tl.cdiv(NK, BLOCK_N))
    if b < B:  # the grid's partial last row of programs (see tile_grid) has nothing to do
        positions = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        in_row = positions < NK
        order_row = ORDER + b * stride_order_b
        keys = tl.load(order_row + positions, mask=in_row, other=0)
        num_kept = tl.load(KEPT + b)

        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
        if pid_n * BLOCK_N < num_kept:  # a block of dropped keys only has zero gradient
            k_base = K + b * stride_kb + h * stride_kh
            v_base = V + b * stride_vb + h * stride_vh
            listed, k, v = kept_key_block(order_row, pid_n * BLOCK_N, num_kept,
                                           tl.arange(0, BLOCK_N), k_base, v_base, stride_kn,
                                           stride_kd, stride_vn, stride_vd, offs_d, offs_dv, D,
                                           DV)
            q_base = Q + b * stride_qb + h * stride_qh
            do_base = DO + b * stride_dob + h * stride_doh
            lse2_base = LSE2 + bh * NQ
            delta_base = DELTA + bh * NQ
            # The entries past the kept keys are not masked in the loop (their K and V are
            # loaded as zeros): store_key_gradients writes zeros to their rows, whatever the
            # loop leaves there. The query tiles are at start + rows: up to head blocks of 128
            # the offsets of loop-invariant rows are held (start = start_m). With 64 or more
            # keys a block, the full tiles mask no row and the last, if partial, follows the
            # loop; the 32-key tile's second copy spilled registers on sm_90 at dv = 128.
            narrow = narrow_heads(BLOCK_D, BLOCK_DV)
            if narrow & (BLOCK_N >= 64):
                full_end = NQ - NQ % BLOCK_M
                for start_m in range(0, full_end, BLOCK_M):
                    dk, dv = _dkdv_tile(dk, dv, k, v, listed, q_base, do_base, lse2_base,
                                        delta_base, start_m, offs_m, stride_qm, stride_qd,
                                        stride_dom, stride_dod, offs_d, offs_dv, NQ, qk_scale,
                                        D, DV, PRECISION, True)
                if full_end < NQ:
                    dk, dv = _dkdv_tile(dk, dv, k, v, listed, q_base, do_base, lse2_base,
                                        delta_base, full_end, offs_m, stride_qm, stride_qd,
                                        stride_dom, stride_dod, offs_d, offs_dv, NQ, qk_scale,
                                        D, DV, PRECISION, False)
            else:
                for start_m in range(0, NQ, BLOCK_M):
                    if narrow:
                        start = start_m
                        rows = offs_m
                    else:
                        start = 0
                        rows = start_m + offs_m
                    dk, dv = _dkdv_tile(dk, dv, k, v, listed, q_base, do_base, lse2_base,
                                        delta_base, start, rows, stride_qm, stride_qd,
                                        stride_dom, stride_dod, offs_d, offs_dv, NQ, qk_scale,
                                        D, DV, PRECISION, False)
        store_key_gradients(DK + b * stride_dkb + h * stride_dkh,
                            DV_OUT + b * stride_dvb + h * stride_dvh, keys, positions < num_kept,
                            in_row, dk * scale, dv, stride_dkn, stride_dkd, stride_dvn,
                            stride_dvd, offs_d, offs_dv, D, DV)


@triton.jit
def _dq_block(q, do, lse2, delta, order_row, start, num_kept, offs_n, k_base, v_base, stride_kn,
              stride_kd, stride_vn, stride_vd, offs_d, offs_dv, qk_scale, D: tl.constexpr,
              DV: tl.constexpr, PRECISION: tl.constexpr,
              FULL: tl.constexpr):
    """dS K of a query tile over one block of kept keys (unscaled)."""
    listed, k, v = kept_key_block(order_row, start, num_kept, offs_n, k_base, v_base, stride_kn,
                                  stride_kd, stride_vn, stride_vd, offs_d, offs_dv, D, DV, FULL)
    _, ds = probs_and_grad_logits(q, k, v, listed, do, lse2, delta, qk_scale, PRECISION,
                                  FULL=FULL)
    return tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@autotune(_DQ_CONFIGS, _INTERPRET_TILES.to_triton(), key=_KEY, bounds=_BOUNDS)
@triton.jit(do_not_specialize=BUCKET_ARGS)
def _attention_bwd_dq_kernel(
    Q, K, V, ORDER, KEPT, DO, LSE, LSE2, DELTA, OUT, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_order_b,
    B, H, NQ, NK, scale, qk_scale, NQ_BUCKET, NK_BUCKET,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (sample, head, query tile).
    b, h, bh, pid_m = head_tile(H, tl.cdiv(NQ, BLOCK_M))
    if b < B:  # the grid's partial last row of programs (see tile_grid) has nothing to do
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < NQ
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)

        q, do = _query_tile(Q + b * stride_qb + h * stride_qh,
                            DO + b * stride_dob + h * stride_doh, 0, rows, stride_qm, stride_qd,
                            stride_dom, stride_dod, offs_d, offs_dv, NQ, D, DV)
        # The lse in base 2 and delta = rowsum(dO * O) of these rows, in fp32, for this kernel
        # and for the dK/dV kernel launched after it (see the module docstring).
        lse2 = _row_stat(LSE + bh * NQ, 0, rows, NQ) * LOG2E_C
        out = load_tile(OUT + b * stride_ob + h * stride_oh, rows, row_ok, stride_om, offs_dv,
                        stride_od, DV).to(tl.float32)
        delta = tl.sum(do.to(tl.float32) * out, axis=1)
        tl.store(LSE2 + bh * NQ + rows, lse2, mask=row_ok)
        tl.store(DELTA + bh * NQ + rows, delta, mask=row_ok)
        order_row = ORDER + b * stride_order_b
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh

        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        num_kept = tl.load(KEPT + b)
        peel = narrow_heads(BLOCK_D, BLOCK_DV)
        full_end = num_kept - num_kept % BLOCK_N if peel else num_kept
        for start in range(0, full_end, BLOCK_N):
            dq += _dq_block(q, do, lse2, delta, order_row, start, num_kept, offs_n, k_base,
                            v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, offs_dv,
                            qk_scale, D, DV, PRECISION, peel)
        if full_end < num_kept:
            dq += _dq_block(q, do, lse2, delta, order_row, full_end, num_kept, offs_n, k_base,
                            v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, offs_dv,
                            qk_scale, D, DV, PRECISION, False)
        tl.store(DQ + b * stride_dqb + h * stride_dqh
                 + tile_offsets(rows, stride_dqm, offs_d, stride_dqd),
                 (dq * scale).to(DQ.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_d[None, :] < D))


def _common_args(q_shape: tuple[int, ...], v_shape: tuple[int, ...], dtype: torch.dtype) -> dict:
    """Arguments shared by the attention kernels: the autotuning buckets, and as constexprs the
    head dims, their padded blocks and the dot mode.

    The head dims are compile-time constants so that, when they are powers of two, the head-dim
    part of every load mask folds away: loads masked along rows only stay vectorized, which
    Triton needs to prefetch them asynchronously (software pipelining).
    """
    return {"D": q_shape[-1], "DV": v_shape[-1], "BLOCK_D": block_dim(q_shape[-1]),
            "BLOCK_DV": block_dim(v_shape[-1]),
            "PRECISION": dot_precision(dtype), **size_buckets(q_shape[2], v_shape[2])}


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                      *, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`sma_kernels.reference.attention_forward` (same contract): the
    kept-key order of ``keep`` (one launch), then :func:`ordered_attention_forward`."""
    order, kept = kept_keys(keep)
    return ordered_attention_forward(q, k, v, order, kept, scale=scale)


def ordered_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              order: torch.Tensor, kept: torch.Tensor, *, scale: float
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of :func:`attention_forward` over a ready kept-key ``order`` (B, L) and count
    ``kept`` (B,), int32 (kept_keys.py), in one launch."""
    batch, heads, num_q, _ = q.shape
    out = torch.empty((batch, heads, num_q, v.shape[3]), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, num_q), dtype=torch.float32, device=q.device)
    launch(_attention_fwd_kernel,
           _forward_static(q.shape, v.shape, q.stride(), k.stride(), v.stride(), out.stride(),
                           order.stride(0), q.dtype, scale),
           Q=q, K=k, V=v, ORDER=order, KEPT=kept, OUT=out, LSE=lse)
    return out, lse


@static_builder
def _forward_static(q_shape: tuple[int, ...], v_shape: tuple[int, ...],
                    q_strides: tuple[int, ...], k_strides: tuple[int, ...],
                    v_strides: tuple[int, ...], out_strides: tuple[int, ...], order_stride: int,
                    dtype: torch.dtype, scale: float) -> Static:
    batch, heads, num_q, _ = q_shape
    # One program per (sample, head, query tile).
    return Static(tiles_grid(batch * heads, num_q, "BLOCK_M"), {
        "stride_order_b": order_stride, **strides("q", q_strides, "bhmd"),
        **strides("k", k_strides, "bhnd"), **strides("v", v_strides, "bhnd"),
        **strides("o", out_strides, "bhmd"), "B": batch, "H": heads, "NQ": num_q,
        "NK": v_shape[2], "qk_scale": scale * LOG2E, **_common_args(q_shape, v_shape, dtype)})


def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       keep: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, *,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton version of :func:`sma_kernels.reference.attention_backward` (same contract): the
    kept-key order of ``keep`` again (one launch), then :func:`ordered_attention_backward`."""
    order, kept = kept_keys(keep)
    return ordered_attention_backward(grad_out, q, k, v, order, kept, out, lse, scale=scale)


def ordered_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                               v: torch.Tensor, order: torch.Tensor, kept: torch.Tensor,
                               out: torch.Tensor, lse: torch.Tensor, *, scale: float
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ, dK and dV of :func:`ordered_attention_forward`, over the same ``order`` and ``kept``,
    in two launches: dQ (which also writes the lse in base 2 and delta), then dK and dV."""
    batch, heads, num_q, _ = q.shape
    lse2, delta = torch.empty((2, batch, heads, num_q), dtype=torch.float32,
                              device=q.device).unbind()
    d_q = torch.empty_like(q)
    d_k = torch.empty_like(k)
    d_v = torch.empty_like(v)
    dq_static, dkdv_static = _backward_statics(
        q.shape, v.shape, q.stride(), k.stride(), v.stride(), grad_out.stride(), out.stride(),
        d_q.stride(), d_k.stride(), d_v.stride(), order.stride(0), q.dtype, scale)
    # What both kernels read: the inputs, the order, the rows' statistics (the dQ kernel's).
    inputs = {"Q": q, "K": k, "V": v, "ORDER": order, "KEPT": kept, "DO": grad_out,
              "LSE2": lse2, "DELTA": delta}
    launch(_attention_bwd_dq_kernel, dq_static, LSE=lse.contiguous(), OUT=out, DQ=d_q, **inputs)
    launch(_attention_bwd_dkdv_kernel, dkdv_static, DK=d_k, DV_OUT=d_v, **inputs)
    return d_q, d_k, d_v


@static_builder
def _backward_statics(q_shape: tuple[int, ...], v_shape: tuple[int, ...],
                      q_strides: tuple[int, ...], k_strides: tuple[int, ...],
                      v_strides: tuple[int, ...], do_strides: tuple[int, ...],
                      out_strides: tuple[int, ...], dq_strides: tuple[int, ...],
                      dk_strides: tuple[int, ...], dv_strides: tuple[int, ...], order_stride: int,
                      dtype: torch.dtype, scale: float) -> tuple[Static, Static]:
    """The Statics of the dQ kernel, one program per (sample, head, query tile), and of the
    dK/dV kernel, one per (sample, head, block of the order)."""
    batch, heads, num_q, _ = q_shape
    num_k = v_shape[2]
    shared = {"stride_order_b": order_stride, **strides("q", q_strides, "bhmd"),
              **strides("k", k_strides, "bhnd"), **strides("v", v_strides, "bhnd"),
              **strides("do", do_strides, "bhmd"), "B": batch, "H": heads, "NQ": num_q,
              "NK": num_k, "scale": scale, "qk_scale": scale * LOG2E,
              **_common_args(q_shape, v_shape, dtype)}
    return (Static(tiles_grid(batch * heads, num_q, "BLOCK_M"),
                   {**strides("o", out_strides, "bhmd"), **strides("dq", dq_strides, "bhmd"),
                    **shared}),
            Static(tiles_grid(batch * heads, num_k, "BLOCK_N"),
                   {**strides("dk", dk_strides, "bhnd"), **strides("dv", dv_strides, "bhnd"),
                    **shared}))
