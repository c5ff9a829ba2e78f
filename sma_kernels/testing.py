"""The testing toolkit of sma-kernels: inputs, oracles and comparisons for tests and benchmarks.

Every check of a backend asks the same few questions, and this module answers each once, with
public functions of the package only (see docs/design.md, "Testing"):

* :func:`padded_valid`: ``valid`` masks in named padding layouts (none, right, left, a middle
  hole, scattered, an empty sample, a single real token), so that every case covers each one.
* :func:`assert_masks_match` / :func:`compare_masks`: a backend's mask is the reference's under
  the same plan, exactly, except where the reference's cut between the tokens taken by score and
  the rest falls on a float near-tie. There any choice of the near-tied tokens is allowed, with
  the plan's random picks recomputed for that choice.
* :func:`assert_close_to_fp64`: the FlashAttention accuracy rule for a float result: its error
  against a float64 oracle is at most ``factor`` times the error of plain PyTorch computed in the
  result's own dtype, plus a small ``atol``; :func:`assert_attention_close_to_fp64` applies it
  to an attention's output and gradients, against the reference's.
* :func:`brute_force_mask`: the self-guided mask as a per-sample Python loop, written from
  docs/design.md, "The computation", alone: the oracle of the vectorized reference.

It imports only torch and the package, so a downstream project can check its own integration
(or another backend) with it, without the project's test dependencies.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import reference
from .plan import (
    MaskCounts,
    MaskPlan,
    chosen_rows,
    default_query_pool,
    mask_counts,
    take_smallest,
)

__all__ = ["LAYOUTS", "MAX_CHOICES", "MaskComparison", "Selection",
           "assert_attention_close_to_fp64", "assert_close_to_fp64", "assert_masks_match",
           "brute_force_mask", "compare_masks", "padded_valid", "reference_selection",
           "selection_from_scores"]

LAYOUTS = ("none", "right", "left", "middle", "single", "empty", "scattered")
"""The padding layouts of :func:`padded_valid`, in the order it cycles through them."""

MAX_CHOICES = 20_000
"""Choices of near-tied tokens tried per sample before :func:`compare_masks` gives up."""


# ----------------------------------------------------------------------------- padding

def padded_valid(batch: int, length: int, generator: torch.Generator | None = None,
                 layouts: str | Sequence[str] = LAYOUTS, *, random_cuts: bool = False,
                 density: float = 0.6) -> torch.Tensor:
    """(B, L) bool on the CPU, True = real token: sample ``b`` has layout ``layouts[b % len]``.

    The layouts (:data:`LAYOUTS`), with their fixed boundaries:

    * ``"none"``: every token real.
    * ``"right"``: real tokens ``[0, 2L/3)``, padding after them.
    * ``"left"``: padding ``[0, L/2)``, real tokens after it.
    * ``"middle"``: a hole of padding ``[L/4, 3L/4)`` between real tokens.
    * ``"single"``: one real token, at ``L/3``.
    * ``"empty"``: no real token.
    * ``"scattered"``: each token real with probability ``density``.

    With ``random_cuts`` each sample draws a cut ``c`` uniformly from 0..L instead, and the
    boundaries become ``[0, c)`` (right), ``[0, c)`` padded (left), ``[c/2, c)`` (middle) and
    token ``c % L`` (single): the right and left layouts then have every length 0..L.

    The default cycles through all seven, so a batch of 7 covers each layout once; with a large
    L the fixed middle hole spans whole blocks of keys. A string gives every sample that layout.
    """
    names = (layouts,) if isinstance(layouts, str) else tuple(layouts)
    unknown = sorted(set(names) - set(LAYOUTS))
    if not names or unknown:
        raise ValueError(f"padded_valid: layouts must be names from {LAYOUTS}, got {list(names)}")
    valid = torch.ones(batch, length, dtype=torch.bool)
    for b in range(batch):
        layout = names[b % len(names)]
        if random_cuts:  # drawn for every sample, so each sample's draws follow in order
            cut = int(torch.randint(length + 1, (1,), generator=generator))
            right_end, left_start, hole, single = cut, cut, (cut // 2, cut), cut % length
        else:
            right_end, left_start, single = length * 2 // 3, length // 2, length // 3
            hole = (length // 4, length * 3 // 4)
        if layout == "right":
            valid[b, right_end:] = False
        elif layout == "left":
            valid[b, :left_start] = False
        elif layout == "middle":
            valid[b, hole[0]:hole[1]] = False
        elif layout == "single":
            valid[b] = False
            valid[b, single] = True
        elif layout == "empty":
            valid[b] = False
        elif layout == "scattered":
            valid[b] = torch.rand(length, generator=generator) < density
    return valid


# ----------------------------------------------------------------------------- masks

class Selection(NamedTuple):
    """What the reference's selection step works from (docs/design.md, "The computation"):
    the arguments of :func:`sma_kernels.reference.select_tokens`, and the chosen rows."""

    scores: torch.Tensor  # (B, L) token scores, -inf at padding
    valid: torch.Tensor  # (B, L) bool, True = real token
    forced: torch.Tensor  # (B, L) bool: the chosen query tokens under mask_self, else none
    counts: MaskCounts
    token_rank: torch.Tensor  # (B, L) priorities of the random picks (smallest first)
    chosen: torch.Tensor  # (B, Q) bool: the query rows summed into the scores

    def mask(self) -> torch.Tensor:
        """(B, L) bool: the reference's mask for this selection."""
        return reference.select_tokens(self.scores, self.valid, self.forced, self.counts,
                                       self.token_rank)

    def to(self, device: torch.device | str) -> Selection:
        """This selection with every tensor on ``device``."""
        counts = MaskCounts(*(t.to(device) for t in self.counts))
        return Selection(self.scores.to(device), self.valid.to(device), self.forced.to(device),
                         counts, self.token_rank.to(device), self.chosen.to(device))


