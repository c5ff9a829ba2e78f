"""sma_kernels.nn.SelfGuidedAttention against the same layer written out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sma_kernels as sk
from bench.launches import count_launches
from sma_kernels.nn import SelfGuidedAttention

B, L, E, HEADS = 3, 12, 16, 4
OPTIONS = {"ratio": 0.3, "num_per_query": 2, "head_mix": "random"}


def tokens(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, E, generator=g)
    valid = torch.rand(B, L, generator=g) < 0.8
    valid[:, 0] = True
    return x, valid


def heads(x: torch.Tensor) -> torch.Tensor:
    return x.view(x.shape[0], x.shape[1], HEADS, -1).transpose(1, 2)


def by_hand(layer: SelfGuidedAttention, x, valid, queries, plan, *, mask_self: bool, noise: float):
    """Projections, the op, the out projection and drop_masked, composed without the module."""
    q, k, v = heads(layer.to_q(queries)), heads(layer.to_k(x)), heads(layer.to_v(x))
    attended, mask = sk.self_guided_attention(
        q, k, v, valid, **OPTIONS, query_valid=valid if layer.latents is None else None,
        mask_self=mask_self, noise=noise, plan=plan)
    out = layer.to_out(attended.transpose(1, 2).reshape(B, q.shape[2], -1))
    keep = valid & ~mask
    return out, mask, keep, sk.drop_masked(out if layer.latents is None else x, keep)


@pytest.mark.parametrize("variant", ["self", "self-mask_self", "cross"])
def test_module_equals_the_hand_written_layer(variant):
    torch.manual_seed(0)
    cross, mask_self = variant == "cross", variant == "self-mask_self"
    layer = SelfGuidedAttention(E, HEADS, num_latents=5 if cross else None, mask_self=mask_self,
                                noise=0.25, **OPTIONS)
    x, valid = tokens()
    num_queries = 5 if cross else L
    plan = sk.make_plan(batch_size=B, num_queries=num_queries, num_tokens=L, num_heads=HEADS,
                        generator=torch.Generator().manual_seed(1))
    x_module = x.clone().requires_grad_()
    got = layer(x_module, valid, plan=plan, return_packed=True)
    (got.out.square().sum() + got.packed[0].sum()).backward()
    module_grads = [x_module.grad] + [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()

    x_hand = x.clone().requires_grad_()
    queries = layer.latents.expand(B, -1, -1) if cross else x_hand
    out, mask, keep, packed = by_hand(layer, x_hand, valid, queries, plan, mask_self=mask_self, noise=0.25)
    (out.square().sum() + packed[0].sum()).backward()
    hand_grads = [x_hand.grad] + [p.grad for p in layer.parameters()]

    assert got.out.shape == (B, num_queries, E)
    assert torch.equal(got.mask, mask) and torch.equal(got.keep, keep)
    assert got.mask.any() and not (got.mask & ~valid).any()
    torch.testing.assert_close(got.out, out, rtol=0, atol=0)
    for got_part, hand_part in zip(got.packed, packed):
        torch.testing.assert_close(got_part, hand_part, rtol=0, atol=0)
    for got_grad, hand_grad in zip(module_grads, hand_grads):
        torch.testing.assert_close(got_grad, hand_grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("variant", ["self", "self-mask_self", "cross"])
def test_without_valid_every_token_is_real(variant, backend):
    cross, mask_self = variant == "cross", variant == "self-mask_self"
    torch.manual_seed(4)
    layer = SelfGuidedAttention(E, HEADS, num_latents=5 if cross else None, mask_self=mask_self,
                                noise=0.25, backend=backend, **OPTIONS)
    x, _ = tokens(5)
    plan = sk.make_plan(batch_size=B, num_queries=5 if cross else L, num_tokens=L,
                        num_heads=HEADS, generator=torch.Generator().manual_seed(6))
    with count_launches() as launches:
        default = layer(x, plan=plan, return_packed=True)
    explicit = layer(x, torch.ones(B, L, dtype=torch.bool), plan=plan, return_packed=True)
    if backend == "triton":  # its kernels read a missing valid as all set: nothing is filled
        assert not {"ones", "fill"} & set(launches.names), launches.names
    assert default.mask.any()
    for got, expected in [(default.out, explicit.out), (default.mask, explicit.mask),
                          (default.keep, explicit.keep), *zip(default.packed, explicit.packed)]:
        assert torch.equal(got, expected)


@pytest.mark.parametrize("cross", [False, True])
def test_eval_mode_and_masking_off_are_plain_padded_attention(cross):
    torch.manual_seed(1)
    layer = SelfGuidedAttention(E, HEADS, num_latents=4 if cross else None, **OPTIONS)
    x, valid = tokens(2)
    queries = layer.latents.expand(B, -1, -1) if cross else x
    q, k, v = heads(layer.to_q(queries)), heads(layer.to_k(x)), heads(layer.to_v(x))
    attended = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
    expected = layer.to_out(attended.transpose(1, 2).reshape(B, q.shape[2], -1))
    for result in (layer.eval()(x, valid), layer.train()(x, valid, masking=False)):
        assert not result.mask.any() and torch.equal(result.keep, valid)
        torch.testing.assert_close(result.out, expected)
    layer.masking = False
    torch.testing.assert_close(layer.train()(x, valid).out, expected)
    # Masking in eval mode on request (to look at a trained model's masks).
    layer.masking = True
    assert layer.eval()(x, valid, masking=True, generator=torch.Generator().manual_seed(0)).mask.any()


def test_noise_override_per_call():
    layer = SelfGuidedAttention(E, HEADS, **OPTIONS)
    x, valid = tokens(3)
    plan = sk.make_plan(batch_size=B, num_queries=L, num_tokens=L, num_heads=HEADS,
                        generator=torch.Generator().manual_seed(4))
    guided = layer(x, valid, plan=plan).mask
    random = layer(x, valid, plan=plan, noise=1.0).mask
    queries_pool = valid
    q, k = heads(layer.to_q(x)), heads(layer.to_k(x))
    expected = sk.self_guided_mask(q, k, valid, **OPTIONS, query_valid=queries_pool, noise=1.0, plan=plan)
    assert torch.equal(random, expected)
    assert guided.sum() == random.sum()


@pytest.mark.parametrize("kwargs,error,name", [
    ({"num_latents": 0}, ValueError, "num_latents"),
    ({"num_latents": 4, "mask_self": True}, ValueError, "mask_self"),
    ({"qk_dim": 10}, ValueError, "qk_dim"),
    ({"query_dim": 8}, ValueError, "query_dim"),
    ({"num_heads": 0}, ValueError, "num_heads"),
    ({"embed_dim": "16"}, TypeError, "embed_dim"),
    ({"num_latents": 1.5}, TypeError, "num_latents"),
    ({"value_dim": True}, TypeError, "value_dim"),
])
def test_bad_construction_names_the_argument(kwargs, error, name):
    args = {"embed_dim": E, "num_heads": HEADS, **kwargs}
    with pytest.raises(error, match=rf"^{name}\b"):
        SelfGuidedAttention(**args)


def test_numpy_integers_construct_the_layer():
    layer = SelfGuidedAttention(np.int64(E), np.int32(HEADS), num_latents=np.int64(5))
    assert layer.num_heads == HEADS and type(layer.num_heads) is int
    assert layer.latents.shape == (5, E)


def test_bad_call_names_the_argument():
    layer = SelfGuidedAttention(E, HEADS)
    x, valid = tokens()
    with pytest.raises(ValueError, match=r"^x must have shape"):
        layer(x[0], valid)
    with pytest.raises(TypeError, match=r"^valid must be a bool tensor"):
        layer(x, valid.float())
    with pytest.raises(ValueError, match=r"^valid is on meta but x is on cpu"):
        layer(x, valid.to("meta"))
    with pytest.raises(ValueError, match=r"^self-attention queries"):
        layer(x, valid, queries=x[:, :3])
    with pytest.raises(ValueError, match=r"^ratio"):
        SelfGuidedAttention(E, HEADS, ratio=1.5)(x, valid)
