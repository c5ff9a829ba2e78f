"""The testing toolkit (sma_kernels.testing) checked itself: each of its checks can fail."""

from __future__ import annotations

import pytest
import torch

import sma_kernels as sk
from sma_kernels import reference
from sma_kernels.testing import (
    LAYOUTS,
    assert_attention_close_to_fp64,
    assert_close_to_fp64,
    assert_masks_match,
    brute_force_mask,
    compare_masks,
    padded_valid,
    reference_selection,
)


def mask_of(length: int, *tokens: int) -> torch.Tensor:
    mask = torch.zeros(1, length, dtype=torch.bool)
    mask[0, list(tokens)] = True
    return mask


# ----------------------------------------------------------------------------- mask comparison

def test_assert_masks_match_tolerates_only_near_ties() -> None:
    g = torch.Generator().manual_seed(6)
    batch, heads, queries, length, dim = 1, 1, 2, 12, 4
    k = torch.randn(batch, heads, length, dim, generator=g)
    valid = torch.ones(batch, length, dtype=torch.bool)
    plan = sk.make_plan(batch, queries, length, heads, generator=g)
    options = {"ratio": 0.25, "num_per_query": 1}  # k = 3, all taken by score

    tied = torch.zeros(batch, heads, queries, dim)  # every score equal: tokens 0, 1, 2 by index
    ref = sk.self_guided_mask(tied, k, valid, plan=plan, backend="reference", **options)
    assert torch.equal(ref, mask_of(length, 0, 1, 2))
    assert_masks_match(mask_of(length, 0, 1, 7), ref, tied, k, valid, plan=plan, **options)
    with pytest.raises(AssertionError):
        assert_masks_match(mask_of(length, 0, 1), ref, tied, k, valid, plan=plan, **options)

    distinct = torch.randn(batch, heads, queries, dim, generator=g) * 3
    ref = sk.self_guided_mask(distinct, k, valid, plan=plan, backend="reference", **options)
    scores_low_first = [int(j) for j in (~ref[0]).nonzero().flatten()]
    swapped = ref.clone()
    swapped[0, ref[0].nonzero().flatten()[0]] = False
    swapped[0, scores_low_first[0]] = True
    with pytest.raises(AssertionError):
        assert_masks_match(swapped, ref, distinct, k, valid, plan=plan, **options)


def test_compare_masks_reports_instead_of_raising() -> None:
    g = torch.Generator().manual_seed(1)
    length = 10
    q, k = torch.randn(1, 2, 3, 8, generator=g) * 3, torch.randn(1, 2, length, 8, generator=g)
    plan = sk.make_plan(1, 3, length, 2, generator=g)
    options = {"ratio": 0.3, "num_per_query": 1}
    selection = reference_selection(q, k, plan=plan, **options)
    ref = selection.mask()
    assert torch.equal(ref, sk.self_guided_mask(q, k, plan=plan, backend="reference", **options))

    same = compare_masks(ref.clone(), ref, selection)
    assert same.ok and same.exact and same.swaps == 0
    # Swap the weakest taken token for the strongest left out: far from a tie at these scores.
    scores = selection.scores[0]
    weakest = int(scores.masked_fill(~ref[0], float("inf")).argmin())
    strongest = int(scores.masked_fill(ref[0], float("-inf")).argmax())
    wrong = ref.clone()
    wrong[0, weakest], wrong[0, strongest] = False, True
    result = compare_masks(wrong, ref, selection)
    assert not result.ok and "not a near-tie" in result.problem
    # A near-tie swap is accepted when the cut is made a tie.
    tied = selection._replace(scores=torch.where(wrong[0] | ref[0], scores[weakest], scores)[None])
    result = compare_masks(wrong, ref, tied)
    assert result.ok and not result.exact and result.swaps == 1 and result.near_tie_samples == (0,)
    assert not compare_masks(ref[:, :-1], ref, selection).ok  # wrong shape


def test_near_tie_choices_recompute_the_random_picks() -> None:
    # Every score tied (q = 0): 3 tokens by score, then 3 random picks by the plan's token ranks.
    length = 12
    k = torch.randn(1, 1, length, 4, generator=torch.Generator().manual_seed(2))
    q = torch.zeros(1, 1, 2, 4)
    plan = sk.make_plan(1, 2, length, 1, generator=torch.Generator().manual_seed(3))
    options = {"ratio": 0.5, "num_per_query": 1, "noise": 0.5, "plan": plan}
    ref = sk.self_guided_mask(q, k, backend="reference", **options)
    by_rank = sorted(range(length), key=lambda j: int(plan.token_rank[0, j]))

    top = [9, 10, 11]  # another choice among the tied tokens ...
    picks = [j for j in by_rank if j not in top][:3]  # ... with the picks it implies
    assert_masks_match(mask_of(length, *top, *picks), ref, q, k, **options)
    wrong_picks = [j for j in by_rank if j not in top][-3:]  # the right count, wrong picks
    with pytest.raises(AssertionError):
        assert_masks_match(mask_of(length, *top, *wrong_picks), ref, q, k, **options)


