"""The Triton backend's fused ``self_guided_attention`` (the ``sma_kernels::self_guided_attention``
op): the selection kernel writes the kept-key order with the mask, the attention reads it, and
the backward reuses the saved order instead of rebuilding it.

On the general path it must give the same bits as the composed path it replaces (the mask op,
keep = valid & ~mask, then ``masked_attention``) for the same plan: mask, output and gradients,
for every head mix, with and without ``mask_self`` and noise, over every padding layout (an
all-padding sample included). On the short-sequence path (one program per sample,
short_sequence.py) the mask and the kept-key order are the same bits as the composed path's,
and the output and gradients meet the fp64 accuracy rule: its attention sums in another order.
Without a GPU the kernels run in Triton's interpreter, at tiny shapes.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, import_triton_backend

import sma_kernels as sk
from sma_kernels import ops
from sma_kernels.testing import assert_attention_close_to_fp64, padded_valid

triton_backend = import_triton_backend()

from sma_kernels.triton.kept_keys import kept_keys

# Seven samples: padded_valid's layouts once each (the sixth has no real token).
B, H, L, D, DV = 7, 2, 12, 8, 4


def case(seed: int, num_q: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, num_q, D, generator=g)
    k = torch.randn(B, H, L, D, generator=g)
    v = torch.randn(B, H, L, DV, generator=g)
    grad_out = torch.randn(B, H, num_q, DV, generator=g)
    valid = padded_valid(B, L, g)
    plan = sk.make_plan(B, num_q, L, H, generator=g)
    return (*(x.to(DEVICE, dtype) for x in (q, k, v, grad_out)), valid.to(DEVICE), plan.to(DEVICE))


def composed(q, k, v, valid, options):
    """The mask op, then masked_attention over keep = valid & ~mask: the unfused path."""
    mask = sk.self_guided_mask(q, k, valid, **options)
    out = ops.masked_attention(q, k, v, valid & ~mask, scale=D ** -0.5, backend="triton")
    return out, mask


def run(attend, q, k, v, grad_out):
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, mask = attend(*leaves)
    out.backward(grad_out)
    return mask, out.detach(), *(leaf.grad for leaf in leaves)


@pytest.mark.parametrize("noise", [0.0, 0.5])
@pytest.mark.parametrize("mask_self", [False, True])
@pytest.mark.parametrize("head_mix", ["mean", "random"])
def test_fused_equals_composed(head_mix, mask_self, noise, triton_path):
    num_q = L if mask_self else 5  # self-attention under mask_self, else cross-attention
    q, k, v, grad_out, valid, plan = case(1, num_q)
    options = {"ratio": 0.4, "num_per_query": 2, "head_mix": head_mix, "mask_self": mask_self,
               "noise": noise, "plan": plan, "backend": "triton"}
    fused = run(lambda q, k, v: sk.self_guided_attention(q, k, v, valid, **options),
                q, k, v, grad_out)
    unfused = run(lambda q, k, v: composed(q, k, v, valid, options), q, k, v, grad_out)
    mask, out = fused[:2]
    assert torch.equal(mask, unfused[0])
    names = ("out", "dq", "dk", "dv")
    if triton_path == "general":
        for name, got, expected in zip(names, fused[1:], unfused[1:]):
            assert torch.equal(got, expected), name
    else:
        assert_attention_close_to_fp64(fused[1:], q, k, v, grad_out, valid & ~mask,
                                       scale=D ** -0.5, atol=1e-6)
    assert not mask[5].any() and not out[5].any()  # the sample without a real token
    assert mask.any()  # the mask did its work


def test_fused_forward_returns_the_kept_key_order_of_its_mask(triton_path):
    q, k, v, _, valid, plan = case(2, 5)
    out, lse, mask, order, kept = triton_backend.self_guided_attention_forward(
        q, k, v, valid, torch.ones(B, 5, dtype=torch.bool, device=DEVICE), plan, ratio=0.5,
        num_per_query=1, head_mix="mean", mask_self=False, noise=0.0, scale=D ** -0.5)
    expected_order, expected_kept = kept_keys(valid & ~mask)
    assert torch.equal(order, expected_order) and torch.equal(kept, expected_kept)
    expected_out, expected_lse = triton_backend.attention_forward(q, k, v, valid & ~mask,
                                                                  scale=D ** -0.5)
    if triton_path == "general":  # the same kernel
        assert torch.equal(out, expected_out) and torch.equal(lse, expected_lse)
    else:
        torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse, expected_lse, rtol=1e-5, atol=1e-6)


def test_generator_gives_the_plans_bits(triton_path):
    """plan=None and a generator draw their plan inside the call; the fused path then gives the
    same bits as with that plan drawn beforehand."""
    q, k, v, _, valid, _ = case(3, L)
    options = {"ratio": 0.3, "num_per_query": 1, "head_mix": "random", "mask_self": True,
               "backend": "triton"}
    out, mask = sk.self_guided_attention(q, k, v, valid, generator=torch.Generator().manual_seed(9),
                                         **options)
    plan = sk.make_plan_for(q, k, generator=torch.Generator().manual_seed(9))
    expected_out, expected_mask = sk.self_guided_attention(q, k, v, valid, plan=plan, **options)
    assert torch.equal(mask, expected_mask) and torch.equal(out, expected_out)


def test_opcheck_fused_ops(triton_path):
    q, k, v, grad_out, valid, plan = case(4, 5)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    args = (q, k, v, valid, torch.ones(B, 5, dtype=torch.bool, device=DEVICE), *plan, 0.4, 2,
            "random", False, 0.5, D ** -0.5, "triton")
    torch.library.opcheck(torch.ops.sma_kernels.self_guided_attention.default, args)
    out, lse, _, order, kept = torch.ops.sma_kernels.self_guided_attention(*args)
    torch.library.opcheck(torch.ops.sma_kernels.ordered_attention_backward.default,
                          (grad_out, q.detach(), k.detach(), v.detach(), order, kept,
                           out.detach(), lse.detach(), D ** -0.5, "triton"))


def test_compile_fullgraph_with_a_plan_runs_the_fused_op(triton_path):
    q, k, v, _, valid, plan = case(5, 5)
    targets = []

    def record(graph_module, example_inputs):
        targets.extend(str(node.target) for node in graph_module.graph.nodes
                       if node.op == "call_function")
        return graph_module

    def layer(q, k, v, plan):
        return sk.self_guided_attention(q, k, v, valid, ratio=0.3, num_per_query=1, plan=plan,
                                        backend="triton")

    torch._dynamo.reset()
    out, mask = torch.compile(layer, fullgraph=True, backend=record)(q, k, v, plan)
    expected_out, expected_mask = layer(q, k, v, plan)
    assert "sma_kernels.self_guided_attention.default" in targets, targets
    assert torch.equal(mask, expected_mask) and torch.equal(out, expected_out)


def test_float64_falls_back_to_the_composed_reference():
    q, k, v, _, valid, plan = case(6, 5, torch.float64)
    options = {"ratio": 0.3, "num_per_query": 1, "plan": plan}
    out, mask = sk.self_guided_attention(q, k, v, valid, backend="triton", **options)
    expected_out, expected_mask = sk.self_guided_attention(q, k, v, valid, backend="reference",
                                                           **options)
    assert not ops.has_fused_attention("triton", torch.float64)
    assert torch.equal(mask, expected_mask) and torch.equal(out, expected_out)
    with pytest.raises(ValueError, match="no fused self_guided_attention"):
        torch.ops.sma_kernels.self_guided_attention(
            q, k, v, valid, torch.ones(B, 5, dtype=torch.bool, device=DEVICE), *plan, 0.3, 1,
            "mean", False, 0.0, D ** -0.5, "reference")
