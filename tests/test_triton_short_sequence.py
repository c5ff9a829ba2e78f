"""The Triton backend's short-sequence path (short_sequence.py): the mask and the attention of a
sample in one program, one launch, for at most SHORT_LENGTH tokens (query rows and head dims
taken in blocks and chunks), and the backward in one program per (sample, head), one launch,
where its whole tile fits.

The mask and fused-forward tests of test_triton_mask.py, test_triton_attention.py,
test_triton_fused.py and test_edge_cases.py run on this path at their short shapes (and on the
general path where they take the ``triton_path`` fixture). Here: which shapes take it and with
which blocks, the large shapes against the reference, what each kernel loads, exact ties, and
that a sample's bits do not depend on its batch. Without a GPU the kernels run in Triton's
interpreter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import CUDA, DEVICE, element_addresses, import_triton_backend, record_loads

import sma_kernels as sk
from bench.launches import count_launches
from sma_kernels import reference
from sma_kernels.plan import chosen_rows, default_query_pool, mask_counts
from sma_kernels.testing import assert_attention_close_to_fp64, assert_masks_match, padded_valid

triton_backend = import_triton_backend()

from test_triton_determinism import SETUPS, SHORT, assert_exact_ties_to_lower_index, setup_inputs

from sma_kernels.triton.kept_keys import kept_keys
from sma_kernels.triton.short_sequence import (
    SHORT_LENGTH,
    SHORT_QUERIES,
    SHORT_TILE_VOLUME,
    fits_short_backward,
    fits_short_forward,
    forward_blocks,
    short_sequence_attention,
    short_sequence_backward,
)


def test_which_shapes_take_the_short_path():
    # The forward (and the mask) at any head dims up to SHORT_LENGTH tokens and SHORT_QUERIES
    # queries; the backward only where its whole tile fits.
    assert fits_short_forward(1, 1)
    assert fits_short_forward(28, 28)  # HIGGS
    assert fits_short_forward(SHORT_QUERIES, SHORT_LENGTH)
    assert not fits_short_forward(28, SHORT_LENGTH + 1)
    assert not fits_short_forward(SHORT_QUERIES + 1, 28)
    assert fits_short_backward(SHORT_LENGTH, SHORT_LENGTH, 64, 64)
    # Only square tiles: oblong ones spilled registers on sm_90.
    assert not fits_short_backward(SHORT_LENGTH, 64, 128, 128)
    assert not fits_short_backward(32, SHORT_LENGTH, 32, 128)
    assert fits_short_backward(20, 28, 16, 16)  # both padded to 32
    assert fits_short_backward(28, 28, 16, 16)
    assert not fits_short_backward(SHORT_LENGTH, SHORT_LENGTH, 128, 64)  # would spill
    assert not fits_short_backward(28, 28, 256, 16)  # head dims past 128 would spill
    assert not fits_short_backward(SHORT_LENGTH + 1, 28, 16, 16)


@pytest.mark.parametrize(("shape", "blocks"), [
    ((28, 28, 16, 16), (32, 32, 16, 16)),  # HIGGS: one block, one chunk
    ((128, 128, 64, 64), (128, 128, 64, 64)),  # the largest whole tile
    ((128, 128, 128, 128), (64, 128, 64, 64)),  # wider heads: two row blocks, two chunks
    ((128, 128, 256, 256), (64, 128, 64, 64)),  # and four head-dim chunks
    ((64, 64, 128, 128), (64, 64, 64, 64)),  # K's whole (64, 128) tile: 64 elements a thread
    ((256, 128, 32, 128), (128, 128, 32, 64)),  # 256 latents: two row blocks, two dv chunks
    ((256, 16, 256, 256), (128, 16, 64, 64)),  # a (128, 64) fp32 accumulator at 4 warps
    ((128, 128, 64, 256), (128, 128, 64, 64)),  # dv wider than d
    # Few queries: 64-row blocks (padded), unless the keys' tile is as small as HIGGS's.
    ((32, 128, 128, 128), (64, 128, 64, 64)),
    ((16, 16, 64, 64), (64, 16, 64, 64)),
    ((28, 28, 16, 128), (32, 32, 16, 64)),  # V in chunks of 64 under 64 rows
])
def test_forward_blocks_keep_the_tile_within_the_register_budget(shape, blocks):
    assert forward_blocks(*shape) == blocks
    block_m, block_k, block_d, block_dv = blocks
    assert block_m * block_k * max(block_d, block_dv) <= SHORT_TILE_VOLUME
    # The scores' blocks do not depend on dv: the mask function has no V.
    num_q, length, dim, _ = shape
    assert forward_blocks(num_q, length, dim, dim)[:3] == blocks[:3]


@pytest.mark.parametrize("shape", [(200, 100, 96, 160), (SHORT_LENGTH, 64, 64, 512)], ids=str)
def test_with_and_without_v_the_scores_are_the_same_bits(shape):
    # The mask function runs the kernel without V, the fused forward with it; where dv is wider
    # than d they still sum the scores in the same order, so their masks agree at any near-tie.
    num_q, length, dim, dim_v = shape
    g = torch.Generator().manual_seed(6)
    batch, heads = 2, 2
    q, k, v = (torch.randn(batch, heads, n, width, generator=g).to(DEVICE) for n, width in
               ((num_q, dim), (length, dim), (length, dim_v)))
    valid = padded_valid(batch, length, g).to(DEVICE)
    plan = sk.make_plan(batch, num_q, length, heads, generator=g).to(DEVICE)
    options = {"ratio": 0.3, "num_per_query": 2, "head_mix": "random", "mask_self": False,
               "noise": 0.2, "scale": dim ** -0.5}
    args = backend_args(q, valid, False)
    with_v = short_sequence_attention(q, k, v, *args, plan, **options)
    without_v = short_sequence_attention(q, k, None, *args, plan, **options)
    assert torch.equal(with_v.scores.view(torch.int32), without_v.scores.view(torch.int32))
    assert torch.equal(with_v.mask, without_v.mask)


def backend_args(q, valid, mask_self):
    num_q = q.shape[2]
    return valid, default_query_pool(valid, num_q, valid if mask_self else None, mask_self)


# (Q, L, d, dv): the largest whole tile; self-attention at d = 128 (two row blocks, the general
# backward); 200 queries over 100 tokens at d = 96 and dv = 160 (four row blocks, the last
# partial, and partial chunks); 32 queries over 128 tokens at d = 96 and dv = 80 (three chunks
# of 32 each).
LARGE_SHAPES = [(SHORT_LENGTH, SHORT_LENGTH, 64, 64), (SHORT_LENGTH, SHORT_LENGTH, 128, 128),
                (200, 100, 96, 160), (32, SHORT_LENGTH, 96, 80)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(("head_mix", "mask_self", "noise"),
                         [("mean", False, 0.0), ("random", True, 0.3)])
@pytest.mark.parametrize("shape", LARGE_SHAPES, ids=str)
def test_large_shapes_match_the_reference(shape, head_mix, mask_self, noise, dtype):
    # The mask is the reference's up to near-ties and the mask function's bit for bit; the
    # output and gradients meet the fp64 rule.
    num_q, length, dim, dim_v = shape
    if mask_self and num_q != length:
        pytest.skip("mask_self needs self-attention (Q = L)")
    g = torch.Generator().manual_seed(3)
    batch, heads = 3, 2
    q, k, v, grad_out = (torch.randn(batch, heads, n, width, generator=g) for n, width in
                         ((num_q, dim), (length, dim), (length, dim_v), (num_q, dim_v)))
    valid = padded_valid(batch, length, g)
    plan = sk.make_plan(batch, num_q, length, heads, generator=g)
    q, k, v, grad_out = (x.to(DEVICE, dtype) for x in (q, k, v, grad_out))
    valid, plan = valid.to(DEVICE), plan.to(DEVICE)
    options = {"ratio": 0.3, "num_per_query": 2, "head_mix": head_mix, "mask_self": mask_self,
               "noise": noise, "plan": plan}
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, mask = sk.self_guided_attention(*leaves, valid, backend="triton", **options)
    out.backward(grad_out)
    want_mask = sk.self_guided_mask(q, k, valid, backend="reference", **options)
    assert_masks_match(mask, want_mask, q, k, valid, **options)
    assert torch.equal(mask, sk.self_guided_mask(q, k, valid, backend="triton", **options))

    keep = valid & ~mask
    assert_attention_close_to_fp64([out.detach(), *(x.grad for x in leaves)], q, k, v, grad_out,
                                    keep, scale=dim ** -0.5,
                                    atol={torch.float32: 1e-6, torch.float16: 1e-3}[dtype])
    dropped = ~keep[:, None, :, None]  # exact zero gradients, written by the backward itself
    assert not leaves[1].grad.masked_select(dropped).any()
    assert not leaves[2].grad.masked_select(dropped).any()


def test_one_launch_writes_the_mask_scores_order_and_attention():
    g = torch.Generator().manual_seed(5)
    batch, heads, num_q, length, dim = 7, 2, 9, 37, 16
    q, k, v = (torch.randn(batch, heads, n, dim, generator=g).to(DEVICE)
               for n in (num_q, length, length))
    valid = padded_valid(batch, length, g).to(DEVICE)
    plan = sk.make_plan(batch, num_q, length, heads, generator=g).to(DEVICE)
    options = {"ratio": 0.3, "num_per_query": 1, "head_mix": "mean", "mask_self": False,
               "noise": 0.0, "scale": dim ** -0.5}
    order = torch.empty(batch, length, dtype=torch.int32, device=DEVICE)
    kept = torch.empty(batch, dtype=torch.int32, device=DEVICE)
    valid, pool = backend_args(q, valid, False)
    for _ in range(2):  # the first call may compile
        with count_launches() as launches:
            result = short_sequence_attention(q, k, v, valid, pool, plan, **options,
                                              order_out=(order, kept))
    assert launches.names == ["triton:_short_sequence_kernel"], launches.summary()

    counts = mask_counts(valid, pool, ratio=0.3, num_per_query=1, mask_self=False, noise=0.0)
    chosen = chosen_rows(plan, pool, counts.num_rows)
    want_scores = reference.token_scores(q, k, valid, chosen, plan.head, head_mix="mean",
                                         scale=dim ** -0.5)
    torch.testing.assert_close(result.scores[valid], want_scores[valid], rtol=1e-5, atol=1e-7)
    assert torch.isneginf(result.scores[~valid]).all()
    assert torch.equal(result.mask.sum(dim=1), counts.num_masked)
    expected_order, expected_kept = kept_keys(valid & ~result.mask)
    assert torch.equal(order, expected_order) and torch.equal(kept, expected_kept)
    mask_only = short_sequence_attention(q, k, None, valid, pool, plan, **options)
    assert torch.equal(mask_only.mask, result.mask) and mask_only.out is None
    expected_out, expected_lse = triton_backend.attention_forward(q, k, v, valid & ~result.mask,
                                                                  scale=dim ** -0.5)
    torch.testing.assert_close(result.out, expected_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.lse, expected_lse, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("setup", SETUPS)
def test_exact_ties_go_to_the_lower_index_and_the_batch_changes_no_bit(setup):
    q, k, valid, pool, plan, kwargs = setup_inputs(setup, SHORT)
    result = short_sequence_attention(q, k, None, valid, pool, plan, **kwargs)
    want = sk.self_guided_mask(q, k, valid, backend="reference", plan=plan, **kwargs)
    assert_masks_match(result.mask, want, q, k, valid, plan=plan, **kwargs)
    if kwargs["noise"] == 0.0 and not kwargs["mask_self"]:  # every pick is a top score
        assert_exact_ties_to_lower_index(result.mask.cpu(), result.scores.cpu(), valid.cpu(),
                                         torch.zeros_like(valid.cpu()))
    alone = sk.MaskPlan(*(field[1:2] for field in plan))
    one = short_sequence_attention(q[1:2], k[1:2], None, valid[1:2], pool[1:2], alone, **kwargs)
    assert torch.equal(one.scores.view(torch.int32), result.scores[1:2].view(torch.int32))
    assert torch.equal(one.mask, result.mask[1:2])


@pytest.mark.skipif(CUDA, reason="records the interpreter's loads: CPU only")
def test_kernels_load_only_what_they_need(monkeypatch):
    # Every load is recorded, address by address (the lanes its mask enables). The forward
    # reads K at the valid tokens only (the scores need all of them) and V at the kept ones
    # only; the backward reads K and V at the kept keys only.
    g = torch.Generator().manual_seed(3)
    batch, heads, num_q, length = 7, 2, 5, 40
    q = torch.randn(batch, heads, num_q, 16, generator=g)
    k = torch.randn(batch, length, heads, 16, generator=g).transpose(1, 2)  # any strides
    v = torch.randn(batch, heads, length, 32, generator=g)
    valid = padded_valid(batch, length, g)
    plan = sk.make_plan(batch, num_q, length, heads, generator=g)
    order = torch.empty(batch, length, dtype=torch.int32)
    kept = torch.empty(batch, dtype=torch.int32)
    loaded = record_loads(monkeypatch)
    result = short_sequence_attention(q, k, v, *backend_args(q, valid, False), plan, ratio=0.3,
                                      num_per_query=2, head_mix="mean", mask_self=False,
                                      noise=0.0, scale=0.25, order_out=(order, kept))
    forward_loads = np.unique(np.concatenate(loaded))
    loaded.clear()
    short_sequence_backward(torch.ones_like(result.out), q, k, v, order, kept, result.out,
                            result.lse, scale=0.25)
    backward_loads = np.unique(np.concatenate(loaded))
    keep = valid & ~result.mask
    assert keep.any() and (valid & ~keep).any()
    for x, loads, needed in ((k, forward_loads, valid), (v, forward_loads, keep),
                             (k, backward_loads, keep), (v, backward_loads, keep)):
        addresses = element_addresses(x)
        loads = torch.from_numpy(loads)
        assert not torch.isin(addresses.masked_select(~needed[:, None, :, None]), loads).any()
        assert torch.isin(addresses.masked_select(needed[:, None, :, None]), loads).all()