def test_assert_masks_match_checks_its_reference() -> None:
    q, k = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 8, 4)
    plan = sk.make_plan(1, 2, 8, 1)
    ref = sk.self_guided_mask(q, k, plan=plan, ratio=0.5, num_per_query=1, backend="reference")
    with pytest.raises(AssertionError, match="not the reference's mask"):
        assert_masks_match(ref, ~ref, q, k, plan=plan, ratio=0.5, num_per_query=1)


# ----------------------------------------------------------------------------- error rule

def test_error_rule_rejects_three_times_the_pytorch_error() -> None:
    oracle = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    plain = oracle.float()  # rounding to fp32 is PyTorch's own error here
    error = plain.double() - oracle
    assert float(error.abs().max()) > 0
    assert_close_to_fp64(oracle + 1.5 * error, plain, oracle)
    with pytest.raises(AssertionError, match="error"):
        assert_close_to_fp64(oracle + 3 * error, plain, oracle)
    assert_close_to_fp64(oracle + 3 * error, plain, oracle, factor=3.5)
    assert_close_to_fp64(oracle + 3 * error, plain, oracle, atol=float(error.abs().max()))
    with pytest.raises(AssertionError):
        assert_close_to_fp64(oracle.clone().fill_(float("nan")), plain, oracle, atol=1.0)


def test_attention_rule_checks_the_output_and_each_gradient() -> None:
    g = torch.Generator().manual_seed(5)
    q, k, v, grad_out = (torch.randn(2, 2, 6, 4, generator=g) for _ in range(4))
    keep = padded_valid(2, 6, g)
    scale = 0.5
    out, lse = reference.attention_forward(q, k, v, keep, scale=scale)
    got = [out, *reference.attention_backward(grad_out, q, k, v, keep, out, lse, scale=scale)]
    assert_attention_close_to_fp64(got, q, k, v, grad_out, keep, scale=scale)
    for index, name in enumerate(("out", "dq", "dk", "dv")):
        wrong = [x.clone() for x in got]
        wrong[index] += 1e-3
        with pytest.raises(AssertionError, match=name):
            assert_attention_close_to_fp64(wrong, q, k, v, grad_out, keep, scale=scale)


# ----------------------------------------------------------------------------- padding

def test_each_padding_layout_has_its_shape() -> None:
    length = 12
    valid = padded_valid(7, length, torch.Generator().manual_seed(5))
    assert valid.shape == (7, length) and valid.dtype == torch.bool
    rows = dict(zip(LAYOUTS, valid))
    positions = torch.arange(length)
    assert rows["none"].all()
    assert torch.equal(rows["right"], positions < 8)
    assert torch.equal(rows["left"], positions >= 6)
    assert torch.equal(rows["middle"], (positions < 3) | (positions >= 9))
    assert rows["single"].nonzero().flatten().tolist() == [4]
    assert not rows["empty"].any()
    assert 0 < int(rows["scattered"].sum()) < length
    assert torch.equal(padded_valid(3, length, None, "empty"), torch.zeros(3, length, dtype=torch.bool))
    with pytest.raises(ValueError, match="layouts"):
        padded_valid(2, length, None, ["right", "diagonal"])


def test_random_cuts_cover_every_length() -> None:
    length, batch = 9, 400
    g = torch.Generator().manual_seed(6)
    for layout in ("right", "left"):
        valid = padded_valid(batch, length, g, layout, random_cuts=True)
        lengths = valid.sum(dim=1)
        positions = torch.arange(length)
        shaped = positions < lengths[:, None] if layout == "right" else positions >= length - lengths[:, None]
        assert torch.equal(valid, shaped)
        assert sorted(set(lengths.tolist())) == list(range(length + 1))
    middle = padded_valid(batch, length, g, "middle", random_cuts=True)
    for row in middle:  # one contiguous hole (possibly empty)
        hole = (~row).nonzero().flatten()
        assert len(hole) == 0 or int(hole[-1] - hole[0]) + 1 == len(hole)
    assert (padded_valid(batch, length, g, "single", random_cuts=True).sum(dim=1) == 1).all()
    dense = padded_valid(batch, length, g, "scattered", density=0.9).float().mean()
    assert 0.85 < float(dense) < 0.95


# ----------------------------------------------------------------------------- loop oracle

def test_brute_force_mask_follows_the_rule() -> None:
    valid = torch.tensor([[True] * 10, [False, True, False, True, True, True, False, True, True, True]])
    k = torch.randn(2, 2, 10, 4, generator=torch.Generator().manual_seed(7))
    plan = sk.make_plan(2, 3, 10, 2, generator=torch.Generator().manual_seed(8))
    options = {"ratio": 0.3, "num_per_query": 1, "head_mix": "mean", "mask_self": False, "noise": 0.0}
    mask = brute_force_mask(torch.zeros(2, 2, 3, 4), k, valid, plan, **options)
    assert mask[0].nonzero().flatten().tolist() == [0, 1, 2]  # exact ties go to the lower index
    assert mask[1].nonzero().flatten().tolist() == [1, 3]
    # A strongly attended token is masked.
    q = k[:, :, [6]].expand(-1, -1, 3, -1) * 10
    assert bool(brute_force_mask(q, k, valid, plan, **{**options, "ratio": 0.1})[0, 6])
