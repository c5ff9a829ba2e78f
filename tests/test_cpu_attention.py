"""The CPU attention over kept keys (csrc/cpu/kept_attention.cpp), the cpp backend's masked_attention.

Outputs and gradients within the FlashAttention rule of the fp64 reference (error at most twice
plain SDPA's in the same dtype, plus a tiny atol) for fp32, bf16 and fp16, and within a few units
in the last place of it in fp64; masked and padded keys never reach an output and get exactly
zero gradients, whatever they hold; a sample with no kept key gives zeros; bitwise the same for 1
and 2 threads and for any strides; no (B, H, Q, L) memory; the raw ops pass opcheck and refuse
inconsistent inputs. The copies of the kernels for narrower instruction sets than this machine's
are run too (SMA_KERNELS_CPU_ISA), in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sma_kernels as sk
from sma_kernels import reference

CPP = sk.backends()["cpp"]
pytestmark = pytest.mark.skipif(not CPP["available"], reason=f"C++ backend unavailable: {CPP['reason']}")

forward_op = torch.ops.sma_kernels_C.kept_attention_forward
backward_op = torch.ops.sma_kernels_C.kept_attention_backward

# (B, H, Q, L, d, dv): d != dv, sizes off the kernel's blocks (16 columns, 64 rows, 128 and 64 keys,
# 256-row chunks), several key steps and query chunks.
SHAPES = [
    (2, 3, 70, 300, 32, 128),
    (2, 2, 300, 150, 40, 24),
    (3, 2, 33, 200, 64, 64),
    (2, 1, 5, 7, 3, 5),
]


def make_case(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0):
    """q, k, v in ``dtype`` and a keep mask whose samples are a random subset, right padding with
    a random subset, and (for B >= 3) a single kept key."""
    batch, heads, queries, length, dim, dim_v = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, queries, dim, generator=g).to(dtype)
    k = torch.randn(batch, heads, length, dim, generator=g).to(dtype)
    v = torch.randn(batch, heads, length, dim_v, generator=g).to(dtype)
    keep = torch.rand(batch, length, generator=g) < 0.7
    keep[0, 0] = True
    if batch >= 2:
        keep[1, length * 2 // 3:] = False
        keep[1, 0] = True
    if batch >= 3:
        keep[2] = False
        keep[2, length // 2] = True
    return q, k, v, keep


def seeded_grad_out(q: torch.Tensor, v: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """A random gradient of the output (B, H, Q, dv), in q's dtype, from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*q.shape[:3], v.shape[-1], generator=g).to(q.dtype)


def kernel_grads(q, k, v, keep, grad_out, scale):
    out, lse = forward_op(q, k, v, keep, scale)
    return (out, lse, *backward_op(grad_out, q, k, v, keep, out, lse, scale))


def fp64_grads(q, k, v, keep, grad_out, scale):
    q, k, v, grad_out = (x.double() for x in (q, k, v, grad_out))
    out, lse = reference.attention_forward(q, k, v, keep, scale=scale)
    return (out, lse, *reference.attention_backward(grad_out, q, k, v, keep, out, lse, scale=scale))


def sdpa_grads(q, k, v, keep, grad_out, scale):
    """Plain SDPA in the inputs' dtype, with the keys not kept removed by its boolean mask."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, reference.kept_rows(k, keep), reference.kept_rows(v, keep),
                                         attn_mask=keep[:, None, None, :], scale=scale)
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


def max_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref).abs().max().item()


def rounding_atol(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """FlashAttention's tiny atol: twice the rounding error of ref + 0.3 - 0.3 in ``dtype``."""
    x = ref.to(dtype)
    return 2 * max_error(x + 0.3 - 0.3, x.double())


