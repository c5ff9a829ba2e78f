"""The contract at its edges: torch modes, non-finite and padded contents, hand-built plans,
autocast, and arguments at their limits. Every backend available here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sma_kernels as sk
from sma_kernels.backends import get as get_backend
from sma_kernels.testing import assert_masks_match, brute_force_mask

B, H, Q, L, D, DV = 3, 2, 4, 10, 4, 3


def cpu_backends() -> list[str]:
    return [name for name, info in sk.backends().items()
            if info["available"] and info["device"] in ("cpu", "any")]


def tensors(seed: int = 0, *, queries: int = Q, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, queries, D, generator=g, dtype=dtype),
            torch.randn(B, H, L, D, generator=g, dtype=dtype),
            torch.randn(B, H, L, DV, generator=g, dtype=dtype))


def padded_valid() -> torch.Tensor:
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[0, [1, 4, 9]] = False  # padding in the middle and at the end
    valid[2, :3] = False  # at the start
    return valid


def plan_for(seed: int, queries: int = Q) -> sk.MaskPlan:
    return sk.make_plan(B, queries, L, H, generator=torch.Generator().manual_seed(seed))


def assert_exact_counts(mask: torch.Tensor, valid: torch.Tensor, ratio: float) -> None:
    assert not (mask & ~valid).any(), "padding was masked"
    for b in range(valid.shape[0]):
        n = int(valid[b].sum())
        expected = min(max(round(ratio * n), 1), n - 1) if n >= 2 else 0
        assert int(mask[b].sum()) == expected, (b, int(mask[b].sum()), expected)


# ----------------------------------------------------------------------------- inference_mode

@pytest.mark.parametrize("backend", cpu_backends())
def test_inference_mode(backend):
    q, k, v = tensors()
    plan = plan_for(0)
    options = {"ratio": 0.3, "num_per_query": 1, "plan": plan, "backend": backend}
    expected_mask = sk.self_guided_mask(q, k, padded_valid(), **options)
    expected_out, _ = sk.self_guided_attention(q, k, v, padded_valid(), **options)
    with torch.inference_mode():
        inner_plan = sk.make_plan(B, Q, L, H, generator=torch.Generator().manual_seed(0))
        mask = sk.self_guided_mask(q, k, padded_valid(), **{**options, "plan": inner_plan})
        out, mask_2 = sk.self_guided_attention(q, k, v, padded_valid(), **options)
        unplanned = sk.self_guided_mask(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 8, 4), ratio=0.5,
                                        num_per_query=1, backend=backend)
    assert torch.equal(mask, expected_mask) and torch.equal(mask_2, expected_mask)
    assert torch.equal(out, expected_out)
    assert unplanned.shape == (1, 8) and int(unplanned.sum()) == 4


# ----------------------------------------------------------------------------- torch.compile

def compile_cases():
    q, k, v = tensors(1)
    valid = padded_valid()
    plan = plan_for(1)

    def with_plan_argument(q, k, v, plan):
        return sk.self_guided_attention(q, k, v, valid, ratio=0.3, num_per_query=1, plan=plan)

    def with_plan_closure(q, k, v):
        return sk.self_guided_attention(q, k, v, valid, ratio=0.3, num_per_query=1, plan=plan)

    return (q, k, v), plan, with_plan_argument, with_plan_closure


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_with_a_plan(dynamic):
    (q, k, v), plan, with_plan_argument, with_plan_closure = compile_cases()
    eager_out, eager_mask = with_plan_closure(q, k, v)
    for fn, args in ((with_plan_argument, (q, k, v, plan)), (with_plan_closure, (q, k, v))):
        torch._dynamo.reset()
        out, mask = torch.compile(fn, fullgraph=True, dynamic=dynamic, backend="aot_eager")(*args)
        assert torch.equal(mask, eager_mask)
        torch.testing.assert_close(out, eager_out)


def test_compile_fullgraph_refuses_a_plan_out_of_range():
    (q, k, v), plan, with_plan_argument, _ = compile_cases()
    torch._dynamo.reset()
    compiled = torch.compile(with_plan_argument, fullgraph=True, backend="aot_eager")
    bad = plan._replace(head=torch.full_like(plan.head, H))
    with pytest.raises(RuntimeError, match=r"plan.head entries must lie in \[0, 2\)"):
        compiled(q, k, v, bad)


def test_compile_fullgraph_with_a_generator_says_why_not():
    q, k, _ = tensors()

    def masked(q, k, generator):
        return sk.self_guided_mask(q, k, ratio=0.3, num_per_query=1, generator=generator)

    torch._dynamo.reset()
    with pytest.raises(Exception, match="generator cannot be used inside torch.compile"):
        torch.compile(masked, fullgraph=True, backend="aot_eager")(q, k, torch.Generator())


# ----------------------------------------------------------------------------- non-finite values

def poison(x: torch.Tensor, where: str, value: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = x.clone()
    b, h = int(torch.randint(B, (1,), generator=g)), int(torch.randint(H, (1,), generator=g))
    row = int(torch.randint(x.shape[2], (1,), generator=g))
    if where == "row":
        x[b, h, row, 0] = value
    elif where == "padding":  # every padded row of k, all heads
        x = x.masked_fill(~padded_valid()[:, None, :, None], value)
    return x


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**20), value=st.sampled_from([float("nan"), float("inf"), -float("inf")]),
       target=st.sampled_from(["q", "k", "k-padding", "overflow"]),
       head_mix=st.sampled_from(["mean", "random"]), mask_self=st.booleans(),
       noise=st.sampled_from([0.0, 0.5]))
def test_non_finite_inputs_follow_one_rule_on_every_backend(seed, value, target, head_mix, mask_self,
                                                             noise):
    queries = L if mask_self else Q
    q, k, _ = tensors(seed, queries=queries)
    scale = D ** -0.5
    if target == "q":
        q = poison(q, "row", value, seed)
    elif target == "k":
        k = poison(k, "row", value, seed)
    elif target == "k-padding":
        k = poison(k, "padding", value, seed)
    else:  # finite inputs whose logits overflow fp32 in some pairs
        q = q * torch.where(torch.rand(q.shape[:3], generator=torch.Generator().manual_seed(seed)) < 0.3,
                            3e19, 1.0)[..., None]
        k = k * 3e19
    valid = padded_valid()
    plan = plan_for(seed, queries)
    options = {"ratio": 0.4, "num_per_query": 2, "head_mix": head_mix, "mask_self": mask_self,
               "noise": noise, "scale": scale}
    expected = brute_force_mask(q, k, valid, plan, **options)
    for backend in cpu_backends():
        mask = sk.self_guided_mask(q, k, valid, plan=plan, backend=backend, **options)
        assert_exact_counts(mask, valid, 0.4)
        assert_masks_match(mask, expected, q, k, valid, plan=plan, **options)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_scale_must_be_finite_in_the_input_dtype(dtype):
    q, k, _ = tensors(dtype=dtype)
    too_large = {torch.float16: 1e5, torch.bfloat16: 1e39, torch.float32: 1e39}[dtype]
    for scale in (too_large, 1e-300):
        with pytest.raises(ValueError, match="scale"):
            sk.self_guided_mask(q, k, ratio=0.3, num_per_query=1, scale=scale)


# ----------------------------------------------------------------------------- padded contents

@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_padded_and_masked_contents_never_reach_outputs_or_gradients(backend, value):
    q, k, v = tensors(3)
    valid = padded_valid()
    valid[1] = False  # a sample with no real token at all
    plan = plan_for(3)
    options = {"ratio": 0.3, "num_per_query": 1, "plan": plan, "backend": backend}
    mask = sk.self_guided_mask(q, k, valid, **options)
    hidden = ~valid | mask

    def run(k, v):
        q_, k_, v_ = (x.clone().requires_grad_() for x in (q, k, v))
        out, mask_ = sk.self_guided_attention(q_, k_, v_, valid, **options)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), mask_, q_.grad, k_.grad, v_.grad

    # Padded keys and the values of every hidden token are free to hold anything; masked tokens'
    # keys are real tokens that the mask itself is chosen from.
    padded, hidden_rows = ~valid[:, None, :, None], hidden[:, None, :, None]
    clean = run(k.masked_fill(padded, 0.0), v.masked_fill(hidden_rows, 0.0))
    dirty = run(k.masked_fill(padded, value), v.masked_fill(hidden_rows, value))
    assert torch.equal(dirty[1], mask) and torch.equal(clean[1], mask)
    for got, want in zip(dirty[:1] + dirty[2:], clean[:1] + clean[2:]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    out, _, _, d_k, d_v = dirty
    assert (out[1] == 0).all(), "a sample with no real token returns zeros"
    assert (d_k.masked_select(hidden[:, None, :, None]) == 0).all()
    assert (d_v.masked_select(hidden[:, None, :, None]) == 0).all()


# ----------------------------------------------------------------------------- hand-built plans

@pytest.mark.parametrize("noise", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("mask_self", [False, True])
def test_any_in_range_plan_gives_exactly_k_on_every_backend(noise, mask_self):
    queries = L if mask_self else Q
    q, k, _ = tensors(4, queries=queries)
    valid = padded_valid()
    zeros = sk.MaskPlan(torch.zeros(B, queries, dtype=torch.int32),
                        torch.zeros(B, queries, dtype=torch.int32), torch.zeros(B, L, dtype=torch.int32))
    g = torch.Generator().manual_seed(4)
    repeated = sk.MaskPlan(torch.randint(-5, 3, (B, queries), generator=g, dtype=torch.int32),
                           torch.randint(0, H, (B, queries), generator=g, dtype=torch.int32),
                           torch.randint(2**31 - 4, 2**31 - 1, (B, L), generator=g, dtype=torch.int32))
    options = {"ratio": 0.5, "num_per_query": 2, "head_mix": "random", "mask_self": mask_self,
               "noise": noise}
    for plan in (zeros, repeated, tuple(zeros)):
        masks = {backend: sk.self_guided_mask(q, k, valid, plan=plan, backend=backend, **options)
                 for backend in cpu_backends()}
        for mask in masks.values():
            assert_exact_counts(mask, valid, 0.5)
            assert_masks_match(mask, masks["reference"], q, k, valid, plan=sk.MaskPlan(*plan), **options)
    # Equal ranks break toward the lower index: an all-zero token_rank at noise = 1 masks the
    # first k real tokens.
    mask = sk.self_guided_mask(q, k, valid, plan=zeros, ratio=0.5, num_per_query=2, noise=1.0,
                               backend="reference")
    first_real = valid[0].nonzero().flatten()[:int(mask[0].sum())]
    assert mask[0].nonzero().flatten().tolist() == first_real.tolist()


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("how", ["data", "numpy", "in-place"])
def test_a_plan_changed_after_a_call_is_checked_again(backend, how):
    q, k, _ = tensors()
    plan = plan_for(5)
    sk.self_guided_mask(q, k, ratio=0.3, num_per_query=1, plan=plan, backend=backend)
    if how == "data":
        plan.head.data[0, 0] = H
    elif how == "numpy":
        plan.head.numpy()[0, 0] = -1
    else:
        plan.head[0, 0] = H + 7
    with pytest.raises(ValueError, match="plan.head"):
        sk.self_guided_mask(q, k, ratio=0.3, num_per_query=1, plan=plan, backend=backend)


# ----------------------------------------------------------------------------- what each backend reduces itself

def backend_mask(backend: str, q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor,
                 query_pool: torch.Tensor, plan: sk.MaskPlan, **options) -> torch.Tensor:
    """The backend's own ``self_guided_mask``, past the API's checks (docs/design.md, "Backends")."""
    return get_backend(backend).self_guided_mask(q, k, valid, query_pool, plan, scale=D ** -0.5,
                                                 **options)


def congruent_heads(head: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """int32 heads equal to ``head`` mod H, spread over the whole int32 range: head + H * m for
    random m, with the largest and the smallest such int32 in the first column."""
    int32 = torch.iinfo(torch.int32)
    wide = head.long() + H * torch.randint(int32.min // H, int32.max // H, head.shape,
                                           generator=generator)
    wide[0, 0] = int32.max - (int32.max - head[0, 0].long()) % H
    wide[1, 0] = int32.min + (head[1, 0].long() - int32.min) % H
    assert int32.min <= int(wide.min()) and int(wide.max()) <= int32.max
    assert (wide.remainder(H) == head).all()
    return wide.int()


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("mask_self", [False, True])
def test_every_backend_reads_plan_heads_mod_h(backend, mask_self):
    # The ops draw their own plan without reducing its heads, so every backend must read any
    # int32 head as head mod H; a caller's plan is still held to [0, H) (test_api.py).
    queries = L if mask_self else Q
    q, k, _ = tensors(7, queries=queries)
    valid = padded_valid()
    pool = valid if mask_self else torch.ones(B, queries, dtype=torch.bool)
    plan = plan_for(7, queries)
    shifted = plan._replace(head=congruent_heads(plan.head, torch.Generator().manual_seed(7)))
    # num_per_query = 2: under mask_self half the masked tokens are then taken by score, which
    # reads the heads (with 1 every masked token would be a forced chosen row).
    options = {"ratio": 0.5, "num_per_query": 2, "head_mix": "random", "mask_self": mask_self,
               "noise": 0.0}
    want = backend_mask(backend, q, k, valid, pool, plan, **options)
    assert torch.equal(backend_mask(backend, q, k, valid, pool, shifted, **options), want)
    assert_masks_match(want, sk.self_guided_mask(q, k, valid, plan=plan, backend="reference", **options),
                       q, k, valid, plan=plan, **options)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("mask_self", [False, True])
def test_a_generator_gives_the_mask_of_make_plan_on_every_backend(backend, mask_self):
    # A generator's plan keeps the raw draws as heads; make_plan reduces them: same mask.
    queries = L if mask_self else Q
    q, k, v = tensors(8, queries=queries)
    valid = padded_valid()
    options = {"ratio": 0.5, "num_per_query": 2, "head_mix": "random", "mask_self": mask_self,
               "noise": 0.5, "backend": backend}
    for seed in range(3):
        plan = plan_for(seed, queries)
        want = sk.self_guided_mask(q, k, valid, plan=plan, **options)
        drawn = sk.self_guided_mask(q, k, valid, generator=torch.Generator().manual_seed(seed), **options)
        assert torch.equal(drawn, want), seed
        _, attended = sk.self_guided_attention(q, k, v, valid, generator=torch.Generator().manual_seed(seed),
                                               **options)
        assert torch.equal(attended, want), seed


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("head_mix", ["mean", "random"])
def test_every_backend_restricts_the_query_pool_to_real_tokens_under_mask_self(backend, head_mix):
    # query_valid goes to the backends as given: under mask_self each intersects it with valid.
    q, k, _ = tensors(9, queries=L)
    valid = padded_valid()
    g = torch.Generator().manual_seed(9)
    query_valid = torch.rand(B, L, generator=g) < 0.7
    query_valid[:, [1, 4, 9]] = True  # padded tokens of sample 0 in the pool
    query_valid[2, :3] = True  # and of sample 2
    assert (query_valid & ~valid).any()
    plan = plan_for(9, L)
    options = {"ratio": 0.5, "num_per_query": 2, "head_mix": head_mix, "mask_self": True,
               "noise": 0.0}
    restricted = backend_mask(backend, q, k, valid, query_valid & valid, plan, **options)
    assert torch.equal(backend_mask(backend, q, k, valid, query_valid, plan, **options), restricted)
    assert torch.equal(backend_mask(backend, q, k, valid, torch.ones(B, L, dtype=torch.bool), plan,
                                    **options),
                       backend_mask(backend, q, k, valid, valid, plan, **options))
    mask = sk.self_guided_mask(q, k, valid, query_valid=query_valid, plan=plan, backend=backend, **options)
    assert torch.equal(mask, restricted)
    assert_exact_counts(mask, valid, 0.5)
    expected = brute_force_mask(q, k, valid, plan, query_valid=query_valid, **options)
    assert_masks_match(mask, expected, q, k, valid, plan=plan, query_valid=query_valid, **options)


# ----------------------------------------------------------------------------- autocast

def autocast_case(device: str):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 256, 16, generator=g).to(device)
    valid = (torch.rand(2, 256, generator=g) < 0.9).to(device)
    plan = sk.make_plan(2, 256, 256, 4, generator=g).to(device)
    v = torch.randn(2, 4, 256, 8, generator=g).to(device)
    return x, v, valid, plan


def assert_autocast_rule(device: str, dtype: torch.dtype, backends: list[str]) -> None:
    x, v, valid, plan = autocast_case(device)
    options = {"ratio": 0.3, "num_per_query": 3, "mask_self": True, "head_mix": "random", "plan": plan}
    for backend in backends:
        with torch.autocast(device, dtype=dtype):
            mask = sk.self_guided_mask(x, x, valid, backend=backend, **options)
            out, mask_2 = sk.self_guided_attention(x, x, v, valid, backend=backend, **options)
        # Exactly what the op gives on inputs already in the autocast dtype, outside autocast.
        cast = x.to(dtype)
        want_mask = sk.self_guided_mask(cast, cast, valid, backend=backend, **options)
        want_out, _ = sk.self_guided_attention(cast, cast, v.to(dtype), valid, backend=backend, **options)
        assert torch.equal(mask, want_mask) and torch.equal(mask_2, want_mask), backend
        assert out.dtype == dtype, (backend, out.dtype)
        torch.testing.assert_close(out, want_out)
        reference_mask = sk.self_guided_mask(cast, cast, valid, backend="reference", **options)
        assert_masks_match(mask, reference_mask, cast, cast, valid, **{**options, "plan": plan.to("cpu")})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_autocast_follows_one_rule(dtype):
    assert_autocast_rule("cpu", dtype, [b for b in cpu_backends() if b != "triton"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_autocast_follows_one_rule():
    backends = [name for name, info in sk.backends().items()
                if info["available"] and info["device"] in ("cuda", "any")]
    assert_autocast_rule("cuda", torch.bfloat16, backends)


def test_autocast_gradients_reach_fp32_inputs():
    x, v, valid, plan = autocast_case("cpu")
    x, v = x.requires_grad_(), v.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = sk.self_guided_attention(x, x, v, valid, ratio=0.3, num_per_query=3, plan=plan)
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and v.grad.dtype == torch.float32
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- small ones

@pytest.mark.parametrize("num_per_query", [2**63, 2**64, -(2**63) - 1])
def test_huge_num_per_query_is_a_value_error(num_per_query):
    q, k, _ = tensors()
    with pytest.raises(ValueError, match="num_per_query"):
        sk.self_guided_mask(q, k, ratio=0.3, num_per_query=num_per_query)


def test_largest_num_per_query_works():
    q, k, _ = tensors()
    mask = sk.self_guided_mask(q, k, ratio=0.3, num_per_query=2**63 - 1, plan=plan_for(0))
    assert_exact_counts(mask, torch.ones(B, L, dtype=torch.bool), 0.3)


def test_numpy_scalars_are_accepted():
    x = torch.randn(B, H, L, D)
    plan = plan_for(7, L)
    mask = sk.self_guided_mask(x, x, ratio=np.float64(0.3), num_per_query=np.int64(2),
                               mask_self=np.bool_(True), plan=plan)
    assert torch.equal(mask, sk.self_guided_mask(x, x, ratio=0.3, num_per_query=2, mask_self=True,
                                                 plan=plan))
    with pytest.raises(TypeError, match="mask_self must be a bool, got numpy.ndarray"):
        sk.self_guided_mask(x, x, ratio=0.3, num_per_query=2, mask_self=np.array([True, False]))


@pytest.mark.skipif(not sk.backends()["cpp"]["available"], reason="needs the compiled extension")
def test_opcheck_the_compiled_kernel_op():
    q, k, _ = tensors()
    valid = padded_valid()
    plan = plan_for(8)
    args = (q, k, valid, torch.ones(B, Q, dtype=torch.bool), *plan, 0.3, 1, True, False, 0.5, 0.5)
    torch.library.opcheck(torch.ops.sma_kernels_C.self_guided_mask.default, args)
