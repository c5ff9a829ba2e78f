"""Pure-PyTorch self-guided masking: the oracle for every backend and the CPU fallback.

This is docs/design.md, "The computation", vectorized over the batch (no Python loop over
samples):

1. Logits S = scale * q k^T in fp32, padded key columns at -inf.
2. P = softmax over tokens; all-padding rows give P = 0 rather than NaN.
3. Head mix: mean over heads, or the plan's head mod H per (sample, row).
4. Token score s[b, j] = sum of A[b, i, j] over the chosen rows i (see :mod:`sma_kernels.plan`).
5. Selection: the forced tokens (chosen query tokens under ``mask_self``), then the ``num_top``
   best scores among the other valid tokens (ties to the lower index), then ``num_random`` random
   picks among the valid tokens still free, ordered by the plan's ``token_rank``.
6. Attention with masked and padded key columns removed, autograd through q, k, v, and its
   backward written out (the FlashAttention recomputation) as the oracle of the kernels' backward.

It materializes the (B, H, Q, L) probabilities on purpose: it is the readable statement of the
math and the "vectorized" baseline of the benchmarks. The kernels never build that tensor.
"""

from __future__ import annotations

import torch

from .backends import FLOAT_DTYPES, Backend
from .plan import (
    MaskCounts,
    MaskPlan,
    chosen_rows,
    kept_tokens,
    mask_counts,
    materialized_flags,
    restrict_query_pool,
    take_smallest,
)


def token_scores(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, chosen: torch.Tensor,
                 head: torch.Tensor, *, head_mix: str, scale: float) -> torch.Tensor:
    """(B, L) fp32: summed attention of the chosen rows on each token; -inf at padding.

    Under ``head_mix="random"`` row i reads head ``head[b, i] mod H`` (floor modulo, so any int32
    names a head). The non-finite rule: a (head, row) whose logits over the real tokens are not
    all finite (NaN or Inf in q or k, or an fp32 overflow) contributes nothing, so the scores of
    real tokens are always finite. Padded keys never reach a logit, whatever they hold.
    """
    real = valid[:, None, None, :]
    logits = scale * torch.matmul(q.float(), kept_rows(k, valid).float().transpose(-1, -2))
    poisoned = (real & ~torch.isfinite(logits)).any(dim=-1, keepdim=True)  # (B, H, Q, 1)
    logits = logits.masked_fill(~real, float("-inf"))
    # Rows with no real token (softmax of all -inf is NaN) and poisoned rows give 0.
    probs = torch.softmax(logits, dim=-1).masked_fill(poisoned, 0.0).nan_to_num(0.0)
    if head_mix == "mean":
        mixed = probs.mean(dim=1)
    else:
        index = head.remainder(probs.shape[1]).long()[:, None, :, None].expand(-1, 1, -1, probs.shape[-1])
        mixed = probs.gather(1, index).squeeze(1)
    scores = torch.einsum("bq,bql->bl", chosen.float(), mixed)
    return scores.masked_fill(~valid, float("-inf"))


def select_tokens(scores: torch.Tensor, valid: torch.Tensor, forced: torch.Tensor,
                  counts: MaskCounts, token_rank: torch.Tensor) -> torch.Tensor:
    """(B, L) bool mask: forced tokens, then the top scores, then the random picks."""
    free = valid & ~forced
    # A stable descending sort keeps equal scores in index order: ties go to the lower index.
    order = scores.masked_fill(~free, float("-inf")).sort(dim=1, descending=True, stable=True).indices
    width = scores.shape[1]
    top_sorted = torch.arange(width, device=scores.device)[None, :] < counts.num_top[:, None]
    top = torch.zeros_like(valid).scatter(1, order, top_sorted)
    picked = take_smallest(token_rank, free & ~top, counts.num_random)
    return forced | top | picked


