"""Triton masked attention (attention.py): forward and backward against an fp64 oracle.

Accuracy rule (as FlashAttention tests it): the kernel's error against the fp64 reference is at
most twice the error of plain PyTorch attention computed in the same dtype, plus a tiny atol.
Without a GPU these run in Triton's interpreter on CPU (tests/conftest.py), in fp32 and fp16 at
tiny shapes. On a GPU the same tests run compiled, plus bf16, the benchmark workloads (bench/README.md, "Workloads")
(reduced batch), determinism, peak memory, opcheck and torch.compile.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import (
    CUDA,
    DEVICE,
    element_addresses,
    import_triton_backend,
    needs_gpu,
    record_loads,
    use_triton_path,
)

import sma_kernels as sk
from sma_kernels import reference
from sma_kernels.testing import assert_close_to_fp64, padded_valid

triton_backend = import_triton_backend()

import triton

from sma_kernels.triton import attention as attention_kernels
from sma_kernels.triton import launch
from sma_kernels.triton import select as select_kernels
from sma_kernels.triton._common import cdiv, next_power_of_2
from sma_kernels.triton.kept_keys import kept_keys

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
# The tiny atol of the rule, per dtype, relative to the largest value compared: a few roundings
# (the kernel's and PyTorch's summation orders differ, and PyTorch is sometimes lucky).
ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def plain_attention(q, k, v, keep, scale):
    """Attention as a user would write it in PyTorch, entirely in the inputs' dtype."""
    logits = (q @ k.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~keep[:, None, None, :], float("-inf"))
    return (torch.softmax(logits, dim=-1) @ v).nan_to_num(0.0)


