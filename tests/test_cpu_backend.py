"""The compiled CPU backend (csrc/cpu): the same mask as the reference under the same plan.

Exactly, except at genuine float near-ties (see sma_kernels.testing.assert_masks_match), across
shapes, options, padding and dtypes; deterministic across calls and thread counts; reachable
through the public API; defensive about a corrupt plan; and O(L) in memory at L = 32768.
"""

from __future__ import annotations

import pytest
import torch
from helpers import blames
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sma_kernels as sk
from sma_kernels.plan import mask_counts
from sma_kernels.testing import LAYOUTS, assert_masks_match, padded_valid

CPP = sk.backends()["cpp"]
pytestmark = pytest.mark.skipif(not CPP["available"], reason=f"C++ backend unavailable: {CPP['reason']}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@st.composite
def cases(draw: st.DrawFn) -> dict:
    mask_self = draw(st.booleans())
    batch, heads = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    length = draw(st.integers(1, 70))
    queries = length if mask_self else draw(st.integers(1, 20))
    return {
        "shape": (batch, heads, queries, length, draw(st.integers(1, 40))),
        "dtype": draw(st.sampled_from(DTYPES)),
        "paddings": draw(st.lists(st.sampled_from(LAYOUTS), min_size=batch, max_size=batch)),
        "nan_padding": draw(st.booleans()),
        "query_valid": not mask_self and draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
        "options": {
            "ratio": draw(st.floats(0.02, 0.98)),
            "num_per_query": draw(st.integers(1, 4)),
            "head_mix": draw(st.sampled_from(["mean", "random"])),
            "mask_self": mask_self,
            "noise": draw(st.sampled_from([0.0, 0.0, 0.3, 0.5, 1.0])),
            "scale": draw(st.sampled_from([None, 0.3, 1.0])),
        },
    }


def build(case: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, sk.MaskPlan, dict]:
    batch, heads, queries, length, dim = case["shape"]
    g = torch.Generator().manual_seed(case["seed"])
    q = torch.randn(batch, heads, queries, dim, generator=g).to(case["dtype"])
    k = torch.randn(batch, heads, length, dim, generator=g).to(case["dtype"])
    valid = padded_valid(batch, length, g, case["paddings"], random_cuts=True)
    if case["nan_padding"]:  # whatever padded keys hold must not matter
        k = k.masked_fill(~valid[:, None, :, None], float("nan"))
    options = dict(case["options"])
    if case["query_valid"]:
        options["query_valid"] = torch.rand(batch, queries, generator=g) < 0.7
    plan = sk.make_plan(batch, queries, length, heads, generator=g)
    return q, k, valid, plan, options


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_cpp_matches_reference(case: dict) -> None:
    q, k, valid, plan, options = build(case)
    ref = sk.self_guided_mask(q, k, valid, plan=plan, backend="reference", **options)
    got = sk.self_guided_mask(q, k, valid, plan=plan, backend="cpp", **options)
    assert_masks_match(got, ref, q, k, valid, plan=plan, **options)


def test_exact_ties_go_to_the_lower_index() -> None:
    # q = 0 makes every logit 0: all valid tokens score exactly the same on every backend.
    batch, heads, length, dim = 3, 2, 40, 8
    q = torch.zeros(batch, heads, 5, dim)
    k = torch.randn(batch, heads, length, dim, generator=torch.Generator().manual_seed(0))
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1, :7] = False
    valid[2, 10:20] = False
    plan = sk.make_plan(batch, 5, length, heads, generator=torch.Generator().manual_seed(1))
    options = {"ratio": 0.25, "num_per_query": 1, "head_mix": "random"}
    got = sk.self_guided_mask(q, k, valid, plan=plan, backend="cpp", **options)
    assert torch.equal(got, sk.self_guided_mask(q, k, valid, plan=plan, backend="reference", **options))
    for b in range(batch):
        first = valid[b].nonzero().flatten()[:round(0.25 * int(valid[b].sum()))]
        assert got[b].nonzero().flatten().tolist() == first.tolist()


def test_count_rounding_at_half_way_cases() -> None:
    # n * r / npq = 2.5 exactly in float64 (k_q = 2, half-to-even) but 2.5000002 in float32 (k_q = 3).
    batch, length = 2, 25
    x = torch.randn(batch, 1, length, 4, generator=torch.Generator().manual_seed(0))
    valid = torch.ones(batch, length, dtype=torch.bool)
    options = {"ratio": 0.3, "num_per_query": 3, "mask_self": True}
    plan = sk.make_plan(batch, length, length, 1, generator=torch.Generator().manual_seed(0))
    got = sk.self_guided_mask(x, x, valid, plan=plan, backend="cpp", **options)
    counts = mask_counts(valid, valid, ratio=0.3, num_per_query=3, mask_self=True, noise=0.0)
    assert counts.num_rows.tolist() == [2, 2] and counts.num_masked.tolist() == [8, 8]
    assert got.sum(dim=1).tolist() == [8, 8]
    assert torch.equal(got, sk.self_guided_mask(x, x, valid, plan=plan, backend="reference", **options))


def deterministic_case(batch: int) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(batch)
    heads, queries, length, dim = 3, 48, 700, 24
    q = torch.randn(batch, heads, queries, dim, generator=g)
    k = torch.randn(batch, heads, length, dim, generator=g)
    valid = torch.rand(batch, length, generator=g) < 0.9
    plan = sk.make_plan(batch, queries, length, heads, generator=g)
    return (q, k, valid), {"ratio": 0.4, "num_per_query": 2, "head_mix": "mean", "noise": 0.2, "plan": plan}