def reference_selection(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None = None, *,
                        plan: MaskPlan, ratio: float, num_per_query: int, head_mix: str = "mean",
                        query_valid: torch.Tensor | None = None, mask_self: bool = False,
                        noise: float = 0.0, scale: float | None = None) -> Selection:
    """The reference's :class:`Selection` for the arguments of
    :func:`sma_kernels.self_guided_mask`, on q's device.

    Defaults are those of the public op: every token real, the query pool of
    :func:`sma_kernels.plan.default_query_pool`, ``scale = d ** -0.5``. The plan's ranks may be
    any int32 values (equal ranks go to the lower index), as in the op.
    """
    q, k = q.detach(), k.detach()
    batch, _, num_queries, dim = q.shape
    if valid is None:
        valid = torch.ones(batch, k.shape[2], dtype=torch.bool, device=q.device)
    plan = MaskPlan(*plan)
    query_pool = default_query_pool(valid, num_queries, query_valid, mask_self)
    counts = mask_counts(valid, query_pool, ratio=ratio, num_per_query=num_per_query,
                         mask_self=mask_self, noise=noise)
    chosen = chosen_rows(plan, query_pool, counts.num_rows)
    with torch.no_grad():
        scores = reference.token_scores(q, k, valid, chosen, plan.head, head_mix=head_mix,
                                        scale=dim ** -0.5 if scale is None else scale)
    forced = chosen if mask_self else torch.zeros_like(valid)
    return Selection(scores, valid, forced, counts, plan.token_rank, chosen)


def selection_from_scores(ref_mask: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor,
                          forced: torch.Tensor) -> Selection:
    """The :class:`Selection` of a reference mask made with ``noise = 0``, known only by its
    scores: every masked token that is not forced was taken by score, none at random.

    For callers that keep the reference's scores but not its inputs (the benchmark);
    ``chosen`` is left empty.
    """
    num_forced = forced.sum(dim=1)
    none = torch.zeros_like(num_forced)
    counts = MaskCounts(ref_mask.sum(dim=1), num_forced, num_forced,
                        (ref_mask & ~forced).sum(dim=1), none)
    token_rank = torch.zeros(valid.shape, dtype=torch.int32, device=valid.device)
    return Selection(scores, valid, forced, counts, token_rank, valid[:, :0])