def self_guided_mask(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None,
                     query_pool: torch.Tensor | None, plan: MaskPlan, *, ratio: float,
                     num_per_query: int, head_mix: str, mask_self: bool, noise: float,
                     scale: float) -> torch.Tensor:
    """(B, L) bool, True = masked. Arguments are already checked and completed by the API.

    This is the contract of every backend's ``self_guided_mask`` (docs/design.md, "Backends"):
    ``valid`` (B, L) bool, None when every token is valid; ``query_pool`` (B, Q) bool is the
    caller's ``query_valid`` or its default (None: every row), which the backend intersects with
    ``valid`` under ``mask_self`` itself; the plan's ranks are any int32 values, ordered by
    (rank, index), and its heads any int32 values, read mod H.
    """
    valid, query_pool = materialized_flags(q, k, valid, query_pool)
    query_pool = restrict_query_pool(valid, query_pool, mask_self)
    counts = mask_counts(valid, query_pool, ratio=ratio, num_per_query=num_per_query,
                         mask_self=mask_self, noise=noise)
    chosen = chosen_rows(plan, query_pool, counts.num_rows)
    with torch.no_grad():
        scores = token_scores(q.detach(), k.detach(), valid, chosen, plan.head,
                              head_mix=head_mix, scale=scale)
    forced = chosen if mask_self else torch.zeros_like(valid)
    return select_tokens(scores, valid, forced, counts, plan.token_rank)


def kept_rows(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, H, L, d) ``x`` with the rows of tokens not kept set to 0: whatever they held (NaN and
    Inf included) then cannot reach an output or a gradient (0 * NaN would)."""
    return x.masked_fill(~keep[:, None, :, None], 0)


def _masked_logits(q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    # Half inputs are computed in fp32, so the oracle is never less accurate than the kernels.
    work = torch.promote_types(q.dtype, torch.float32)
    logits = scale * torch.matmul(q.to(work), kept_rows(k, keep).to(work).transpose(-1, -2))
    return logits.masked_fill(~keep[:, None, None, :], float("-inf"))


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                      *, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale * q k^T on the ``keep`` key columns) v and the row log-sum-exp.

    Returns ``out`` (B, H, Q, dv) in q's dtype and ``lse`` (B, H, Q) in fp32 (fp64 for fp64
    inputs). A sample with no key kept gets ``out = 0`` and ``lse = +inf``, so that
    exp(S - lse) = 0 in the backward instead of NaN. Differentiable as plain PyTorch.
    """
    logits = _masked_logits(q, k, keep, scale)
    lse = torch.logsumexp(logits, dim=-1)
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))
    probs = torch.exp(logits - lse[..., None])
    out = torch.matmul(probs, kept_rows(v, keep).to(probs.dtype))
    return out.to(q.dtype), lse


def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       keep: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, *,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of :func:`attention_forward`, by the FlashAttention recomputation.

    P = exp(S - lse); dV = P^T dO; dP = dO V^T; dS = P * (dP - rowsum(dO * O)); dQ = scale dS K;
    dK = scale dS^T Q. This is the math every backend's backward must reproduce.
    """
    work = lse.dtype
    probs = torch.exp(_masked_logits(q, k, keep, scale).to(work) - lse[..., None])
    d_out = grad_out.to(work)
    d_v = torch.matmul(probs.transpose(-1, -2), d_out)
    d_probs = torch.matmul(d_out, kept_rows(v, keep).to(work).transpose(-1, -2))
    delta = (d_out * out.to(work)).sum(dim=-1, keepdim=True)
    d_logits = probs * (d_probs - delta)
    d_q = scale * torch.matmul(d_logits, kept_rows(k, keep).to(work))
    d_k = scale * torch.matmul(d_logits.transpose(-1, -2), q.to(work))
    return d_q.to(q.dtype), d_k.to(k.dtype), d_v.to(v.dtype)


def self_guided_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          valid: torch.Tensor | None, query_pool: torch.Tensor | None,
                          plan: MaskPlan, *, ratio: float, num_per_query: int, head_mix: str,
                          mask_self: bool, noise: float,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, Q, dv), mask (B, L)): the first SMA layer with its own mask applied."""
    mask = self_guided_mask(q, k, valid, query_pool, plan, ratio=ratio, num_per_query=num_per_query,
                            head_mix=head_mix, mask_self=mask_self, noise=noise, scale=scale)
    out, _ = attention_forward(q, k, v, kept_tokens(valid, mask), scale=scale)
    return out, mask


BACKEND = Backend(name="reference", devices=None, auto_devices=None, dtypes=FLOAT_DTYPES,
                  self_guided_mask=self_guided_mask, attention_forward=attention_forward,
                  attention_backward=attention_backward)