@pytest.mark.parametrize("batch", [1, 5])
def test_deterministic_across_calls_and_thread_counts(batch: int) -> None:
    args, options = deterministic_case(batch)
    threads = torch.get_num_threads()
    try:
        masks = []
        for count in (1, 2, 1, 2):
            torch.set_num_threads(count)
            masks.append(sk.self_guided_mask(*args, backend="cpp", **options))
    finally:
        torch.set_num_threads(threads)
    for mask in masks[1:]:
        assert torch.equal(mask, masks[0])


def test_a_sample_gets_the_same_mask_alone_or_in_a_batch() -> None:
    # Work is split differently for one sample than for a batch; the arithmetic must not change.
    (q, k, valid), options = deterministic_case(5)
    plan = options.pop("plan")
    whole = sk.self_guided_mask(q, k, valid, plan=plan, backend="cpp", **options)
    for b in range(q.shape[0]):
        alone = sk.MaskPlan(*(t[b:b + 1] for t in plan))
        part = sk.self_guided_mask(q[b:b + 1], k[b:b + 1], valid[b:b + 1], plan=alone, backend="cpp",
                                   **options)
        assert torch.equal(part[0], whole[b])


def test_public_api_auto_and_any_strides() -> None:
    g = torch.Generator().manual_seed(3)
    batch, heads, length, dim = 4, 2, 33, 16
    x = torch.randn(batch, length, heads, dim, generator=g).transpose(1, 2)  # non-contiguous
    valid = torch.rand(batch, length, generator=g) < 0.8
    plan = sk.make_plan(batch, length, length, heads, generator=g)
    options = {"ratio": 0.3, "num_per_query": 3, "head_mix": "random", "mask_self": True, "plan": plan}
    cpp = sk.self_guided_mask(x, x, valid, backend="cpp", **options)
    assert torch.equal(sk.self_guided_mask(x, x, valid, backend="auto", **options), cpp)
    assert torch.equal(sk.self_guided_mask(x.contiguous(), x.contiguous(), valid, backend="cpp", **options), cpp)
    ref = sk.self_guided_mask(x, x, valid, backend="reference", **options)
    assert_masks_match(cpp, ref, x, x, valid, **options)
    v = torch.randn(batch, heads, length, 8, generator=g)
    out, mask = sk.self_guided_attention(x, x, v, valid, backend="cpp", **options)
    assert torch.equal(mask, cpp) and out.shape == (batch, heads, length, 8)


def test_long_sequence_runs_in_linear_memory() -> None:
    # L = 32768: a (Q, L) block per sample would already be 4 MB; the kernel needs O(L).
    g = torch.Generator().manual_seed(4)
    batch, heads, queries, length, dim = 2, 2, 16, 32768, 16
    q = torch.randn(batch, heads, queries, dim, generator=g)
    k = torch.randn(batch, heads, length, dim, generator=g)
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1, 30000:] = False
    plan = sk.make_plan(batch, queries, length, heads, generator=g)
    options = {"ratio": 0.5, "num_per_query": 4, "noise": 0.1}
    got = sk.self_guided_mask(q, k, valid, plan=plan, backend="cpp", **options)
    assert got.sum(dim=1).tolist() == [16384, 15000]
    assert not (got & ~valid).any()
    ref = sk.self_guided_mask(q, k, valid, plan=plan, backend="reference", **options)
    assert_masks_match(got, ref, q, k, valid, plan=plan, **options)


def raw_args(**changes: object) -> list:
    batch, heads, length, dim = 2, 2, 6, 4
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, heads, length, dim, generator=g)
    plan = sk.make_plan(batch, length, length, heads, generator=g)
    args = {"q": x, "k": x, "valid": torch.ones(batch, length, dtype=torch.bool),
            "query_pool": torch.ones(batch, length, dtype=torch.bool), "query_rank": plan.query_rank,
            "head": plan.head, "token_rank": plan.token_rank, "ratio": 0.5, "num_per_query": 3,
            "head_mix_random": True, "mask_self": False, "noise": 0.5, "scale": 0.5}
    args.update(changes)
    return list(args.values())


@pytest.mark.parametrize("changes", [
    # Ranks and heads may hold any int32 values (ties go to the lower index, heads are read
    # mod H), and under mask_self the pool is intersected with valid, so only dtypes and shapes
    # can be wrong there.
    {"token_rank": torch.zeros(2, 6, dtype=torch.int64)},
    {"query_rank": torch.zeros(2, 5, dtype=torch.int32)},
    {"head": torch.full((2, 6), 2, dtype=torch.int64)},
    {"valid": torch.ones(2, 6)},
    {"query_pool": torch.ones(2, 5, dtype=torch.bool)},
    {"k": torch.randn(2, 3, 6, 4)},
    {"ratio": 1.5},
])
def test_kernel_refuses_inconsistent_inputs(changes: dict) -> None:
    # The public API validates first; these checks guard direct callers of the raw op.
    assert torch.ops.sma_kernels_C.self_guided_mask(*raw_args()).sum(dim=1).tolist() == [3, 3]
    (name,) = changes  # the message must begin by naming the argument changed
    with pytest.raises(RuntimeError, match=blames(name, prefix="self_guided_mask: ")):
        torch.ops.sma_kernels_C.self_guided_mask(*raw_args(**changes))