def assert_lse_close(lse: torch.Tensor, ref_lse: torch.Tensor) -> None:
    """The log-sum-exp within 4 units in the last place of its dtype at its largest magnitude
    (measured: at most 1.4, for every dtype and instruction set)."""
    tolerance = 4 * torch.finfo(lse.dtype).eps * ref_lse.abs().max().item()
    assert max_error(lse, ref_lse) <= tolerance, (max_error(lse, ref_lse), tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_within_twice_the_error_of_sdpa(shape, dtype):
    q, k, v, keep = make_case(shape, dtype)
    scale = shape[4] ** -0.5
    grad_out = seeded_grad_out(q, v)
    out, lse, *grads = kernel_grads(q, k, v, keep, grad_out, scale)
    ref_out, ref_lse, *ref_grads = fp64_grads(q, k, v, keep, grad_out, scale)
    sdpa_out, *sdpa_grad = sdpa_grads(q, k, v, keep, grad_out, scale)
    assert out.dtype == dtype and lse.dtype == torch.float32
    for name, got, want, baseline in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads),
                                         (sdpa_out, *sdpa_grad)):
        assert got.dtype == dtype, name
        error, sdpa_error = max_error(got, want), max_error(baseline, want)
        assert error <= 2 * sdpa_error + rounding_atol(want, dtype), (name, error, sdpa_error)
    assert_lse_close(lse, ref_lse)


@pytest.mark.parametrize("shape", SHAPES)
def test_float64_within_a_few_ulps_of_the_reference(shape):
    # Plain PyTorch in float64 is the oracle itself, so a bound in units in the last place
    # (measured: at most 14 relative to max(1, |ref|)).
    q, k, v, keep = make_case(shape, torch.float64)
    grad_out = seeded_grad_out(q, v)
    out, lse, *grads = kernel_grads(q, k, v, keep, grad_out, 0.4)
    ref_out, ref_lse, *ref_grads = fp64_grads(q, k, v, keep, grad_out, 0.4)
    assert lse.dtype == torch.float64
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
        assert got.dtype == torch.float64, name
        tolerance = 64 * torch.finfo(torch.float64).eps * max(1.0, want.abs().max().item())
        assert max_error(got, want) <= tolerance, (name, max_error(got, want), tolerance)
    assert_lse_close(lse, ref_lse)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_keys_not_kept_never_reach_outputs_and_get_zero_gradients(value):
    q, k, v, keep = make_case(SHAPES[0], torch.float32)
    grad_out = seeded_grad_out(q, v)
    clean = kernel_grads(q, k, v, keep, grad_out, 0.3)
    dropped = ~keep[:, None, :, None]
    poisoned = kernel_grads(q, k.masked_fill(dropped, value), v.masked_fill(dropped, value), keep,
                            grad_out, 0.3)
    for x, y in zip(clean, poisoned):
        assert torch.equal(x, y)
    _, _, _, dk, dv = poisoned
    assert torch.isfinite(torch.stack([t.abs().sum() for t in poisoned])).all()
    assert (dk.masked_select(dropped) == 0).all() and (dv.masked_select(dropped) == 0).all()


def test_a_sample_with_no_kept_key_gives_zeros():
    q, k, v, keep = make_case((3, 2, 20, 40, 8, 12), torch.float32)
    keep[1] = False
    k[1], v[1] = float("nan"), float("inf")
    grad_out = seeded_grad_out(q, v)
    out, lse, dq, dk, dv = kernel_grads(q, k, v, keep, grad_out, 0.5)
    assert (out[1] == 0).all() and (lse[1] == float("inf")).all()
    assert (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    ref = fp64_grads(q[::2], k[::2], v[::2], keep[::2], grad_out[::2], 0.5)
    for x, want in zip((out, lse, dq, dk, dv), ref):
        assert max_error(x[::2], want) < 1e-4


def test_the_same_bits_for_any_thread_count():
    q, k, v, keep = make_case((3, 4, 300, 400, 32, 48), torch.float32)
    grad_out = seeded_grad_out(q, v)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 1, 2):
            torch.set_num_threads(count)
            results.append(kernel_grads(q, k, v, keep, grad_out, 0.2))
    finally:
        torch.set_num_threads(threads)
    for result in results[1:]:
        for x, y in zip(result, results[0]):
            assert torch.equal(x, y)