@dataclass(frozen=True)
class MaskComparison:
    """The verdict of :func:`compare_masks`."""

    exact: bool  # the two masks are equal
    problem: str | None  # why the mask is not the reference's up to near-ties; None if it is
    near_tie_samples: tuple[int, ...]  # samples that differ by an allowed near-tie choice
    swaps: int  # tokens masked in the mask but not in the reference (one per near-tie swap)

    @property
    def ok(self) -> bool:
        """Whether the mask is the reference's up to float near-ties."""
        return self.problem is None


def compare_masks(mask: torch.Tensor, ref_mask: torch.Tensor, selection: Selection, *,
                  rtol: float = 1e-5, atol: float = 1e-30) -> MaskComparison:
    """Compare a mask with the reference's mask ``ref_mask``, which ``selection`` makes.

    Exact equality is expected. A sample may differ only where the reference's cut between the
    ``num_top`` taken scores and the rest falls on a near-tie: free tokens (real, not forced)
    whose scores lie within ``rtol`` (relative) plus ``atol`` of the score at the cut, where
    another backend's rounding may take a different one. There the mask must equal the selection
    rule applied to some such choice: the tokens clearly above the cut, any of the tied ones,
    then the random picks of the plan recomputed for that choice. Everything else (counts,
    forced tokens, random picks) must agree exactly. Never raises on a mismatch: the returned
    :class:`MaskComparison` says what is wrong.
    """
    if mask.shape != ref_mask.shape or mask.dtype != torch.bool:
        return MaskComparison(False, f"mask must be bool {tuple(ref_mask.shape)}, got {mask.dtype} "
                                     f"{tuple(mask.shape)}", (), 0)
    if torch.equal(mask, ref_mask):
        return MaskComparison(True, None, (), 0)
    mask, ref_mask, selection = mask.cpu(), ref_mask.cpu(), selection.to("cpu")
    differ = mask != ref_mask
    samples = differ.any(dim=1).nonzero().flatten().tolist()
    for b in samples:
        problem = _sample_problem(b, mask, ref_mask, selection, rtol, atol)
        if problem is not None:
            return MaskComparison(False, problem, (), 0)
    return MaskComparison(False, None, tuple(samples), int((mask & ~ref_mask).sum()))


def _sample_problem(b: int, mask: torch.Tensor, ref_mask: torch.Tensor, selection: Selection,
                    rtol: float, atol: float) -> str | None:
    """Why sample ``b`` of ``mask`` is no near-tie choice of the reference's, or None."""
    valid, forced, counts = selection.valid[b], selection.forced[b], selection.counts
    free = valid & ~forced
    score = selection.scores[b].double()
    num_top, num_random = int(counts.num_top[b]), int(counts.num_random[b])
    where = (f"sample {b}: mask {mask[b].nonzero().flatten().tolist()}, reference "
             f"{ref_mask[b].nonzero().flatten().tolist()}")
    if num_top <= 0:
        return f"{where} differ with no token taken by score"
    cut = score[free].sort(descending=True).values[num_top - 1]
    band = free & ((score - cut).abs() <= rtol * cut.abs() + atol)
    above = free & ~band & (score > cut)
    tied = band.nonzero().flatten().tolist()
    # The taken tokens are part of the result, so only near-tied tokens of the mask can be them.
    candidates = [j for j in tied if mask[b, j]]
    need = num_top - int(above.sum())
    for count, choice in enumerate(itertools.combinations(candidates, need)):
        if count >= MAX_CHOICES:
            return f"{where}: {len(tied)} near-tied tokens, too many to check"
        top = above.clone()
        top[list(choice)] = True
        picked = take_smallest(selection.token_rank[b:b + 1], (free & ~top)[None],
                               counts.num_random[b:b + 1])[0]
        if torch.equal(mask[b], forced | top | picked):
            return None
    why = f"score at the cut {float(cut):.9g}, near-tied tokens {tied}"
    for j in (mask[b] != ref_mask[b]).nonzero().flatten().tolist():
        if not valid[j]:
            return f"{where} differ beyond near-ties: token {j} is padding"
        if forced[j]:
            return f"{where} differ beyond near-ties: token {j} is forced (a chosen query token)"
        if not band[j] and num_random == 0:
            return (f"{where} differ beyond near-ties: token {j} is not a near-tie (reference score "
                    f"{float(score[j]):.9g}; {why})")
    return f"{where} differ beyond near-ties: {why}"


