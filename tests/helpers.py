"""Helpers shared by the backend tests."""

from __future__ import annotations

import itertools

import pytest
import torch

from sma_kernels import checks, reference
from sma_kernels.plan import MaskPlan, chosen_rows, mask_counts, take_smallest

MAX_CHOICES = 20_000  # top sets tried per sample before giving up on a band of near-ties


def assert_masks_match(mask: torch.Tensor, ref_mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                       valid: torch.Tensor | None = None, *, plan: MaskPlan, rtol: float = 1e-5,
                       atol: float = 1e-30, **options: object) -> None:
    """Assert that a backend's mask is the reference's under the same plan, up to float near-ties.

    ``options`` are the keyword options of :func:`sma_kernels.self_guided_mask` that both masks were
    made with (ratio, num_per_query, head_mix, query_valid, mask_self, noise, scale).

    Exact equality is expected. A sample may differ only where the reference's cut between the
    ``num_top`` taken scores and the rest falls on a near-tie: free tokens whose reference scores
    lie within ``rtol`` (relative) plus ``atol`` of the score at the cut, where another backend's
    rounding may take a different one. There the mask must equal the selection rule applied to
    some such choice: the tokens clearly above the cut, any of the tied ones, and then the random
    picks of the plan recomputed for that choice. Everything else (counts, chosen rows, forced
    tokens, random picks) must agree exactly.
    """
    assert mask.shape == ref_mask.shape and mask.dtype == torch.bool, (mask.shape, mask.dtype)
    mask, ref_mask = mask.cpu(), ref_mask.cpu()
    if torch.equal(mask, ref_mask):
        return
    call = checks.check_call(q.detach().cpu(), k.detach().cpu(), None if valid is None else valid.cpu(),
                           plan=plan.to("cpu"), generator=None, backend="reference",
                           **{"head_mix": "mean", "query_valid": None, "mask_self": False,
                              "noise": 0.0, "scale": None, **options})
    counts = mask_counts(call.valid, call.query_pool, ratio=call.ratio,
                         num_per_query=call.num_per_query, mask_self=call.mask_self, noise=call.noise)
    chosen = chosen_rows(call.plan, call.query_pool, counts.num_rows)
    scores = reference.token_scores(q.detach().cpu(), k.detach().cpu(), call.valid, chosen,
                                    call.plan.head, head_mix=call.head_mix, scale=call.scale)
    forced = chosen if call.mask_self else torch.zeros_like(call.valid)
    assert torch.equal(ref_mask, reference.select_tokens(scores, call.valid, forced, counts,
                                                         call.plan.token_rank)), \
        "ref_mask is not the reference's mask for these inputs and plan"

    for b in (mask != ref_mask).any(dim=1).nonzero().flatten().tolist():
        free = call.valid[b] & ~forced[b]
        score = scores[b].double()
        num_top = int(counts.num_top[b])
        where = f"sample {b}: mask {mask[b].nonzero().flatten().tolist()}, reference " \
                f"{ref_mask[b].nonzero().flatten().tolist()}"
        assert num_top > 0, f"{where} differ with no token taken by score"
        cut = score[free].sort(descending=True).values[num_top - 1]
        band = free & ((score - cut).abs() <= rtol * cut.abs() + atol)
        above = free & ~band & (score > cut)
        tied = band.nonzero().flatten().tolist()
        need = num_top - int(above.sum())
        choices = itertools.combinations(tied, need)
        for count, choice in enumerate(choices):
            assert count < MAX_CHOICES, f"{where}: {len(tied)} near-tied tokens, too many to check"
            top = above.clone()
            top[list(choice)] = True
            picked = take_smallest(call.plan.token_rank[b:b + 1], (free & ~top)[None],
                                   counts.num_random[b:b + 1])[0]
            if torch.equal(mask[b], forced[b] | top | picked):
                break
        else:
            raise AssertionError(f"{where} differ beyond near-ties: score at the cut {float(cut):.9g}, "
                                 f"near-tied tokens {tied}")


def padded_valid(batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """(B, L) bool cycling through padding layouts: none, right, left, a middle hole, one valid
    token, no valid token, random; so every case covers each layout."""
    valid = torch.ones(batch, length, dtype=torch.bool)
    for b in range(batch):
        kind = b % 7
        if kind == 1:
            valid[b, length * 2 // 3:] = False
        elif kind == 2:
            valid[b, : length // 2] = False
        elif kind == 3:
            valid[b, length // 4: length * 3 // 4] = False
        elif kind == 4:
            valid[b] = False
            valid[b, length // 3] = True
        elif kind == 5:
            valid[b] = False
        elif kind == 6:
            valid[b] = torch.rand(length, generator=generator) < 0.6
    return valid


CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def import_triton_backend():
    """The Triton backend module; skips the calling test module, with the reason, when it is
    unavailable here."""
    backend = pytest.importorskip("sma_kernels.triton")
    if backend.UNAVAILABLE is not None:
        pytest.skip(f"Triton backend unavailable: {backend.UNAVAILABLE}", allow_module_level=True)
    return backend
