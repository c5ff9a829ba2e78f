"""Token scores of the self-guided mask without the (B, H, Q, L) attention matrix.

score[b, j] = sum over the chosen rows i of A[b, i, j], where A is the softmax over tokens of
S = scale * q.k (padding at -inf), mixed over heads: the mean over heads, or under "random" the
plan's head of row i. Only the k_q chosen rows of each sample matter (the plan picks them), and
the softmax runs over the token axis, so every chosen row needs its full log-sum-exp before any
of its probabilities is known. Two passes, as in the FlashAttention forward:

Pass 1 (one program per (chosen-row tile, sample, head)) gathers BLOCK_M chosen query rows,
streams the keys in BLOCK_N tiles with a running maximum m and running sum
l = sum exp(S - m), and writes lse = m + log(l) per (sample, head, chosen row). No V, no output.

Pass 2 (one program per (sample, token tile)) recomputes S for its BLOCK_N token columns against
each head's chosen rows, forms P = exp(S - lse) and sums it over the rows, times the head weight
(1/H for "mean", 1 for "random"). The program owns its columns and walks heads and rows in a
fixed order, so the sum is deterministic without atomics. Padding columns get -inf, which the
selection never takes.

Non-finite inputs. A (sample, head, chosen row) whose fp32 logits scale * q.k over the sample's
valid tokens are not all finite (a NaN or infinite q or valid k, or a product that overflows)
contributes nothing: pass 1 keeps a per-row flag and writes lse = NaN for such a row, and pass 2
selects its probabilities, and those of padding columns, to 0 with tl.where (never a product
with 0: their S may be NaN or infinite). Padded keys are loaded as 0, whatever k holds there.
So the scores are finite at every valid token.

Which rows a head reads comes from a per-(sample, head) segment of the chosen-row table: under
"mean" every head reads all k_q rows; under "random" the table lists the rows grouped by their
plan head, and head h reads only its own group. Each (row, head) pair the mix uses is computed
exactly once, so "random" costs 1/H of "mean" instead of computing every head and discarding.

Work: k_q * L * d multiply-adds per sample and pass under "random", H times that under "mean",
a fraction k_q / Q of one attention pass; memory is the (B, H, Q) lse buffer and the (B, L)
scores.

The table ((B, Q) int32) and the segments ((B, H, 2) int32, start and end) are written by one
kernel, ``select.prepare``, together with the counts of the selection and the valid token range
(a per-sample int32 metadata row). Logits are scale * q.k in natural units, the fp32 values
the rule tests, and exponentials are exp2((S - m) * log2 e), so no libdevice is needed. (Folding
log2 e into the scale, as attention.py does, would overflow fp32 for finite logits above
FLT_MAX / log2 e.) Pass 1 streams keys only between the sample's first and last valid token, with
no branch in the loop body, so its K loads are software-pipelined (see attention.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    BUCKET_ARGS,
    INTERPRET,
    LOG2E_C,
    META_FIRST,
    META_FIRST_C,
    META_LAST,
    META_LAST_C,
    META_WIDTH,
    META_WIDTH_C,
    TileConfig,
    autotune,
    block_dim,
    dot_precision,
    head_tile,
    load_tile,
    program_tile,
    size_buckets,
    strides,
    tiles_grid,
)

# BLOCK_M chosen rows by BLOCK_N tokens.
_CONFIGS = [config.to_triton() for config in [
    TileConfig(16, 64, warps=4, stages=2), TileConfig(32, 64, warps=4, stages=3),
    TileConfig(64, 64, warps=4, stages=3), TileConfig(64, 128, warps=8, stages=3),
    TileConfig(32, 128, warps=4, stages=3)]]
_INTERPRET_CONFIG = TileConfig(32, 32, warps=4, stages=3).to_triton()
_BOUNDS = {"BLOCK_M": "NQ", "BLOCK_N": "NK"}  # chosen rows are at most Q
_KEY = [*BUCKET_ARGS, "BLOCK_D"]


@autotune(_CONFIGS, _INTERPRET_CONFIG, key=_KEY, bounds=_BOUNDS)
@triton.jit(do_not_specialize=BUCKET_ARGS)
def _chosen_row_lse_kernel(
    Q, K, VALID, META, ROWS, SEGMENTS, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    B, H, NQ, NK, scale, NQ_BUCKET, NK_BUCKET,
    D: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Pass 1: LSE[b, h, r] = log-sum-exp of the table's r-th row over the valid tokens, for the
    rows r of head h's segment; NaN where one of those logits is not finite."""
    # One program per (sample, head, tile of BLOCK_M table entries); (sample, head) is int64.
    b, h, bh, pid_r = head_tile(H, tl.cdiv(NQ, BLOCK_M))
    # Programs of the grid's partial last row (see tile_grid) read an empty segment.
    in_grid = b < B
    seg_start = tl.load(SEGMENTS + 2 * bh, mask=in_grid, other=0)
    seg_end = tl.load(SEGMENTS + 2 * bh + 1, mask=in_grid, other=0)
    tile_start = seg_start + pid_r * BLOCK_M
    if tile_start < seg_end:  # tiles past the segment have nothing to do
        offs_r = tile_start + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_r < seg_end
        rows = tl.load(ROWS + b * NQ + offs_r, mask=row_ok, other=0).to(tl.int64)
        q = load_tile(Q + b * stride_qb + h * stride_qh, rows, row_ok, stride_qm, offs_d,
                      stride_qd, D, DOT_F32)
        k_base = K + b * stride_kb + h * stride_kh
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        bad = tl.zeros([BLOCK_M], tl.int32)  # 1 once the row has a non-finite valid logit
        # Only the tiles from the first to the last valid token: no branch in the loop body,
        # so the K loads are prefetched (see attention.py).
        first = tl.load(META + b * META_WIDTH_C + META_FIRST_C)
        last = tl.load(META + b * META_WIDTH_C + META_LAST_C)
        for start_n in range((first // BLOCK_N) * BLOCK_N, last, BLOCK_N):
            cols = start_n + offs_n
            valid = tl.load(VALID + b * NK + cols, mask=cols < NK, other=0) != 0
            k = load_tile(k_base, cols, valid, stride_kn, offs_d, stride_kd, D, DOT_F32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            finite = tl.abs(s) < float("inf")  # False for NaN too
            bad = tl.maximum(bad, tl.max((valid[None, :] & ~finite).to(tl.int32), axis=1))
            # A non-finite valid logit counts as 0 here (its row's lse is replaced by NaN at the
            # end), so m is finite from the first tile on (it holds the first valid token) and
            # the loop computes no NaN.
            s = tl.where(valid[None, :], tl.where(finite, s, 0.0), float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp2((s - m_new[:, None]) * LOG2E_C)
            l_i = l_i * tl.exp2((m_i - m_new) * LOG2E_C) + tl.sum(p, axis=1)
            m_i = m_new
        # A sample without valid tokens: +inf makes every probability of pass 2 exactly 0.
        lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)) / LOG2E_C,
                       float("inf"))
        lse = tl.where(bad != 0, float("nan"), lse)
        tl.store(LSE + bh * NQ + offs_r, lse, mask=row_ok)


@autotune(_CONFIGS, _INTERPRET_CONFIG, key=_KEY, bounds=_BOUNDS)
@triton.jit(do_not_specialize=BUCKET_ARGS)
def _token_scores_kernel(
    Q, K, VALID, ROWS, SEGMENTS, LSE, SCORES,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    B, H, NQ, NK, scale, head_weight, NQ_BUCKET, NK_BUCKET,
    D: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Pass 2: SCORES[b, j] = head_weight * sum over heads h and the rows of h's segment of the
    probabilities; rows whose lse is NaN add nothing."""
    # One program per (sample, token tile); the sample is int64.
    b, pid_n = program_tile(tl.cdiv(NK, BLOCK_N))
    if b < B:  # the grid's partial last row of programs (see tile_grid) has nothing to do
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        col_ok = cols < NK
        valid = tl.load(VALID + b * NK + cols, mask=col_ok, other=0) != 0

        acc = tl.zeros([BLOCK_N], tl.float32)
        if tl.max(valid.to(tl.int32), axis=0) > 0:
            # Per-head bases advance by pointer increments: 64-bit pointers, no int32 overflow.
            q_head = Q + b * stride_qb
            k_head = K + b * stride_kb
            lse_head = LSE + b * H * NQ
            segment = SEGMENTS + 2 * b * H
            for head in range(H):
                seg_start = tl.load(segment)
                seg_end = tl.load(segment + 1)
                if seg_end > seg_start:  # under "random" a head may have no row: skip its K tile
                    k = load_tile(k_head, cols, valid, stride_kn, offs_d, stride_kd, D, DOT_F32)
                    for start_m in range(seg_start, seg_end, BLOCK_M):
                        offs_r = start_m + offs_m
                        row_ok = offs_r < seg_end
                        rows = tl.load(ROWS + b * NQ + offs_r, mask=row_ok, other=0).to(tl.int64)
                        q = load_tile(q_head, rows, row_ok, stride_qm, offs_d, stride_qd, D,
                                      DOT_F32)
                        # Rows past the segment read lse = +inf: their probabilities are exactly 0.
                        lse = tl.load(lse_head + offs_r, mask=row_ok, other=float("inf"))
                        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
                        p = tl.exp2((s - lse[:, None]) * LOG2E_C)
                        # Padding columns (S is q.0 there, which a NaN q makes NaN) and rows with a
                        # non-finite logit (lse NaN, so the comparison is False) are selected away,
                        # not multiplied by 0.
                        take = valid[None, :] & (lse < float("inf"))[:, None]
                        acc += tl.sum(tl.where(take, p, 0.0), axis=0)
                q_head += stride_qh
                k_head += stride_kh
                lse_head += NQ
                segment += 2
        scores = tl.where(valid, acc * head_weight, float("-inf"))
        tl.store(SCORES + b * NK + cols, scores, mask=col_ok)


def scores_from_rows(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor,
                     segments: torch.Tensor, meta: torch.Tensor, *, head_mix: str,
                     scale: float) -> torch.Tensor:
    """(B, L) fp32 token scores from the chosen-row table ``rows`` (B, Q) int32, each head's
    ``segments`` of it (B, H, 2) int32, and the per-sample ``meta`` (see ``_common.META_*``)."""
    batch, heads, num_q, dim = q.shape
    num_k = k.shape[2]
    lse = torch.empty((batch, heads, num_q), dtype=torch.float32, device=q.device)
    scores = torch.empty((batch, num_k), dtype=torch.float32, device=q.device)
    valid_u8 = valid.contiguous().view(torch.uint8)
    # What both passes read. D is a compile-time constant: see attention.py's _common_args.
    common = {"Q": q, "K": k, "VALID": valid_u8, "ROWS": rows, "SEGMENTS": segments, "LSE": lse,
              **strides("q", q, "bhmd"), **strides("k", k, "bhnd"), "B": batch, "H": heads,
              "NQ": num_q, "NK": num_k, "scale": scale, "D": dim, "BLOCK_D": block_dim(dim),
              "DOT_F32": INTERPRET, "PRECISION": dot_precision(q.dtype),
              **size_buckets(num_q, num_k)}
    # Pass 1: a program per (sample, head, BLOCK_M table entries); pass 2: per (sample, BLOCK_N
    # tokens).
    _chosen_row_lse_kernel[tiles_grid(batch * heads, num_q, "BLOCK_M")](META=meta, **common)
    _token_scores_kernel[tiles_grid(batch, num_k, "BLOCK_N")](
        SCORES=scores, head_weight=1.0 if head_mix == "random" else 1.0 / heads, **common)
    return scores


def token_scores(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, chosen: torch.Tensor,
                 head: torch.Tensor, *, head_mix: str, scale: float) -> torch.Tensor:
    """(B, L) fp32: :func:`sma_kernels.reference.token_scores` (same arguments) in two passes.

    ``chosen`` (B, Q) bool marks the rows to sum, ``head`` (B, Q) int32 is the plan's head per
    row. q and k are fp16, bf16 or fp32. (The fused mask gets the row table and the segments from
    one kernel, ``select.prepare``; this builds them with PyTorch.)
    """
    batch, heads, num_q, _ = q.shape
    num_k = k.shape[2]
    group = head.long() if head_mix == "random" else torch.zeros_like(head, dtype=torch.long)
    index = torch.arange(num_q, device=q.device)
    # Chosen rows first, grouped by head (random) and ascending within a group.
    order = torch.where(chosen, group * num_q + index, heads * num_q + index)
    rows = (order.sort(dim=1).values % num_q).to(torch.int32)
    per_head = torch.zeros((batch, heads), dtype=torch.long, device=q.device)
    per_head.scatter_add_(1, group, chosen.long())
    if head_mix == "random":
        ends = per_head.cumsum(dim=1)
        segments = torch.stack([ends - per_head, ends], dim=2)
    else:  # every head reads all the chosen rows
        segments = torch.zeros((batch, heads, 2), dtype=torch.long, device=q.device)
        segments[:, :, 1] = per_head[:, :1]
    meta = torch.zeros((batch, META_WIDTH), dtype=torch.int32, device=q.device)
    tokens = torch.arange(num_k, device=q.device)
    meta[:, META_FIRST] = torch.where(valid, tokens, num_k).amin(dim=1)
    meta[:, META_LAST] = torch.where(valid, tokens + 1, 0).amax(dim=1)
    return scores_from_rows(q, k, valid, rows, segments.to(torch.int32).contiguous(), meta,
                            head_mix=head_mix, scale=scale)