def assert_masks_match(mask: torch.Tensor, ref_mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                       valid: torch.Tensor | None = None, *, plan: MaskPlan, ratio: float,
                       num_per_query: int, head_mix: str = "mean",
                       query_valid: torch.Tensor | None = None, mask_self: bool = False,
                       noise: float = 0.0, scale: float | None = None, rtol: float = 1e-5,
                       atol: float = 1e-30) -> None:
    """Assert that a backend's mask is the reference's under the same plan, up to float near-ties.

    The keyword options are those of :func:`sma_kernels.self_guided_mask` that both masks were
    made with. ``ref_mask`` must be the reference's mask for them (checked); the rule is that of
    :func:`compare_masks`, on the CPU. Raises AssertionError with the first sample that breaks it.
    """
    assert mask.shape == ref_mask.shape and mask.dtype == torch.bool, (mask.shape, mask.dtype)
    mask, ref_mask = mask.cpu(), ref_mask.cpu()
    if torch.equal(mask, ref_mask):
        return
    selection = reference_selection(
        q.cpu(), k.cpu(), None if valid is None else valid.cpu(), plan=plan.to("cpu"), ratio=ratio,
        num_per_query=num_per_query, head_mix=head_mix, mask_self=mask_self, noise=noise, scale=scale,
        query_valid=None if query_valid is None else query_valid.cpu())
    assert torch.equal(ref_mask, selection.mask()), \
        "ref_mask is not the reference's mask for these inputs and plan"
    result = compare_masks(mask, ref_mask, selection, rtol=rtol, atol=atol)
    if not result.ok:
        raise AssertionError(result.problem)


# ----------------------------------------------------------------------------- accuracy

def assert_close_to_fp64(got: torch.Tensor, ref_same_dtype: torch.Tensor, ref_fp64: torch.Tensor, *,
                         factor: float = 2.0, atol: float = 0.0, name: str = "result") -> None:
    """The FlashAttention accuracy rule: ``err(got) <= factor * err(ref_same_dtype) + atol``.

    ``err(x)`` is the largest absolute difference between ``x`` and ``ref_fp64``, the same
    computation in float64; ``ref_same_dtype`` is plain PyTorch computing it in ``got``'s dtype,
    so a kernel may lose at most ``factor`` times the precision that the dtype itself loses.
    ``atol`` (absolute) covers results that plain PyTorch happens to get exactly right; scale it
    with the magnitude of ``ref_fp64``. A NaN where the oracle is finite always fails.
    """
    assert got.shape == ref_fp64.shape == ref_same_dtype.shape, \
        f"{name}: shapes {tuple(got.shape)}, {tuple(ref_same_dtype.shape)}, {tuple(ref_fp64.shape)}"
    err, plain_err = _max_abs_error(got, ref_fp64), _max_abs_error(ref_same_dtype, ref_fp64)
    assert err <= factor * plain_err + atol, \
        f"{name}: error {err:.3g} vs PyTorch {plain_err:.3g} (allowed {factor:g}x + {atol:.3g})"


