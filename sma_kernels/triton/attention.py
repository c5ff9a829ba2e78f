"""Masked attention with the self-guided mask applied: FlashAttention forward and backward.

Forward (one program per (query tile, sample, head)). For a tile of BLOCK_M query rows we stream
the L keys in tiles of BLOCK_N and keep, per row, the running maximum m and the running sum
l = sum exp(S - m), rescaling the output accumulator by exp(m_old - m_new) whenever the maximum
grows (the online softmax of FlashAttention). Key columns that are masked or padded
(``keep`` False) get S = -inf, and their K and V rows are loaded as zeros. The loop runs only
over the key tiles that hold a kept key, read from a per-sample list (key_tiles.py): a tile where
every key is masked or padded is skipped entirely, and the loop body has no "skip this tile"
branch, so Triton prefetches the next K and V tiles while computing. At the end out = acc / l
and lse = m + log(l) per row. ``keep`` is per (sample, token), the same for every row and head,
so a row has no kept key only when its whole sample has none: then out = 0 and lse = +inf, which
makes exp(S - lse) = 0 in the backward instead of NaN (the reference's rule).

Backward (FlashAttention-2 recomputation). With P = exp(S - lse) recomputed tile by tile from the
saved lse, and delta = rowsum(dO * O):
    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dQ = scale dS K,   dK = scale dS^T Q.
Two kernels, so that every output element has exactly one writer and no atomics are needed
(deterministic bits): one program per key tile accumulates dK and dV over all query tiles (a key
tile with no kept key writes zeros at once), one program per query tile accumulates dQ over the
same list of key tiles as the forward.

Dropped keys (``keep`` False: padded or masked) influence no output or gradient, whatever they
hold, NaN and Inf included: the forward and the dQ kernel load their K and V rows as zeros (P is
0 there, but 0 * NaN is not), and the dK/dV kernel, whose rows each depend on one key only,
selects their rows to exactly 0.

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
    INTERPRET,
    LOG2E,
    LOG2E_C,
    TileConfig,
    autotune,
    block_dim,
    dot_precision,
    head_tile,
    load_tile,
    size_buckets,
    strides,
    tile_offsets,
    tiles_grid,
)
from .key_tiles import TILE_SIZES, key_tiles


def _listed(config: TileConfig) -> triton.Config:
    """A config of a kernel that walks a key tile list: also the index of its list, the one for
    its BLOCK_N (see key_tiles.py)."""
    return config.to_triton(TILE_LIST=TILE_SIZES.index(config.block_n))


_FWD_TILES = [TileConfig(32, 32, warps=4, stages=2), TileConfig(64, 64, warps=4, stages=3),
              TileConfig(64, 128, warps=4, stages=3), TileConfig(128, 64, warps=8, stages=3),
              TileConfig(128, 128, warps=8, stages=2)]
_BWD_TILES = [TileConfig(32, 32, warps=4, stages=2), TileConfig(64, 64, warps=4, stages=2),
              TileConfig(64, 128, warps=8, stages=2), TileConfig(128, 64, warps=8, stages=2)]
_FWD_CONFIGS = [_listed(config) for config in _FWD_TILES]
# The dQ loop's K and V loads are masked by the keep flags loaded in the same iteration; at the
# smallest blocks Triton prefetches K only with a third stage for that chain.
_DQ_CONFIGS = [_listed(config) for config in
               [_BWD_TILES[0]._replace(stages=3), *_BWD_TILES[1:]]]
_DKDV_CONFIGS = [config.to_triton() for config in _BWD_TILES]
# Under the interpreter: one config, blocks small enough that the tests still cover several
# tiles, large enough to keep NumPy busy per step.
_INTERPRET_TILES = TileConfig(32, 32, warps=4, stages=1)
_BOUNDS = {"BLOCK_M": "NQ", "BLOCK_N": "NK"}
_KEY = [*BUCKET_ARGS, "BLOCK_D", "BLOCK_DV"]


@triton.jit
def _key_tile(keep_base, k_base, v_base, cols, stride_kn, stride_kd, stride_vn, stride_vd,
              offs_d, offs_dv, NK, D: tl.constexpr, DV: tl.constexpr, DOT_F32: tl.constexpr):
    """keep, K and V of the key tile ``cols``. K and V are loaded as 0 at the keys not kept,
    whatever they hold: there P = 0, and 0 * NaN in P V or dS K would reach every row."""
    keep = tl.load(keep_base + cols, mask=cols < NK, other=0) != 0
    k = load_tile(k_base, cols, keep, stride_kn, offs_d, stride_kd, D, DOT_F32)
    v = load_tile(v_base, cols, keep, stride_vn, offs_dv, stride_vd, DV, DOT_F32)
    return keep, k, v


@triton.jit
def _query_tile(q_base, do_base, lse_base, delta_base, rows, stride_qm, stride_qd, stride_dom,
                stride_dod, offs_d, offs_dv, NQ, D: tl.constexpr, DV: tl.constexpr,
                DOT_F32: tl.constexpr):
    """Q, dO, lse (base 2) and delta of the query tile ``rows``, for the backward."""
    row_ok = rows < NQ
    q = load_tile(q_base, rows, row_ok, stride_qm, offs_d, stride_qd, D, DOT_F32)
    do = load_tile(do_base, rows, row_ok, stride_dom, offs_dv, stride_dod, DV, DOT_F32)
    lse2 = tl.load(lse_base + rows, mask=row_ok, other=float("inf")) * LOG2E_C
    delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    return q, do, lse2, delta


@triton.jit
def _key_tile_list(TILES, TILE_COUNTS, b, stride_tiles_b, stride_tiles_list, stride_counts_b,
                   TILE_LIST: tl.constexpr):
    """Start of sample b's list of non-empty key tiles of size BLOCK_N, and its length."""
    tiles = TILES + b * stride_tiles_b + TILE_LIST * stride_tiles_list
    return tiles, tl.load(TILE_COUNTS + b * stride_counts_b + TILE_LIST)