def check_attention(batch, heads, num_q, length, dim, dim_v, dtype, seed, keep=None):
    """Forward and backward of random inputs against the oracle; returns the inputs."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, heads, n, dim, generator=g) for n in (num_q, length))
    v = torch.randn(batch, heads, length, dim_v, generator=g)
    if keep is None:
        keep = padded_valid(batch, length, g)
    grad_out = torch.randn(batch, heads, num_q, dim_v, generator=g)
    q, k, v, grad_out = (x.to(DEVICE, dtype) for x in (q, k, v, grad_out))
    keep = keep.to(DEVICE)
    scale = dim ** -0.5

    out, lse = triton_backend.attention_forward(q, k, v, keep, scale=scale)
    grads = triton_backend.attention_backward(grad_out, q, k, v, keep, out, lse, scale=scale)

    q64, k64, v64, go64 = (x.double() for x in (q, k, v, grad_out))
    out64, lse64 = reference.attention_forward(q64, k64, v64, keep, scale=scale)
    grads64 = reference.attention_backward(go64, q64, k64, v64, keep, out64, lse64, scale=scale)

    plain_in = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    plain_out = plain_attention(*plain_in, keep, scale)
    plain_out.backward(grad_out)
    plain_grads = [x.grad.nan_to_num(0.0) for x in plain_in]

    assert out.dtype == dtype and out.shape == (batch, heads, num_q, dim_v)
    assert lse.dtype == torch.float32 and lse.shape == (batch, heads, num_q)
    # lse: +inf exactly where the sample keeps no key, fp32-accurate elsewhere.
    assert torch.equal(torch.isinf(lse), torch.isinf(lse64))
    finite = torch.isfinite(lse64)
    torch.testing.assert_close(lse[finite].double(), lse64[finite], rtol=1e-5, atol=1e-5)
    for name, got, plain, oracle in zip(("out", "dq", "dk", "dv"), (out, *grads),
                                        (plain_out, *plain_grads), (out64, *grads64)):
        assert got.dtype == dtype and got.shape == oracle.shape, name
        atol = ATOL[dtype] * max(1.0, float(oracle.abs().max()))
        assert_close_to_fp64(got, plain, oracle, atol=atol, name=name)
    empty = ~keep.any(dim=1)  # samples with no kept key: zero output and zero gradients
    for x in (out, *grads):
        assert not x[empty].any()
    dropped = ~keep[:, None, :, None]  # dropped keys: exact zero gradients
    for x in grads[1:]:
        assert not x.masked_select(dropped).any()
    return q, k, v


# (B, H, Q, L, d, dv); B = 7 covers every padding layout of sma_kernels.testing.padded_valid
SHAPES = {
    "L37-Q28-d16": (7, 2, 28, 37, 16, 16),
    "dv-ne-d": (7, 2, 5, 70, 16, 32),
    "Q1": (7, 1, 1, 45, 16, 32),
    "higgs-like": (7, 2, 28, 28, 16, 16),
    "d-not-pow2": (7, 1, 9, 40, 24, 40),
    # The middle hole of padded_valid: a long run of dropped keys inside the row.
    "interior-hole": (7, 1, 9, 200, 16, 16),
    "Q1024-d128": (2, 1, 1024, 40, 128, 128),  # the largest Q and head dim of the contract
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_attention_matches_reference(shape, dtype):
    check_attention(*shape, dtype, seed=sum(shape))


def test_host_block_arithmetic_matches_triton():
    for n in range(1, 5000):
        assert next_power_of_2(n) == triton.next_power_of_2(n)
        for block in (16, 32, 64, 128):
            assert cdiv(n, block) == triton.cdiv(n, block)


# Under the interpreter NumPy warns of the overflow this test provokes, and of its NaN.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_dropped_entries_get_zero_gradients_where_their_probabilities_overflow(dtype):
    # The dK/dV kernel masks no logit in its loop: a block's entries past the kept keys hold
    # K = V = 0, so their P is exp(-lse), whatever that is. With every logit near -144, lse is
    # below -89 and exp(-lse) overflows fp32: those entries' rows of the accumulators hold inf
    # and NaN. The stores must still write zeros there, and nothing of it may reach the kept
    # keys' gradients. (At such logits the backward's P, recomputed from the lse, is off by
    # about an ulp of the logit, 1.5e-5: the tolerance is that, not the accuracy rule.)
    g = torch.Generator().manual_seed(5)
    batch, heads, num_q, length, dim = 3, 2, 9, 70, 16
    sign = torch.randint(0, 2, (dim,), generator=g) * 2.0 - 1.0
    q = torch.randn(batch, heads, num_q, dim, generator=g) + 6.0 * sign
    k = torch.randn(batch, heads, length, dim, generator=g) - 6.0 * sign
    v = torch.randn(batch, heads, length, dim, generator=g)
    grad_out = torch.randn(batch, heads, num_q, dim, generator=g)
    keep = torch.rand(batch, length, generator=g) < 0.7
    q, k, v, grad_out = (x.to(DEVICE, dtype) for x in (q, k, v, grad_out))
    keep = keep.to(DEVICE)
    out, lse = triton_backend.attention_forward(q, k, v, keep, scale=0.25)
    assert (lse < -89.0).all()  # exp(-lse) overflows fp32 in every row
    grads = triton_backend.attention_backward(grad_out, q, k, v, keep, out, lse, scale=0.25)
    q64, k64, v64, go64 = (x.double() for x in (q, k, v, grad_out))
    out64, lse64 = reference.attention_forward(q64, k64, v64, keep, scale=0.25)
    grads64 = reference.attention_backward(go64, q64, k64, v64, keep, out64, lse64, scale=0.25)
    dropped = ~keep[:, None, :, None]
    for name, got, oracle in zip(("dq", "dk", "dv"), grads, grads64):
        assert torch.isfinite(got).all(), name
        tolerance = (1e-4 if dtype == torch.float32 else 1e-2) * float(oracle.abs().max())
        torch.testing.assert_close(got.double(), oracle, rtol=0.0, atol=tolerance, msg=name)
    for name, got in zip(("dk", "dv"), grads[1:]):
        assert not got.masked_select(dropped).any(), name


@pytest.mark.parametrize("length", [1, 37, 200, 1000, 9000])
def test_kept_key_order(length):
    # L = 9000 sweeps three chunks of 4096 keys: the prefix counts carry across chunks.
    g = torch.Generator().manual_seed(length)
    keep = padded_valid(7, length, g)
    keep[6] = torch.rand(length, generator=g) < 0.01  # sparse: long runs of dropped keys
    order, kept = kept_keys(keep.to(DEVICE))
    assert order.dtype == kept.dtype == torch.int32
    assert order.shape == (7, length) and kept.shape == (7,)
    for b in range(keep.shape[0]):
        want = torch.cat([keep[b].nonzero().flatten(), (~keep[b]).nonzero().flatten()])
        assert kept[b] == keep[b].sum()
        assert torch.equal(order[b].cpu().long(), want)  # a stable partition, kept keys first


ATTENTION_CONFIGS = {attention_kernels._attention_fwd_kernel: attention_kernels._FWD_CONFIGS,
                     attention_kernels._attention_bwd_dq_kernel: attention_kernels._DQ_CONFIGS,
                     attention_kernels._attention_bwd_dkdv_kernel: attention_kernels._DKDV_CONFIGS}


@pytest.mark.parametrize("config", range(max(map(len, ATTENTION_CONFIGS.values()))))
def test_attention_with_each_gpu_config(config, monkeypatch):
    # The tests above run one config; a GPU autotunes over all of them. Run i forces config
    # i (modulo its count) of every attention kernel: each must meet the error rule and give
    # exact zeros at dropped keys (check_attention). Blocks of different sizes sum in different
    # orders, so the bits differ between configs except where every term is exact: a sample
    # whose only kept key is the last (the tail of the last block) gets that key's value row,
    # bit for bit, under every config.
    for kernel, configs in ATTENTION_CONFIGS.items():
        monkeypatch.setattr(kernel, "configs", [configs[config % len(configs)]])
    # A direct launch would reuse the kernel an earlier run compiled for another config.
    monkeypatch.setattr(launch, "DIRECT", False)
    g = torch.Generator().manual_seed(config)
    length = 300
    keep = torch.rand(3, length, generator=g) < 0.7
    keep[:, 128:256] = False  # a long run of dropped keys
    keep[1] = False
    keep[1, [3, length - 1]] = True  # two kept keys, one in the tail of the last block
    keep[2] = False  # no kept key
    q, k, v = check_attention(3, 1, 130, length, 16, 16, torch.float32, seed=config, keep=keep)
    # Query counts below every config's query tile (only a partial tile), and a multiple of
    # them all (full tiles only): the dK/dV loop takes its full tiles apart.
    for num_q in (7, 64):
        check_attention(2, 1, num_q, 70, 16, 16, torch.float32, seed=config + num_q)
    keep[1, 3] = False
    out, _ = triton_backend.attention_forward(q, k, v, keep.to(DEVICE), scale=0.25)
    assert torch.equal(out[1], v[1, :, length - 1 :].expand(1, 130, 16))


# Every autotuned kernel: (module, kernel name, name of its GPU config list).
AUTOTUNED = [(select_kernels, "_select_kernel", "_CONFIGS"),
             (attention_kernels, "_attention_fwd_kernel", "_FWD_CONFIGS"),
             (attention_kernels, "_attention_bwd_dq_kernel", "_DQ_CONFIGS"),
             (attention_kernels, "_attention_bwd_dkdv_kernel", "_DKDV_CONFIGS")]


@pytest.mark.skipif(CUDA, reason="builds GPU-mode autotuners over interpreted kernels: CPU only")
def test_autotuning_once_per_size_bucket(monkeypatch):
    """A new length in the same power-of-two bucket reuses the tuned configs (a model whose
    batches are padded to their longest sequence changes L at every step). On the general path:
    the short-sequence kernel is not autotuned."""
    from sma_kernels.triton import _common

    use_triton_path(monkeypatch, "general")
    def run_once(fn, warmup, rep, quantiles):  # stands in for GPU timing: run the config once
        fn()
        return [1.0, 1.0, 1.0]

    monkeypatch.setattr(_common, "INTERPRET", False)  # the autotuners a GPU would build ...
    monkeypatch.setattr(_common, "AUTOTUNE", True)
    monkeypatch.setattr(triton.testing, "do_bench", run_once)  # ... timing by running once
    tuned = {}
    for module, name, configs in AUTOTUNED:
        tuned[name] = _common.autotune(getattr(module, configs), None, key=module._KEY,
                                       bounds=module._BOUNDS)(getattr(module, name).fn)
        monkeypatch.setattr(module, name, tuned[name])
    g = torch.Generator().manual_seed(5)
    tunings = []
    for length in (40, 60, 70):  # size buckets 64, 64, 128
        q, k, v = (torch.randn(1, 2, length, 16, generator=g).requires_grad_() for _ in range(3))
        out, _ = sk.self_guided_attention(q, k, v, ratio=0.3, num_per_query=2, mask_self=True,
                                          backend="triton")
        out.sum().backward()
        tunings.append({name: len(autotuner.cache) for name, autotuner in tuned.items()})
    assert tunings == [dict.fromkeys(tuned, 1), dict.fromkeys(tuned, 1), dict.fromkeys(tuned, 2)]


def test_attention_strided_inputs():
    # Non-contiguous q, k, v (a transposed layout) give the same result as contiguous ones.
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, n, 3, 16, generator=g).to(DEVICE).transpose(1, 2)
               for n in (7, 33, 33))
    keep = padded_valid(2, 33, g).to(DEVICE)
    out, lse = triton_backend.attention_forward(q, k, v, keep, scale=0.25)
    want, want_lse = triton_backend.attention_forward(q.contiguous(), k.contiguous(),
                                                      v.contiguous(), keep, scale=0.25)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, want_lse, rtol=1e-6, atol=1e-6)


def test_self_guided_attention_matches_reference(triton_path):
    g = torch.Generator().manual_seed(8)
    batch, heads, length, dim = 4, 2, 28, 16
    q, k, v = (torch.randn(batch, heads, length, dim, generator=g).to(DEVICE).requires_grad_()
               for _ in range(3))
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1, 20:] = False
    valid[2, :5] = False
    valid = valid.to(DEVICE)
    plan = sk.make_plan(batch, length, length, heads, generator=g).to(DEVICE)
    kwargs = {"ratio": 0.2, "num_per_query": 3, "head_mix": "random", "mask_self": True,
              "noise": 0.3, "plan": plan}
    results = []
    for backend in ("triton", "reference"):
        out, mask = sk.self_guided_attention(q, k, v, valid, backend=backend, **kwargs)
        out.square().sum().backward()
        results.append((out.detach(), mask, *(x.grad.clone() for x in (q, k, v))))
        for x in (q, k, v):
            x.grad = None
    (out, mask, *grads), (want_out, want_mask, *want_grads) = results
    assert torch.equal(mask, want_mask)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def poisoned(x, dropped):
    """x with NaN, +inf and -inf (cycling over the key index) at the ``dropped`` keys."""
    poison = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=x.dtype)
    return torch.where(dropped, poison[torch.arange(x.shape[2]) % 3][:, None], x)


@pytest.mark.skipif(CUDA, reason="records the interpreter's loads: CPU only")
def test_attention_never_loads_dropped_keys(monkeypatch):
    # Every load of the forward and backward is recorded, address by address (only the lanes
    # its mask enables): no address of a dropped key's K or V row is among them, and every kept
    # key's row is.
    loaded = record_loads(monkeypatch)
    g = torch.Generator().manual_seed(3)
    batch, heads, num_q, length = 3, 2, 5, 70
    q = torch.randn(batch, heads, num_q, 16, generator=g)
    k = torch.randn(batch, length, heads, 16, generator=g).transpose(1, 2)  # any strides
    v = torch.randn(batch, heads, length, 32, generator=g)
    keep = torch.rand(batch, length, generator=g) < 0.7
    keep[2] = False
    out, lse = triton_backend.attention_forward(q, k, v, keep, scale=0.25)
    triton_backend.attention_backward(torch.ones_like(out), q, k, v, keep, out, lse, scale=0.25)
    loaded = torch.from_numpy(np.unique(np.concatenate(loaded)))
    dropped = ~keep[:, None, :, None]
    for x in (k, v):
        addresses = element_addresses(x)
        assert not torch.isin(addresses.masked_select(dropped), loaded).any()
        assert torch.isin(addresses.masked_select(~dropped), loaded).all()


# Under the interpreter NumPy warns where a kernel computes on NaN or Inf: no kernel computes with
# the poison of a dropped key, so no warning may appear.
NO_ARITHMETIC_ON_DROPPED = pytest.mark.filterwarnings("error::RuntimeWarning")


@NO_ARITHMETIC_ON_DROPPED
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_attention_ignores_dropped_keys(dtype):
    # Padded and masked keys (valid, not kept) hold NaN, +inf and -inf in k and v: forward and
    # backward equal those of the same call with zeros there, bit for bit.
    g = torch.Generator().manual_seed(21)
    batch, heads, num_q, length, dim, dim_v = 7, 2, 9, 140, 16, 32
    q = torch.randn(batch, heads, num_q, dim, generator=g)
    k = torch.randn(batch, heads, length, dim, generator=g)
    v = torch.randn(batch, heads, length, dim_v, generator=g)
    grad_out = torch.randn(batch, heads, num_q, dim_v, generator=g)
    valid = padded_valid(batch, length, g)
    keep = valid & (torch.rand(batch, length, generator=g) < 0.7)
    dropped = ~keep[:, None, :, None]
    empty = ~keep.any(dim=1)
    assert empty[5] and (valid & ~keep).any()  # a sample without tokens, and masked tokens
    q, grad_out, keep_d = q.to(DEVICE, dtype), grad_out.to(DEVICE, dtype), keep.to(DEVICE)
    runs = []
    for k_in, v_in in [(k.masked_fill(dropped, 0.0), v.masked_fill(dropped, 0.0)),
                       (poisoned(k, dropped), poisoned(v, dropped))]:
        k_in, v_in = k_in.to(DEVICE, dtype), v_in.to(DEVICE, dtype)
        out, lse = triton_backend.attention_forward(q, k_in, v_in, keep_d, scale=0.25)
        grads = triton_backend.attention_backward(grad_out, q, k_in, v_in, keep_d, out, lse,
                                                  scale=0.25)
        runs.append([x.cpu() for x in (out, lse, *grads)])
    for name, clean, got in zip(("out", "lse", "dq", "dk", "dv"), *runs):
        assert not got.isnan().any(), name
        assert torch.equal(got, clean), name
    out, lse, d_q, d_k, d_v = runs[1]
    assert not d_k.masked_select(dropped).any() and not d_v.masked_select(dropped).any()
    assert torch.isinf(lse[empty]).all()
    for x in (out, d_q, d_k, d_v):  # the sample without a kept key: zeros, whatever v holds
        assert not x[empty].any()


@NO_ARITHMETIC_ON_DROPPED
def test_self_guided_attention_ignores_padded_and_masked_values(triton_path):
    # Through the public op: k and v of the padded tokens, and v of the masked ones, hold NaN and
    # infinities (the masked tokens' k decides the mask, so it stays finite). The mask, output
    # and gradients are those of the clean inputs.
    g = torch.Generator().manual_seed(9)
    batch, heads, num_q, length, dim = 7, 2, 6, 45, 16
    q = torch.randn(batch, heads, num_q, dim, generator=g)
    k, v = (torch.randn(batch, heads, length, dim, generator=g) for _ in range(2))
    valid = padded_valid(batch, length, g)
    grad_out = torch.randn(batch, heads, num_q, dim, generator=g)
    plan = sk.make_plan(batch, num_q, length, heads, generator=g)
    kwargs = {"ratio": 0.3, "num_per_query": 2, "head_mix": "random", "noise": 0.3, "plan": plan,
              "backend": "triton"}
    _, mask = sk.self_guided_attention(q, k, v, valid, **kwargs)
    padded = ~valid[:, None, :, None]
    dropped = ~(valid & ~mask)[:, None, :, None]
    runs = []
    for inputs in [(q, k.masked_fill(padded, 0.0), v.masked_fill(dropped, 0.0)),
                   (q, poisoned(k, padded), poisoned(v, dropped))]:
        inputs = [x.clone().requires_grad_() for x in inputs]
        out, got_mask = sk.self_guided_attention(*inputs, valid, **kwargs)
        out.backward(grad_out)
        runs.append((got_mask, out.detach(), *(x.grad for x in inputs)))
    for name, clean, got in zip(("mask", "out", "dq", "dk", "dv"), *runs):
        assert torch.equal(got, clean), name
    _, _, _, d_k, d_v = runs[1]
    assert not d_k.masked_select(dropped).any() and not d_v.masked_select(dropped).any()


def test_rows_whose_kept_logits_are_all_minus_inf_get_the_references_zeros(triton_path):
    # q = -inf on one row and k > 0: every logit of that row is -inf. The reference gives
    # out = 0 and lse = +inf there (its logsumexp is -inf); so must both Triton paths, not NaN.
    g = torch.Generator().manual_seed(6)
    batch, heads, num_q, length, dim = 2, 1, 4, 40, 16
    q = torch.randn(batch, heads, num_q, dim, generator=g)
    q[0, 0, 1] = float("-inf")
    k = torch.rand(batch, heads, length, dim, generator=g) + 0.5
    v = torch.randn(batch, heads, length, dim, generator=g)
    keep = torch.rand(batch, length, generator=g) < 0.7
    out, lse = triton_backend.attention_forward(q, k, v, keep, scale=0.25)
    want_out, want_lse = reference.attention_forward(q, k, v, keep, scale=0.25)
    assert want_lse[0, 0, 1] == float("inf") and not want_out[0, 0, 1].any()
    assert torch.equal(lse.isinf(), want_lse.isinf()) and not out[0, 0, 1].any()
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)
    plan = sk.make_plan(batch, num_q, length, heads, generator=g)
    fused, _ = sk.self_guided_attention(q, k, v, keep, ratio=0.2, num_per_query=1, plan=plan,
                                        backend="triton")
    assert not fused[0, 0, 1].isnan().any() and not fused[0, 0, 1].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_forward_weights_a_rows_largest_logit_by_exactly_one(dtype):
    """The forward's exponent at a row's maximum is exactly 0 (docs/design.md, "Kernels"). Row i
    has one key at the logit a * b_i, near 2^32 in base 2, where one ulp is 512, and every other
    key at 0: the softmax is one-hot, so out = that key's value. Each b_i makes the fp32 product
    a * b_i * scale * log2(e) err by more than 150: an exponent that kept that error, as a
    multiply-add of the product and the rounded maximum computes it on a GPU, makes exp2
    overflow to inf or flush to 0, and the row NaN."""
    qk_scale = np.float64(np.float32(attention_kernels.LOG2E))  # scale = 1, as the kernel has it
    a = 65504.0  # the largest fp16
    b = [value for value in np.arange(45536.0, 65505.0, 32.0)  # fp16 values
         if abs(a * value * qk_scale - np.float32(a * value * qk_scale)) > 150][:8]
    num_q, length, dim = len(b), 256, 16  # 256 keys: full key blocks at every config
    big_key = torch.arange(num_q) * 29 + 3
    q = torch.zeros(1, 1, num_q, dim)
    k = torch.zeros(1, 1, length, dim)
    for row, (key, value) in enumerate(zip(big_key.tolist(), b)):
        q[0, 0, row, row] = a
        k[0, 0, key, row] = value
    v = torch.randn(1, 1, length, dim, generator=torch.Generator().manual_seed(3))
    q, k, v = (x.to(DEVICE, dtype) for x in (q, k, v))
    keep = torch.ones(1, length, dtype=torch.bool, device=DEVICE)
    out, lse = triton_backend.attention_forward(q, k, v, keep, scale=1.0)
    assert torch.equal(out[0, 0], v[0, 0, big_key.to(DEVICE)])
    want_lse = torch.tensor([a * value for value in b], dtype=torch.float64)
    torch.testing.assert_close(lse[0, 0].double().cpu(), want_lse, rtol=2e-7, atol=0)


def test_opcheck_attention_op():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 2, 5, 16, generator=g).to(DEVICE).requires_grad_()
    k = torch.randn(2, 2, 20, 16, generator=g).to(DEVICE).requires_grad_()
    v = torch.randn(2, 2, 20, 32, generator=g).to(DEVICE).requires_grad_()
    keep = torch.rand(2, 20, generator=g) < 0.7
    keep[1] = False
    torch.library.opcheck(torch.ops.sma_kernels.masked_attention.default,
                          (q, k, v, keep.to(DEVICE), 0.25, "triton"))


# ----------------------------------------------------------------------------- GPU only

# The benchmark workloads (bench/README.md, "Workloads") at reduced batch: (B, H, Q, L, d, dv)
WORKLOADS = {
    "proteins": (4, 8, 256, 1024, 32, 128),
    "molecules": (2, 12, 512, 512, 64, 64),
    "higgs": (32, 8, 28, 28, 16, 16),
    "pixels": (1, 8, 256, 36864, 32, 128),
}


@needs_gpu
@pytest.mark.parametrize("name", WORKLOADS.keys())
def test_gpu_workload_attention_bf16(name):
    batch, heads, num_q, length, dim, dim_v = WORKLOADS[name]
    g = torch.Generator().manual_seed(0)
    keep = padded_valid(batch, length, g)
    keep[0] = torch.rand(length, generator=g) < 0.8  # the first sample is always a realistic one
    check_attention(batch, heads, num_q, length, dim, dim_v, torch.bfloat16, seed=1, keep=keep)


@needs_gpu
def test_gpu_attention_is_deterministic():
    batch, heads, num_q, length, dim, dim_v = WORKLOADS["proteins"]
    g = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(batch, heads, num_q, dim, generator=g, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, heads, length, dim, generator=g, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(batch, heads, length, dim_v, generator=g, device="cuda", dtype=torch.bfloat16)
    grad_out = torch.randn(batch, heads, num_q, dim_v, generator=g, device="cuda",
                           dtype=torch.bfloat16)
    keep = torch.rand(batch, length, generator=g, device="cuda") < 0.8
    runs = []
    for _ in range(2):
        out, lse = triton_backend.attention_forward(q, k, v, keep, scale=0.2)
        runs.append((out, lse, *triton_backend.attention_backward(grad_out, q, k, v, keep, out, lse,
                                                                  scale=0.2)))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def _pixels_inputs(batch, seed=5):
    _, heads, num_q, length, dim, dim_v = WORKLOADS["pixels"]
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, e, generator=g, device="cuda", dtype=torch.bfloat16)
               for n, e in ((num_q, dim), (length, dim), (length, dim_v)))
    valid = torch.arange(length, device="cuda")[None, :] < torch.tensor(
        [length, length * 3 // 4], device="cuda")[:batch, None]
    return q, k, v, valid


@needs_gpu
def test_gpu_peak_memory_has_no_attention_matrix():
    batch = 2
    q, k, v, valid = _pixels_inputs(batch)
    heads, num_q, length = q.shape[1], q.shape[2], k.shape[2]
    element = q.element_size()
    attention_matrix = batch * heads * num_q * length * element
    kwargs = {"ratio": 0.15, "num_per_query": 4, "generator": torch.Generator(device="cuda"),
              "backend": "triton"}
    for x in (q, k, v):
        x.requires_grad_()
    out, _ = sk.self_guided_attention(q, k, v, valid, **kwargs)
    out.sum().backward()  # autotuning allocates its own scratch: measure a second call
    for x in (q, k, v):
        x.grad = None
    torch.cuda.synchronize()

    def peak_extra(fn):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - before

    out, forward = peak_extra(lambda: sk.self_guided_attention(q, k, v, valid, **kwargs)[0])
    _, backward = peak_extra(lambda: out.sum().backward())
    # Forward: the output, its lse and O(B*L) plan (argsort temporaries included), scores and
    # masks; generous constants, still far below one (B, H, Q, L) tensor.
    out_bytes = out.numel() * element
    forward_bound = out_bytes + 16 * batch * heads * num_q + 128 * batch * length + (4 << 20)
    # Backward: dq, dk, dv, plus output-sized temporaries (the incoming gradient, fp32 delta).
    grad_bytes = (q.numel() + k.numel() + v.numel()) * element
    backward_bound = grad_bytes + 5 * out.numel() * 4 + (4 << 20)
    assert forward < min(forward_bound, attention_matrix / 8), f"forward extra {forward} B"
    assert backward < min(backward_bound, grad_bytes + attention_matrix / 8), \
        f"backward extra {backward} B"


@needs_gpu
def test_gpu_torch_compile_self_guided_attention():
    q, k, v, valid = _pixels_inputs(1, seed=6)
    q, k, v = (x[..., :2048, :].contiguous() if x.shape[2] > 2048 else x for x in (q, k, v))
    valid = valid[:, :2048]
    plan = sk.make_plan(1, q.shape[2], k.shape[2], q.shape[1], generator=torch.Generator(
        device="cuda").manual_seed(1))

    def layer(q, k, v):
        out, mask = sk.self_guided_attention(q, k, v, valid, ratio=0.15, num_per_query=4,
                                             plan=plan, backend="triton")
        return out.float().square().mean(), mask

    results = []
    for fn in (layer, torch.compile(layer)):
        inputs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        loss, mask = fn(*inputs)
        loss.backward()
        results.append((mask, loss.detach(), *(x.grad for x in inputs)))
    (mask, *values), (compiled_mask, *compiled_values) = results
    assert torch.equal(compiled_mask, mask)
    for eager, compiled in zip(values, compiled_values):  # fused elementwise code may round apart
        torch.testing.assert_close(compiled, eager, rtol=1e-2, atol=1e-5)


@needs_gpu
def test_gpu_opcheck_mask_and_attention_bf16():
    q, k, v, valid = _pixels_inputs(1, seed=7)
    q, k, v = (x[..., :300, :].contiguous() for x in (q, k, v))
    valid = valid[:, :300]
    plan = sk.make_plan(1, 256, 300, 8, generator=torch.Generator(device="cuda"))
    torch.library.opcheck(torch.ops.sma_kernels.self_guided_mask.default,
                          (q, k, valid, torch.ones(1, 256, dtype=torch.bool, device="cuda"), *plan,
                           0.15, 4, "mean", False, 0.0, 0.2, "triton"))
    torch.library.opcheck(torch.ops.sma_kernels.masked_attention.default,
                          (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), valid, 0.2,
                           "triton"))