def assert_attention_close_to_fp64(got: Sequence[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                                   v: torch.Tensor, grad_out: torch.Tensor, keep: torch.Tensor, *,
                                   scale: float, atol: float = 0.0) -> None:
    """:func:`assert_close_to_fp64` for ``got`` = (out, dq, dk, dv): the output of attention of
    ``q``, ``k``, ``v`` over the ``keep`` (B, L) keys and its gradients for ``grad_out``. The
    oracles are the reference's, in float64 and in q's dtype."""
    oracles = {}
    for dtype in (torch.float64, q.dtype):
        inputs = [x.detach().to(dtype) for x in (q, k, v)]
        out, lse = reference.attention_forward(*inputs, keep, scale=scale)
        oracles[dtype] = (out, *reference.attention_backward(grad_out.to(dtype), *inputs, keep,
                                                             out, lse, scale=scale))
    for name, value, plain, exact in zip(("out", "dq", "dk", "dv"), got, oracles[q.dtype],
                                         oracles[torch.float64]):
        assert_close_to_fp64(value, plain, exact, atol=atol, name=name)


def _max_abs_error(x: torch.Tensor, oracle: torch.Tensor) -> float:
    if x.numel() == 0:
        return 0.0
    return float((x.detach().double() - oracle.detach().double()).abs().max())


# ----------------------------------------------------------------------------- loop oracle

def brute_force_mask(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, plan: MaskPlan, *,
                     ratio: float, num_per_query: int, head_mix: str, mask_self: bool, noise: float,
                     query_valid: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """(B, L) bool: the self-guided mask by a deliberately simple loop, the oracle of the reference.

    Written from docs/design.md, "The computation", alone: plain Python over samples, rows and
    tokens, an fp64 softmax per row, and ``sorted`` for every selection (stable, so equal ranks
    and scores go to the lower index). It shares no code with :mod:`sma_kernels.reference` or
    :mod:`sma_kernels.plan`, and reads only the plan's random draws. Non-finite inputs follow
    docs/design.md, "Rules at the edges": a (head, row) whose fp32 logits over the real tokens are
    not all finite adds nothing to the scores.
    """
    batch, heads, num_queries, dim = q.shape
    num_tokens = k.shape[2]
    scale = dim ** -0.5 if scale is None else scale
    mask = torch.zeros(batch, num_tokens, dtype=torch.bool)
    for b in range(batch):
        tokens = [j for j in range(num_tokens) if valid[b, j]]
        n = len(tokens)
        if query_valid is not None:
            pool = [i for i in range(num_queries) if query_valid[b, i] and (not mask_self or valid[b, i])]
        elif mask_self:
            pool = list(tokens)
        else:
            pool = list(range(num_queries))
        n_masked = 0 if n <= 1 else min(max(round(ratio * n), 1), n - 1)
        n_rows = min(max(round(n * ratio / num_per_query), 1), len(pool))
        if mask_self:
            n_rows = min(n_rows, n_masked)
        rows = sorted(pool, key=lambda i: int(plan.query_rank[b, i]))[:n_rows]

        scores = {j: 0.0 for j in tokens}
        for i in rows if tokens else []:
            mix_heads = range(heads) if head_mix == "mean" else [int(plan.head[b, i])]
            for h in mix_heads:
                if not torch.isfinite(scale * (k[b, h, tokens].float() @ q[b, h, i].float())).all():
                    continue  # the non-finite rule, on the fp32 logits the backends compute
                logits = {j: scale * float(q[b, h, i].double() @ k[b, h, j].double()) for j in tokens}
                top = max(logits.values())
                total = sum(math.exp(s - top) for s in logits.values())
                for j in tokens:
                    scores[j] += math.exp(logits[j] - top) / total / len(mix_heads)

        forced = set(rows) if mask_self else set()
        n_random = round((n_masked - len(forced)) * noise)
        n_top = n_masked - len(forced) - n_random
        free = [j for j in tokens if j not in forced]
        top = sorted(free, key=lambda j: (-scores[j], j))[:n_top]
        rest = [j for j in free if j not in top]
        picked = sorted(rest, key=lambda j: int(plan.token_rank[b, j]))[:n_random]
        for j in [*forced, *top, *picked]:
            mask[b, j] = True
    return mask