@autotune(_FWD_CONFIGS, _listed(_INTERPRET_TILES), key=_KEY, bounds=_BOUNDS)
@triton.jit(do_not_specialize=BUCKET_ARGS)
def _attention_fwd_kernel(
    Q, K, V, KEEP, TILES, TILE_COUNTS, OUT, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_keep_b, stride_tiles_b, stride_tiles_list, stride_counts_b,
    B, H, NQ, NK, qk_scale, NQ_BUCKET, NK_BUCKET,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILE_LIST: tl.constexpr,
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
                      stride_qd, D, DOT_F32)
        keep_base = KEEP + b * stride_keep_b
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        tiles, num_tiles = _key_tile_list(TILES, TILE_COUNTS, b, stride_tiles_b,
                                          stride_tiles_list, stride_counts_b, TILE_LIST)
        for i in range(num_tiles):
            cols = tl.load(tiles + i) * BLOCK_N + offs_n
            keep, k, v = _key_tile(keep_base, k_base, v_base, cols, stride_kn, stride_kd,
                                   stride_vn, stride_vd, offs_d, offs_dv, NK, D, DV, DOT_F32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            s = tl.where(keep[None, :], s, float("-inf"))
            # Every listed tile holds a kept key, so m_new is finite from the first tile on and
            # exp2(m_i - m_new) is never NaN.
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        has_key = l_i > 0.0
        out = acc / tl.where(has_key, l_i, 1.0)[:, None]  # acc is 0 where no key was kept
        lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) / LOG2E_C,
                       float("inf"))
        tl.store(OUT + b * stride_ob + h * stride_oh
                 + tile_offsets(rows, stride_om, offs_dv, stride_od),
                 out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
        tl.store(LSE + bh * NQ + rows, lse, mask=row_ok)


@triton.jit
def _probs_and_grad_logits(q, k, v, keep, do, lse2, delta, qk_scale, PRECISION: tl.constexpr):
    """P = exp(S - lse) (0 on dropped keys and rows without keys) and dS = P * (dO V^T - delta)
    for one (query tile, key tile)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p = tl.exp2(s - lse2[:, None])  # lse2 = +inf (no kept key, or a padding row) gives 0
    p = tl.where(keep[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    return p, p * (dp - delta[:, None])


@autotune(_DKDV_CONFIGS, _INTERPRET_TILES.to_triton(), key=_KEY, bounds=_BOUNDS)
@triton.jit(do_not_specialize=BUCKET_ARGS)
def _attention_bwd_dkdv_kernel(
    Q, K, V, KEEP, DO, LSE, DELTA, DK, DV_OUT,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_keep_b,
    B, H, NQ, NK, scale, qk_scale, NQ_BUCKET, NK_BUCKET,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (sample, head, key tile).
    b, h, bh, pid_n = head_tile(H, tl.cdiv(NK, BLOCK_N))
    if b < B:  # the grid's partial last row of programs (see tile_grid) has nothing to do
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        col_ok = cols < NK

        # Unlike _key_tile, K and V are loaded as they are: row j of dK and dV depends only on
        # key j, so whatever a dropped key holds (NaN, Inf) stays in its own rows, which are set
        # to 0 below. (Masking these loads by keep makes Triton stop prefetching Q and dO in the
        # loop.)
        keep = tl.load(KEEP + b * stride_keep_b + cols, mask=col_ok, other=0) != 0
        k = load_tile(K + b * stride_kb + h * stride_kh, cols, col_ok, stride_kn, offs_d,
                      stride_kd, D, DOT_F32)
        v = load_tile(V + b * stride_vb + h * stride_vh, cols, col_ok, stride_vn, offs_dv,
                      stride_vd, DV, DOT_F32)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
        if tl.max(keep.to(tl.int32), axis=0) > 0:  # a tile with no kept key has zero gradient
            q_base = Q + b * stride_qb + h * stride_qh
            do_base = DO + b * stride_dob + h * stride_doh
            lse_base = LSE + bh * NQ
            delta_base = DELTA + bh * NQ
            for start_m in range(0, NQ, BLOCK_M):
                q, do, lse2, delta = _query_tile(q_base, do_base, lse_base, delta_base,
                                                 start_m + offs_m, stride_qm, stride_qd,
                                                 stride_dom, stride_dod, offs_d, offs_dv, NQ, D,
                                                 DV, DOT_F32)
                p, ds = _probs_and_grad_logits(q, k, v, keep, do, lse2, delta, qk_scale,
                                               PRECISION)
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
            # Exact zeros at the dropped keys, selected (their rows may hold NaN), not
            # multiplied.
            dk = tl.where(keep[:, None], dk, 0.0)
            dv = tl.where(keep[:, None], dv, 0.0)
        tl.store(DK + b * stride_dkb + h * stride_dkh
                 + tile_offsets(cols, stride_dkn, offs_d, stride_dkd),
                 (dk * scale).to(DK.dtype.element_ty),
                 mask=col_ok[:, None] & (offs_d[None, :] < D))
        tl.store(DV_OUT + b * stride_dvb + h * stride_dvh
                 + tile_offsets(cols, stride_dvn, offs_dv, stride_dvd),
                 dv.to(DV_OUT.dtype.element_ty), mask=col_ok[:, None] & (offs_dv[None, :] < DV))


@autotune(_DQ_CONFIGS, _listed(_INTERPRET_TILES), key=_KEY, bounds=_BOUNDS)
@triton.jit(do_not_specialize=BUCKET_ARGS)
def _attention_bwd_dq_kernel(
    Q, K, V, KEEP, TILES, TILE_COUNTS, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_keep_b, stride_tiles_b, stride_tiles_list, stride_counts_b,
    B, H, NQ, NK, scale, qk_scale, NQ_BUCKET, NK_BUCKET,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILE_LIST: tl.constexpr,
):
    # One program per (sample, head, query tile).
    b, h, bh, pid_m = head_tile(H, tl.cdiv(NQ, BLOCK_M))
    if b < B:  # the grid's partial last row of programs (see tile_grid) has nothing to do
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)

        q, do, lse2, delta = _query_tile(Q + b * stride_qb + h * stride_qh,
                                         DO + b * stride_dob + h * stride_doh, LSE + bh * NQ,
                                         DELTA + bh * NQ, rows, stride_qm, stride_qd, stride_dom,
                                         stride_dod, offs_d, offs_dv, NQ, D, DV, DOT_F32)
        keep_base = KEEP + b * stride_keep_b
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh

        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        tiles, num_tiles = _key_tile_list(TILES, TILE_COUNTS, b, stride_tiles_b,
                                          stride_tiles_list, stride_counts_b, TILE_LIST)
        for i in range(num_tiles):
            cols = tl.load(tiles + i) * BLOCK_N + offs_n
            keep, k, v = _key_tile(keep_base, k_base, v_base, cols, stride_kn, stride_kd,
                                   stride_vn, stride_vd, offs_d, offs_dv, NK, D, DV, DOT_F32)
            _, ds = _probs_and_grad_logits(q, k, v, keep, do, lse2, delta, qk_scale, PRECISION)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        tl.store(DQ + b * stride_dqb + h * stride_dqh
                 + tile_offsets(rows, stride_dqm, offs_d, stride_dqd),
                 (dq * scale).to(DQ.dtype.element_ty),
                 mask=(rows < NQ)[:, None] & (offs_d[None, :] < D))


def _common_args(q: torch.Tensor, v: torch.Tensor) -> dict:
    """Arguments shared by the three kernels: the autotuning buckets, and as constexprs the head
    dims, their padded blocks and the dot mode.

    The head dims are compile-time constants so that, when they are powers of two, the head-dim
    part of every load mask folds away: loads masked along rows only stay vectorized, which
    Triton needs to prefetch them asynchronously (software pipelining).
    """
    return {"D": q.shape[-1], "DV": v.shape[-1], "BLOCK_D": block_dim(q.shape[-1]),
            "BLOCK_DV": block_dim(v.shape[-1]), "DOT_F32": INTERPRET,
            "PRECISION": dot_precision(q.dtype), **size_buckets(q.shape[2], v.shape[2])}


def _keep_args(keep: torch.Tensor) -> dict:
    """``keep`` as the uint8 KEEP argument, with its sample stride."""
    keep_u8 = keep.contiguous().view(torch.uint8)
    return {"KEEP": keep_u8, "stride_keep_b": keep_u8.stride(0)}


def _tile_args(keep: torch.Tensor) -> dict:
    """The non-empty key tile lists of ``keep`` (uint8) and their strides, as kernel
    arguments."""
    tiles, counts = key_tiles(keep)
    return {"TILES": tiles, "TILE_COUNTS": counts, "stride_tiles_b": tiles.stride(0),
            "stride_tiles_list": tiles.stride(1), "stride_counts_b": counts.stride(0)}


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                      *, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`sma_kernels.reference.attention_forward` (same contract)."""
    batch, heads, num_q, _ = q.shape
    num_k, dim_v = k.shape[2], v.shape[3]
    out = torch.empty((batch, heads, num_q, dim_v), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, num_q), dtype=torch.float32, device=q.device)
    keep_args = _keep_args(keep)
    # One program per (sample, head, query tile).
    _attention_fwd_kernel[tiles_grid(batch * heads, num_q, "BLOCK_M")](
        Q=q, K=k, V=v, OUT=out, LSE=lse, **keep_args, **_tile_args(keep_args["KEEP"]),
        **strides("q", q, "bhmd"), **strides("k", k, "bhnd"), **strides("v", v, "bhnd"),
        **strides("o", out, "bhmd"),
        B=batch, H=heads, NQ=num_q, NK=num_k, qk_scale=scale * LOG2E, **_common_args(q, v))
    return out, lse