def test_the_same_bits_for_any_strides():
    q, k, v, keep = make_case((2, 3, 70, 150, 24, 40), torch.float32)
    grad_out = seeded_grad_out(q, v)
    want = kernel_grads(q, k, v, keep, grad_out, 0.3)
    # (B, L, H, d) memory seen as (B, H, L, d); a feature stride of 2; every other slot of a tensor.
    q_strided = q.transpose(1, 2).contiguous().transpose(1, 2)
    k_strided = k.repeat_interleave(2, dim=-1)[..., ::2]
    v_strided = torch.stack([v, v], dim=2)[:, :, 0]
    keep_strided = torch.stack([keep, keep], dim=-1)[..., 0]
    grad_strided = grad_out.transpose(2, 3).contiguous().transpose(2, 3)
    assert not any(x.is_contiguous() for x in (q_strided, k_strided, v_strided, keep_strided, grad_strided))
    got = kernel_grads(q_strided, k_strided, v_strided, keep_strided, grad_strided, 0.3)
    for x, y in zip(got, want):
        assert torch.equal(x, y)
    assert got[2].stride() == q_strided.stride()  # dq is laid out like q


def test_through_the_public_op():
    g = torch.Generator().manual_seed(2)
    batch, heads, length, dim = 3, 2, 90, 16
    q, k = (torch.randn(batch, heads, length, dim, generator=g, requires_grad=True) for _ in range(2))
    v = torch.randn(batch, heads, length, 24, generator=g, requires_grad=True)
    valid = torch.rand(batch, length, generator=g) < 0.8
    plan = sk.make_plan(batch, length, length, heads, generator=g)
    options = {"ratio": 0.3, "num_per_query": 3, "head_mix": "random", "mask_self": True, "plan": plan}
    results = {}
    for backend in ("cpp", "reference"):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out, mask = sk.self_guided_attention(*leaves, valid, backend=backend, **options)
        out.square().sum().backward()
        results[backend] = (out.detach(), mask, *(x.grad for x in leaves))
    assert torch.equal(results["cpp"][1], results["reference"][1])
    for x, y in zip(results["cpp"], results["reference"]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def peak_rss_growth(fn) -> int:
    """Bytes by which fn() raises the process's peak resident memory (Linux)."""
    def peak() -> int:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))

    with open("/proc/self/clear_refs", "w") as clear:  # resets the peak to the current size
        clear.write("5")
    before = peak()
    fn()
    return peak() - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_memory_is_linear_in_the_sequence():
    # One (Q, L) fp32 block here is 256 MB; the kernels need the packed keys and O(Q + L) per thread.
    g = torch.Generator().manual_seed(3)
    heads, queries, length, dim = 1, 4096, 16384, 8
    q = torch.randn(1, heads, queries, dim, generator=g)
    k, v = (torch.randn(1, heads, length, dim, generator=g) for _ in range(2))
    keep = torch.rand(1, length, generator=g) < 0.8
    grad_out = torch.randn(1, heads, queries, dim, generator=g)
    try:
        growth = peak_rss_growth(lambda: kernel_grads(q, k, v, keep, grad_out, 0.3))
    except OSError as error:
        pytest.skip(f"cannot reset the peak resident size: {error}")
    assert growth < 48 * 2**20, growth
    out, lse, dq, *_ = kernel_grads(q, k, v, keep, grad_out, 0.3)
    ref = fp64_grads(q[:, :, :64], k, v, keep, grad_out[:, :, :64], 0.3)
    for x, want in zip((out[:, :, :64], lse[:, :, :64], dq[:, :, :64]), ref):
        assert max_error(x, want) < 1e-4


def test_opcheck_the_raw_ops():
    q, k, v, keep = make_case((3, 2, 5, 20, 4, 6), torch.float32)
    keep[1] = False
    torch.library.opcheck(forward_op.default, (q, k, v, keep, 0.5))
    out, lse = forward_op(q, k, v, keep, 0.5)
    grad_out = seeded_grad_out(q, v)
    torch.library.opcheck(backward_op.default, (grad_out, q, k, v, keep, out, lse, 0.5))
    q64, k64, v64 = (x.double() for x in (q, k, v))
    torch.library.opcheck(forward_op.default, (q64, k64.transpose(0, 0), v64, keep, 0.5))


