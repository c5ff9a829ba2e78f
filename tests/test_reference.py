"""The vectorized reference against a deliberately simple per-sample loop, and its invariants.

The loop is :func:`sma_kernels.testing.brute_force_mask`, written from docs/design.md, "The
computation", alone: plain Python over samples, rows and tokens, fp64 softmax per row, and
`sorted` for every selection. It shares no code with `sma_kernels.reference` or
`sma_kernels.plan` beyond reading the plan's random draws.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sma_kernels as sk
from sma_kernels import reference
from sma_kernels.testing import assert_masks_match, brute_force_mask, padded_valid

# Padding on the right or on the left with lengths 0..L, or 70% of the tokens real anywhere.
RANDOM_PADDING = {"random_cuts": True, "density": 0.7}


CASES = [
    # (B, H, Q, L, d, head_mix, mask_self, noise, layout)
    (4, 2, 5, 11, 8, "mean", False, 0.0, "right"),
    (4, 3, 6, 9, 4, "random", False, 0.0, "scattered"),
    (5, 2, 12, 12, 8, "random", True, 0.0, "left"),
    (5, 2, 12, 12, 8, "mean", True, 0.5, "scattered"),
    (3, 1, 1, 7, 16, "mean", False, 0.3, "right"),
    (6, 4, 20, 20, 8, "random", True, 1.0, "scattered"),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("ratio,npq", [(0.3, 2), (0.5, 1), (0.15, 4)])
def test_reference_matches_brute_force(case, ratio, npq):
    batch, heads, num_queries, num_tokens, dim, head_mix, mask_self, noise, layout = case
    g = torch.Generator().manual_seed(zlib.crc32(repr((case, ratio, npq)).encode()))  # the same in every process
    q = torch.randn(batch, heads, num_queries, dim, generator=g) * 2
    k = torch.randn(batch, heads, num_tokens, dim, generator=g)
    valid = padded_valid(batch, num_tokens, g, layout, **RANDOM_PADDING)
    valid[0] = True  # always one full-length sample
    plan = sk.make_plan(batch, num_queries, num_tokens, heads, generator=g)
    options = {"ratio": ratio, "num_per_query": npq, "head_mix": head_mix, "mask_self": mask_self,
               "noise": noise}
    mask = sk.self_guided_mask(q, k, valid, plan=plan, backend="reference", **options)
    expected = brute_force_mask(q, k, valid, plan, **options)
    assert_masks_match(expected, mask, q, k, valid, plan=plan, atol=1e-12, **options)


def test_reference_with_query_valid():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(4, 2, 10, 8, generator=g), torch.randn(4, 2, 10, 8, generator=g)
    valid = padded_valid(4, 10, g, "scattered", **RANDOM_PADDING)
    query_valid = torch.rand(4, 10, generator=g) < 0.5
    query_valid[:, 0] = True
    plan = sk.make_plan(4, 10, 10, 2, generator=g)
    for mask_self in (False, True):
        options = {"ratio": 0.4, "num_per_query": 1, "head_mix": "mean", "mask_self": mask_self, "noise": 0.0}
        mask = sk.self_guided_mask(q, k, valid, query_valid=query_valid, plan=plan,
                                   backend="reference", **options)
        expected = brute_force_mask(q, k, valid, plan, query_valid=query_valid, **options)
        assert_masks_match(expected, mask, q, k, valid, plan=plan, query_valid=query_valid, atol=1e-12,
                           **options)


def test_exact_ties_go_to_the_lower_index():
    # q = 0 makes every logit equal, so every valid token has the same score.
    q, k = torch.zeros(2, 2, 3, 4), torch.randn(2, 2, 10, 4)
    valid = torch.tensor([[True] * 10, [False, True, False, True, True, True, False, True, True, True]])
    mask = sk.self_guided_mask(q, k, valid, ratio=0.3, num_per_query=1, backend="reference",
                               generator=torch.Generator().manual_seed(0))
    assert mask[0].nonzero().flatten().tolist() == [0, 1, 2]
    assert mask[1].nonzero().flatten().tolist() == [1, 3]  # n = 7, k = round(2.1) = 2


def test_reference_scores_sum_to_chosen_row_count():
    # Each chosen row is a distribution over the valid tokens, so scores sum to k_q.
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(3, 2, 6, 8, generator=g), torch.randn(3, 2, 9, 8, generator=g)
    valid = padded_valid(3, 9, g, "scattered", **RANDOM_PADDING)
    valid[:, 0] = True
    chosen = torch.rand(3, 6, generator=g) < 0.5
    head = torch.randint(2, (3, 6), generator=g, dtype=torch.int32)
    for head_mix in ("mean", "random"):
        scores = reference.token_scores(q, k, valid, chosen, head, head_mix=head_mix, scale=0.3)
        assert torch.allclose(scores.masked_fill(~valid, 0).sum(1), chosen.sum(1).float(), atol=1e-5)
        assert bool(torch.isneginf(scores[~valid]).all())


# ----------------------------------------------------------------------------- invariants

@st.composite
def mask_inputs(draw):
    batch = draw(st.integers(1, 6))
    heads = draw(st.integers(1, 3))
    num_tokens = draw(st.integers(1, 24))
    mask_self = draw(st.booleans())
    num_queries = num_tokens if mask_self else draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    layout = draw(st.sampled_from(["right", "left", "scattered"]))
    return {
        "q": torch.randn(batch, heads, num_queries, 8, generator=g),
        "k": torch.randn(batch, heads, num_tokens, 8, generator=g),
        "valid": padded_valid(batch, num_tokens, g, layout, **RANDOM_PADDING),
        "ratio": draw(st.floats(0.01, 0.99)),
        "num_per_query": draw(st.integers(1, 5)),
        "head_mix": draw(st.sampled_from(["mean", "random"])),
        "mask_self": mask_self,
        "noise": draw(st.sampled_from([0.0, 0.25, 0.5, 1.0])),
        "generator": g,
    }


@settings(max_examples=60, deadline=None)
@given(mask_inputs())
def test_mask_invariants(inputs):
    valid, ratio, mask_self = inputs["valid"], inputs["ratio"], inputs["mask_self"]
    batch, heads, num_queries, _ = inputs["q"].shape
    plan = sk.make_plan(batch, num_queries, inputs["k"].shape[2], heads, generator=inputs.pop("generator"))
    mask = sk.self_guided_mask(**inputs, plan=plan, backend="reference")
    assert mask.dtype == torch.bool and mask.shape == valid.shape
    assert not bool((mask & ~valid).any()), "padding was masked"
    for b in range(valid.shape[0]):
        n = int(valid[b].sum())
        expected = 0 if n <= 1 else min(max(round(ratio * n), 1), n - 1)
        assert int(mask[b].sum()) == expected
        if mask_self and n >= 2:
            n_rows = min(max(round(n * ratio / inputs["num_per_query"]), 1), n, expected)
            pool = [i for i in range(valid.shape[1]) if valid[b, i]]
            chosen = sorted(pool, key=lambda i: int(plan.query_rank[b, i]))[:n_rows]
            assert bool(mask[b, chosen].all()), "a chosen query token was not masked"


@pytest.mark.parametrize("mask_self", [False, True])
def test_full_noise_gives_uniform_masks(mask_self):
    """At noise = 1 every valid token is masked with probability k / n.

    4,000 copies of one sample (n = 10 of 12 tokens, k = 3, one chosen row) with strongly structured
    attention:
    each token's masking frequency must be 0.3 within 0.03, about 4 standard deviations
    (sqrt(0.3 * 0.7 / 4000) = 0.0072). The seed is fixed, so the test is deterministic.
    """
    g = torch.Generator().manual_seed(1234)
    copies, num_tokens = 4000, 12
    q = torch.randn(1, 2, num_tokens, 8, generator=g).expand(copies, -1, -1, -1) * 4
    k = torch.randn(1, 2, num_tokens, 8, generator=g).expand(copies, -1, -1, -1)
    valid = torch.ones(copies, num_tokens, dtype=torch.bool)
    valid[:, [2, 7]] = False
    mask = sk.self_guided_mask(q, k, valid, ratio=0.3, num_per_query=3, mask_self=mask_self,
                               noise=1.0, generator=g, backend="reference")
    frequency = mask.float().mean(dim=0)
    assert bool((frequency[~valid[0]] == 0).all())
    assert torch.allclose(frequency[valid[0]], torch.full((10,), 0.3), atol=0.03), frequency
    # The guided mask (noise = 0) on the same inputs is far from uniform: the test can fail.
    guided = sk.self_guided_mask(q, k, valid, ratio=0.3, num_per_query=3, mask_self=mask_self,
                                 noise=0.0, generator=g, backend="reference")
    assert float((guided.float().mean(dim=0)[valid[0]] - 0.3).abs().max()) > 0.1


def test_seed_reproduces_the_mask():
    q, k = torch.randn(4, 2, 6, 8), torch.randn(4, 2, 16, 8)
    masks = [sk.self_guided_mask(q, k, ratio=0.3, num_per_query=2, head_mix="random", noise=0.5,
                                 generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(masks[0], masks[1])


# ----------------------------------------------------------------------------- attention

def test_attention_removes_masked_and_padded_keys():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(3, 2, 4, 8, generator=g, dtype=torch.float64),
               torch.randn(3, 2, 10, 8, generator=g, dtype=torch.float64),
               torch.randn(3, 2, 10, 5, generator=g, dtype=torch.float64))
    valid = padded_valid(3, 10, g, "scattered", **RANDOM_PADDING)
    valid[:, :2] = True
    valid[2] = False  # a sample with no real token gets a zero output
    out, mask = sk.self_guided_attention(q, k, v, valid, ratio=0.3, num_per_query=1, generator=g,
                                         backend="reference")
    keep = valid & ~mask
    for b in range(3):
        cols = keep[b].nonzero().flatten()
        if len(cols) == 0:
            assert bool((out[b] == 0).all())
            continue
        weights = torch.softmax(q[b] @ k[b][:, cols].transpose(-1, -2) * 8 ** -0.5, dim=-1)
        assert torch.allclose(out[b], weights @ v[b][:, cols], atol=1e-12)


def test_attention_backward_formula_matches_autograd():
    g = torch.Generator().manual_seed(6)
    q = torch.randn(2, 2, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(2, 9, generator=g) < 0.6
    keep[1] = False
    out, lse = reference.attention_forward(q, k, v, keep, scale=0.4)
    grad = torch.randn_like(out)
    expected = torch.autograd.grad(out, (q, k, v), grad)
    got = reference.attention_backward(grad, q, k, v, keep, out.detach(), lse.detach(), scale=0.4)
    for e, x in zip(expected, got):
        assert torch.allclose(e, x, atol=1e-12)