def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       keep: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, *,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton version of :func:`sma_kernels.reference.attention_backward` (same contract)."""
    batch, heads, num_q, _ = q.shape
    num_k = k.shape[2]
    # delta = rowsum(dO * O): (B, H, Q) fp32, output-sized, cheaper in PyTorch than a kernel.
    delta = (grad_out.float() * out.float()).sum(dim=-1).contiguous()
    lse = lse.contiguous()
    keep_args = _keep_args(keep)
    tile_args = _tile_args(keep_args["KEEP"])
    d_q = torch.empty_like(q)
    d_k = torch.empty_like(k)
    d_v = torch.empty_like(v)
    # What both kernels read: the inputs, the saved forward statistics and the sizes.
    inputs = {"Q": q, "K": k, "V": v, "DO": grad_out, "LSE": lse, "DELTA": delta, **keep_args,
              **strides("q", q, "bhmd"), **strides("k", k, "bhnd"), **strides("v", v, "bhnd"),
              **strides("do", grad_out, "bhmd"), "B": batch, "H": heads, "NQ": num_q,
              "NK": num_k, "scale": scale, "qk_scale": scale * LOG2E, **_common_args(q, v)}
    # dK and dV: one program per (sample, head, key tile); dQ: per (sample, head, query
    # tile).
    _attention_bwd_dkdv_kernel[tiles_grid(batch * heads, num_k, "BLOCK_N")](
        DK=d_k, DV_OUT=d_v, **strides("dk", d_k, "bhnd"), **strides("dv", d_v, "bhnd"), **inputs)
    _attention_bwd_dq_kernel[tiles_grid(batch * heads, num_q, "BLOCK_M")](
        DQ=d_q, **strides("dq", d_q, "bhmd"), **tile_args, **inputs)
    return d_q, d_k, d_v