def test_gradcheck_fp64_through_the_raw_ops():
    q, k, v, keep = make_case((2, 2, 4, 9, 3, 5), torch.float64)

    def attention(q, k, v):
        return torch.ops.sma_kernels.masked_attention(q, k, v, keep, 0.7, "cpp")[0]

    assert torch.autograd.gradcheck(attention, tuple(x.requires_grad_() for x in (q, k, v)))


@pytest.mark.parametrize(("change", "message"), [
    ({"k": torch.randn(2, 2, 7, 5)}, "does not match q"),
    ({"v": torch.randn(2, 2, 6, 5)}, "does not match k"),
    ({"v": torch.randn(2, 2, 7, 5, dtype=torch.float64)}, "share a dtype"),
    ({"keep": torch.ones(2, 7)}, "keep must be bool"),
    ({"keep": torch.ones(2, 6, dtype=torch.bool)}, "keep must be bool"),
    ({"q": torch.randn(2, 2, 3)}, "must be"),
    ({"scale": float("inf")}, "scale must be finite"),
])
def test_the_raw_ops_refuse_inconsistent_inputs(change, message):
    args = {"q": torch.randn(2, 2, 3, 4), "k": torch.randn(2, 2, 7, 4), "v": torch.randn(2, 2, 7, 5),
            "keep": torch.ones(2, 7, dtype=torch.bool), "scale": 0.5}
    out, lse = forward_op(*args.values())
    args.update(change)
    with pytest.raises(RuntimeError, match=message):
        forward_op(*args.values())
    with pytest.raises(RuntimeError, match=message):
        backward_op(torch.zeros_like(out), args["q"], args["k"], args["v"], args["keep"], out, lse,
                    args["scale"])


def test_backward_refuses_a_wrong_lse_or_out():
    q, k, v, keep = make_case((2, 2, 3, 7, 4, 5), torch.float32)
    out, lse = forward_op(q, k, v, keep, 0.5)
    with pytest.raises(RuntimeError, match="lse"):
        backward_op(out, q, k, v, keep, out, lse.double(), 0.5)
    with pytest.raises(RuntimeError, match="grad_out and out"):
        backward_op(out[..., :4], q, k, v, keep, out, lse, 0.5)


@pytest.mark.parametrize("sizes", [(0, 2, 3, 5), (2, 0, 3, 5), (2, 2, 0, 5), (2, 2, 3, 0)])
def test_empty_dimensions(sizes):
    batch, heads, queries, length = sizes
    q, k, v, _ = make_case((2, 2, 3, 5, 4, 6), torch.float32)
    q, k, v = q[:batch, :heads, :queries], k[:batch, :heads, :length], v[:batch, :heads, :length]
    keep = torch.ones(batch, length, dtype=torch.bool)
    grad_out = seeded_grad_out(q, v)
    out, lse, dq, dk, dv = kernel_grads(q, k, v, keep, grad_out, 0.5)
    assert out.shape == grad_out.shape and lse.shape == (batch, heads, queries)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    if length == 0:  # no kept key
        assert (out == 0).all() and (lse == float("inf")).all() and (dq == 0).all()
    if queries == 0:
        assert (dk == 0).all() and (dv == 0).all()


@pytest.mark.skipif("SMA_KERNELS_CPU_ISA" in os.environ, reason="already under an instruction-set cap")
@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_every_instruction_set(isa):
    """This file's tests and the mask's, with the kernels capped at ``isa``."""
    here = Path(__file__).parent
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "not memory",
               str(Path(__file__)), str(here / "test_cpu_backend.py")]
    result = subprocess.run(command, env={**os.environ, "SMA_KERNELS_CPU_ISA": isa}, capture_output=True,
                            text=True, timeout=900, cwd=here.parent, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
