"""Public API: argument checks (listed and fuzzed), torch.library registration, autograd."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import pytest
import torch
from helpers import blames
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import sma_kernels as sk
from sma_kernels import ops
from sma_kernels.backends import resolve, unavailable_reasons
from sma_kernels.plan import mask_counts

B, H, Q, L, D = 2, 2, 3, 6, 4


def inputs(dtype=torch.float32, length=L):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, H, Q, D, generator=g, dtype=dtype),
            torch.randn(B, H, length, D, generator=g, dtype=dtype),
            torch.randn(B, H, length, 5, generator=g, dtype=dtype))


def call_mask(**overrides):
    q, k, _ = inputs()
    args = {"q": q, "k": k, "valid": None, "ratio": 0.3, "num_per_query": 1}
    args.update(overrides)
    return sk.self_guided_mask(**args)


BAD_MASK_ARGS = [
    # (overrides, exception, the argument the message must begin with)
    ({"q": torch.randn(B, Q, D)}, ValueError, "q"),
    ({"k": torch.randn(B, H, L)}, ValueError, "k"),
    ({"q": [[1.0]]}, TypeError, "q"),
    ({"k": torch.randn(B + 1, H, L, D)}, ValueError, "k"),
    ({"k": torch.randn(B, H + 1, L, D)}, ValueError, "k"),
    ({"k": torch.randn(B, H, L, D + 1)}, ValueError, "k"),
    ({"k": torch.randn(B, H, L, D, dtype=torch.float64)}, TypeError, "k"),
    ({"q": torch.ones(B, H, Q, D, dtype=torch.int32)}, TypeError, "q"),
    ({"valid": torch.ones(B, L)}, TypeError, "valid"),
    ({"valid": torch.ones(B, L + 1, dtype=torch.bool)}, ValueError, "valid"),
    ({"valid": torch.ones(B, dtype=torch.bool)}, ValueError, "valid"),
    ({"ratio": 0.0}, ValueError, "ratio"),
    ({"ratio": 1.0}, ValueError, "ratio"),
    ({"ratio": -0.2}, ValueError, "ratio"),
    ({"ratio": float("nan")}, ValueError, "ratio"),
    ({"ratio": "0.3"}, TypeError, "ratio"),
    ({"num_per_query": 0}, ValueError, "num_per_query"),
    ({"num_per_query": 1.5}, TypeError, "num_per_query"),
    ({"mask_self": True}, ValueError, "mask_self"),
    ({"head_mix": "max"}, ValueError, "head_mix"),
    ({"head_mix": None}, TypeError, "head_mix"),
    ({"backend": "cuda-magic"}, ValueError, "backend"),
    ({"noise": 1.5}, ValueError, "noise"),
    ({"scale": -1.0}, ValueError, "scale"),
    ({"query_valid": torch.ones(B, Q + 1, dtype=torch.bool)}, ValueError, "query_valid"),
    ({"query_valid": torch.ones(B, Q)}, TypeError, "query_valid"),
    ({"generator": 123}, TypeError, "generator"),
    ({"generator": 123, "plan": sk.make_plan(B, Q, L, H)}, TypeError, "generator"),
    ({"q": torch.randn(B, H, Q, D, device="meta"), "k": torch.randn(B, H, L, D, device="meta"),
      "backend": "cpp"}, ValueError, "backend"),
    ({"valid": torch.ones(B, L, dtype=torch.bool, device="meta")}, ValueError, "valid"),
    ({"plan": (1, 2, 3)}, TypeError, "plan"),
    ({"plan": sk.make_plan(B, Q + 1, L, H)}, ValueError, "plan"),
    ({"plan": sk.make_plan(B, Q, L, H)._replace(head=torch.full((B, Q), H, dtype=torch.int32))},
     ValueError, "plan.head"),
]


@pytest.mark.parametrize("overrides,error,name", BAD_MASK_ARGS)
def test_bad_arguments_name_the_argument(overrides, error, name):
    with pytest.raises(error, match=blames(name)):
        call_mask(**overrides)


def test_plan_modified_in_place_is_checked_again():
    plan = sk.make_plan(B, Q, L, H, generator=torch.Generator().manual_seed(0))
    call_mask(plan=plan)  # a fresh plan passes without reading its values back
    plan.head.fill_(H)
    with pytest.raises(ValueError, match=blames("plan.head")):
        call_mask(plan=plan)


def test_plan_for_more_heads_is_refused():
    plan = sk.make_plan(B, Q, L, 8, generator=torch.Generator().manual_seed(0))
    assert int(plan.head.max()) >= H  # valid for 8 heads, out of range for these inputs' 2
    with pytest.raises(ValueError, match=blames("plan.head")):
        call_mask(plan=plan)


def test_bad_v_names_v():
    q, k, v = inputs()
    for bad, error in ((v[:, :, :-1], ValueError), (v.double(), TypeError), (v[0], ValueError),
                       (torch.randn(B, H + 1, L, 5), ValueError)):
        with pytest.raises(error, match=blames("v")):
            sk.self_guided_attention(q, k, bad, ratio=0.3, num_per_query=1)


def test_unavailable_backend_says_why(monkeypatch):
    reason = "the compiled extension sma_kernels._C is not installed"
    monkeypatch.setitem(unavailable_reasons(), "cpp", reason)
    with pytest.raises(ValueError, match=rf"^backend='cpp' is not available here: {re.escape(reason)}$"):
        call_mask(backend="cpp")
    info = sk.backends()
    assert info["cpp"]["available"] is False and info["cpp"]["reason"] == reason
    assert info["reference"]["available"]
    # "auto" passes over it: CPU tensors then go to the reference.
    assert resolve("auto", torch.device("cpu"), torch.float32) == "reference"


def test_triton_says_why_it_cannot_run_on_a_rocm_gpu(monkeypatch):
    pytest.importorskip("triton", reason="needs Triton installed")
    from sma_kernels import triton as triton_backend
    from sma_kernels.triton import _common
    monkeypatch.setattr(_common, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", "6.4")
    assert "NVIDIA GPUs only" in triton_backend._unavailable()
    monkeypatch.setattr(torch.version, "hip", None)
    assert triton_backend._unavailable() is None


ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-3, 5), st.floats(allow_nan=True),
                      st.text(max_size=6), st.just(torch.ones(2)), st.just([0.3]))


def one_argument_of(strategies: dict[str, st.SearchStrategy]) -> st.SearchStrategy[tuple[str, object]]:
    """(name, value): one of the arguments, chosen by hypothesis, with a value from its strategy."""
    return st.sampled_from(sorted(strategies)).flatmap(
        lambda name: st.tuples(st.just(name), strategies[name]))


def call_with_fuzzed(function: Callable[..., object], args: dict[str, object], name: str,
                     prefix: str = "") -> object | None:
    """``function(**args)``, where ``args[name]`` is fuzzed: its result, or None when it raised a
    ValueError or TypeError whose message begins (after ``prefix``) by naming ``name``."""
    try:
        return function(**args)
    except (ValueError, TypeError) as error:
        assert re.search(blames(name, prefix), str(error)), f"{name}={args[name]!r}: {error}"
        return None


def assert_masks_k_real_tokens(mask: torch.Tensor, valid: torch.Tensor, ratio: float) -> None:
    """``mask`` is (B, L) bool with exactly k = clamp(round(ratio * n), 1, n - 1) of each
    sample's n real tokens masked, and no padding."""
    assert mask.shape == valid.shape and mask.dtype == torch.bool
    assert not (mask & ~valid).any()
    any_rows = torch.ones(valid.shape[0], 1, dtype=torch.bool)  # k does not depend on the rows
    counts = mask_counts(valid, any_rows, ratio=ratio, num_per_query=1, mask_self=False, noise=0.0)
    assert torch.equal(mask.sum(dim=1), counts.num_masked)


PADDED = torch.tensor([[True] * L, [True, False, True, True, False, True]])
FUZZED_MASK_ARGS = {
    "ratio": st.one_of(ANY_VALUE, st.floats(0.0, 1.0)),
    "num_per_query": st.one_of(ANY_VALUE, st.integers(-1, 2**64)),
    "head_mix": st.one_of(ANY_VALUE, st.sampled_from(["mean", "random"])),
    "mask_self": ANY_VALUE,
    "noise": st.one_of(ANY_VALUE, st.floats(0.0, 1.0)),
    "scale": st.one_of(ANY_VALUE, st.floats(1e-40, 1e40)),
    "generator": st.one_of(ANY_VALUE, st.builds(torch.Generator)),
    "backend": st.one_of(ANY_VALUE, st.sampled_from(["auto", "reference", "cpp"])),
}


@settings(max_examples=200, deadline=None)
@given(fuzzed=one_argument_of(FUZZED_MASK_ARGS))
def test_fuzzed_arguments_raise_clean_errors(fuzzed):
    """Valid arguments with one replaced: a correct mask, or a ValueError/TypeError naming it."""
    name, value = fuzzed
    q, k, _ = inputs()
    args = {"q": q, "k": k, "valid": PADDED, "ratio": 0.3, "num_per_query": 1, "backend": "reference",
            name: value}
    mask = call_with_fuzzed(sk.self_guided_mask, args, name)
    if mask is not None:
        assert_masks_k_real_tokens(mask, PADDED, float(args["ratio"]))


SHAPE_SIZES = {"B": B, "H": H, "Q": Q, "L": L, "d": D}
TENSOR_DIMENSIONS = {"q": "BHQd", "k": "BHLd", "valid": "BL"}


@settings(max_examples=60, deadline=None)
@given(dimension=st.sampled_from([(name, axis) for name, symbols in TENSOR_DIMENSIONS.items()
                                  for axis in range(len(symbols))]),
       size=st.integers(0, 7))
def test_fuzzed_shapes_raise_clean_errors(dimension, size):
    """One dimension of q, k or valid resized: a mask while the shapes still agree, else a
    ValueError naming a tensor that has that dimension (or, for a size 0, q's and k's shapes)."""
    name, axis = dimension
    symbol = TENSOR_DIMENSIONS[name][axis]
    shapes = {tensor: [SHAPE_SIZES[s] for s in symbols] for tensor, symbols in TENSOR_DIMENSIONS.items()}
    shapes[name][axis] = size
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(shapes[tensor], generator=g) for tensor in ("q", "k"))
    valid = torch.ones(shapes["valid"], dtype=torch.bool)

    def call():
        return sk.self_guided_mask(q, k, valid, ratio=0.5, num_per_query=1, backend="reference")

    if size > 0 and (size == SHAPE_SIZES[symbol] or symbol == "Q"):  # any number of query rows agrees
        assert_masks_k_real_tokens(call(), valid, 0.5)
        return
    holders = "|".join(tensor for tensor, symbols in TENSOR_DIMENSIONS.items() if symbol in symbols)
    blamed = rf"^({holders})\b"
    if size == 0:
        blamed += r"|^q \(.*\) and k \(.*\) must have no empty dimension"
    with pytest.raises(ValueError, match=blamed):
        call()


PLAN_SIZES = {"batch_size": B, "num_queries": Q, "num_tokens": L, "num_heads": H}
FUZZED_PLAN_ARGS = {**{name: st.one_of(ANY_VALUE, st.integers(-1, 9)) for name in PLAN_SIZES},
                    "generator": st.one_of(ANY_VALUE, st.builds(torch.Generator))}


@settings(max_examples=60, deadline=None)
@given(fuzzed=one_argument_of(FUZZED_PLAN_ARGS))
def test_fuzzed_make_plan_arguments(fuzzed):
    """make_plan with one argument replaced: a plan of those sizes, or an error naming it."""
    name, value = fuzzed
    args = {**PLAN_SIZES, name: value}
    plan = call_with_fuzzed(sk.make_plan, args, name, prefix="make_plan: ")
    if plan is not None:
        batch, queries, tokens, heads = (args[size] for size in PLAN_SIZES)
        assert [tuple(x.shape) for x in plan] == [(batch, queries), (batch, queries), (batch, tokens)]
        assert all(x.dtype == torch.int32 for x in plan)
        assert 0 <= int(plan.head.min()) and int(plan.head.max()) < heads


def numbered_tensors(shapes: st.SearchStrategy[list[int]]) -> st.SearchStrategy[torch.Tensor]:
    """Tensors of the given shapes, of a few dtypes, holding 0, 1, 2, ... (distinct where the
    dtype allows)."""
    return st.builds(lambda shape, dtype: torch.arange(math.prod(shape)).reshape(shape).to(dtype),
                     shapes, st.sampled_from([torch.float32, torch.float64, torch.int64, torch.bool]))


def random_keeps(shapes: st.SearchStrategy[list[int]]) -> st.SearchStrategy[torch.Tensor]:
    """Random bool tensors of the given shapes, some cast to float32."""
    def draw(shape: list[int], seed: int, dtype: torch.dtype) -> torch.Tensor:
        return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.5).to(dtype)

    return st.builds(draw, shapes, st.integers(0, 2**31 - 1), st.sampled_from([torch.bool, torch.float32]))


FUZZED_DROP_ARGS = {
    # x: (B, L, ...) of any dtype and features, fewer than two dimensions, or no tensor at all
    "x": st.one_of(ANY_VALUE, numbered_tensors(st.lists(st.integers(0, 3), max_size=2).map(
        lambda features: [B, L, *features])), numbered_tensors(st.lists(st.integers(0, 3), max_size=1))),
    # keep: (B, L) or any other shape of sizes from x's, or no tensor at all
    "keep": st.one_of(ANY_VALUE, random_keeps(st.just([B, L])),
                      random_keeps(st.lists(st.sampled_from([0, 1, B, L]), max_size=3))),
}


@settings(max_examples=60, deadline=None)
@given(fuzzed=one_argument_of(FUZZED_DROP_ARGS))
def test_fuzzed_drop_masked_arguments(fuzzed):
    """drop_masked with x or keep replaced: a packing of the kept tokens, or an error naming it."""
    name, value = fuzzed
    g = torch.Generator().manual_seed(1)
    args = {"x": torch.randn(B, L, 3, generator=g), "keep": torch.rand(B, L, generator=g) < 0.5,
            name: value}
    result = call_with_fuzzed(sk.drop_masked, args, name)
    if result is not None:
        assert_packs_kept_tokens(args["x"], args["keep"], *result)


# ----------------------------------------------------------------------------- torch.library

def available_cpu_backends():
    return [name for name, info in sk.backends().items()
            if info["available"] and info["device"] in ("cpu", "any")]


@pytest.mark.parametrize("backend", available_cpu_backends())
def test_opcheck_mask(backend):
    q, k, _ = inputs()
    valid = torch.tensor([[True] * L, [False, True, True, False, True, True]])
    plan = sk.make_plan(B, Q, L, H, generator=torch.Generator().manual_seed(1))
    args = (q, k, valid, torch.ones(B, Q, dtype=torch.bool), *plan, 0.3, 1, "random", False, 0.5, 0.5,
            backend)
    torch.library.opcheck(torch.ops.sma_kernels.self_guided_mask.default, args)


def fused_cpu_backends() -> list:
    """The CPU backends with the fused self_guided_attention op; where there is none, one
    parameter that skips, saying why (never an empty parameter list, which skips silently)."""
    fused = [name for name in available_cpu_backends() if ops.has_fused_attention(name, torch.float32)]
    why = sk.backends()["triton"]["reason"] or "runs on CUDA tensors (CPU ones under TRITON_INTERPRET=1)"
    reason = f"no backend with the fused op takes CPU tensors here (triton: {why})"
    return fused or [pytest.param(None, marks=pytest.mark.skip(reason=reason), id="none")]


def default_valid_and_query_pool_args(backend: str) -> tuple:
    """The ops' arguments after the tensors for no valid and no query_valid, which reach them as
    None: every token, every query row."""
    plan = sk.make_plan(B, Q, L, H, generator=torch.Generator().manual_seed(1))
    return (None, None, *plan, 0.3, 1, "mean", False, 0.5, 0.5, backend)


@pytest.mark.parametrize("backend", available_cpu_backends())
def test_opcheck_mask_with_default_valid_and_query_pool(backend):
    q, k, _ = inputs()
    torch.library.opcheck(torch.ops.sma_kernels.self_guided_mask.default,
                          (q, k, *default_valid_and_query_pool_args(backend)))


@pytest.mark.parametrize("backend", fused_cpu_backends())
def test_opcheck_fused_attention_with_default_valid_and_query_pool(backend):
    q, k, v = (x.requires_grad_() for x in inputs())
    torch.library.opcheck(torch.ops.sma_kernels.self_guided_attention.default,
                          (q, k, v, *default_valid_and_query_pool_args(backend)))


@pytest.mark.parametrize("backend", available_cpu_backends())
@pytest.mark.parametrize("mask_self", [False, True])
def test_default_valid_and_query_pool_are_every_token_and_row(backend, mask_self):
    # The defaults are passed on as None, not filled in; the mask, output and gradients are
    # those of explicit all-True tensors, bit for bit, eagerly and under torch.compile.
    q, k, v = inputs(length=Q) if mask_self else inputs()
    num_k = k.shape[2]
    plan = sk.make_plan(B, Q, num_k, H, generator=torch.Generator().manual_seed(6))
    options = {**EAGER_OPTIONS, "mask_self": mask_self, "plan": plan, "backend": backend}
    every_token = torch.ones(B, num_k, dtype=torch.bool)
    every_row = torch.ones(B, Q, dtype=torch.bool)

    def explicit(q, k, v):
        return sk.self_guided_attention(q, k, v, every_token, query_valid=every_row, **options)

    def defaults(q, k, v):
        return sk.self_guided_attention(q, k, v, **options)

    (want_out, want_mask), want_grads = with_square_loss_grads(explicit, q, k, v)
    compiled = torch.compile(defaults, backend="aot_eager", fullgraph=True)
    for attend in (defaults, compiled):
        (out, mask), grads = with_square_loss_grads(attend, q, k, v)
        assert torch.equal(mask, want_mask) and torch.equal(out, want_out)
        for grad, want in zip(grads, want_grads):
            assert torch.equal(grad, want)
    assert torch.equal(sk.self_guided_mask(q, k, **options), want_mask)


@pytest.mark.parametrize("backend", available_cpu_backends())
def test_opcheck_attention(backend):
    q, k, v = (x.requires_grad_() for x in inputs())
    keep = torch.tensor([[True, False, True, True, False, True], [False] * L])
    torch.library.opcheck(torch.ops.sma_kernels.masked_attention.default, (q, k, v, keep, 0.5, backend))


@pytest.mark.parametrize("backend", available_cpu_backends())
def test_gradcheck_attention_fp64(backend):
    q, k, v = (x.requires_grad_() for x in inputs(torch.float64))
    valid = torch.tensor([[True] * L, [True, False, True, True, False, True]])
    plan = sk.make_plan(B, Q, L, H, generator=torch.Generator().manual_seed(2))

    def attention(q, k, v):
        return sk.self_guided_attention(q, k, v, valid, ratio=0.3, num_per_query=1, plan=plan,
                                        backend=backend)[0]

    assert torch.autograd.gradcheck(attention, (q, k, v))
    keep = torch.tensor([[True, False, True, True, False, True], [False] * L])
    assert torch.autograd.gradcheck(
        lambda q, k, v: torch.ops.sma_kernels.masked_attention(q, k, v, keep, 0.7, backend)[0], (q, k, v))


def test_torch_compile_matches_eager():
    q, k, v = inputs()
    valid = torch.tensor([[True] * L, [True, True, False, True, True, False]])
    plan = sk.make_plan(B, Q, L, H, generator=torch.Generator().manual_seed(3))

    def layer(q, k, v):
        return sk.self_guided_attention(q, k, v, valid, ratio=0.3, num_per_query=1, plan=plan)

    out, mask = torch.compile(layer, backend="aot_eager")(q, k, v)
    want_out, want_mask = layer(q, k, v)
    assert torch.equal(mask, want_mask)
    torch.testing.assert_close(out, want_out)


def test_torch_compile_traces_the_registered_ops():
    q, k, v = inputs()
    plan = sk.make_plan(B, Q, L, H, generator=torch.Generator().manual_seed(4))
    targets = []

    def record(graph_module, example_inputs):
        targets.extend(node.target for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module

    def layer(q, k, v):
        return sk.self_guided_attention(q, k, v, ratio=0.3, num_per_query=1, plan=plan,
                                        backend="reference")

    torch.compile(layer, backend=record)(q, k, v)
    names = {str(target) for target in targets}
    assert {"sma_kernels.self_guided_mask.default", "sma_kernels.masked_attention.default"} <= names, names


@pytest.mark.parametrize("backend", available_cpu_backends())
def test_make_fx_and_fake_tensors_see_the_registered_ops(backend):
    q, k, v = inputs()
    plan = sk.make_plan(B, Q, L, H, generator=torch.Generator().manual_seed(4))

    def layer(q, k, v):
        return sk.self_guided_attention(q, k, v, ratio=0.3, num_per_query=1, plan=plan,
                                        backend=backend)

    graph = make_fx(layer)(q, k, v).graph
    names = {str(node.target) for node in graph.nodes if node.op == "call_function"}
    # A backend with the fused pair runs the mask and the attention as one op.
    op = "self_guided_attention" if ops.has_fused_attention(backend, q.dtype) else "self_guided_mask"
    assert f"sma_kernels.{op}.default" in names, names
    with FakeTensorMode() as mode:  # shapes only, from the ops' fake implementations
        out, mask = sk.self_guided_attention(*(mode.from_tensor(x) for x in (q, k, v)), ratio=0.3,
                                             num_per_query=1, backend=backend)
    assert out.shape == (B, H, Q, 5) and mask.shape == (B, L) and mask.dtype == torch.bool


@pytest.mark.parametrize("backend", available_cpu_backends())
def test_vmap_goes_through_the_registered_ops(backend):
    q, k, v = inputs()
    plan = sk.make_plan(B, Q, L, H, generator=torch.Generator().manual_seed(4))

    def layer(v):
        return sk.self_guided_attention(q, k, v, ratio=0.3, num_per_query=1, plan=plan,
                                        backend=backend)[0]

    batched = torch.vmap(layer)(torch.stack([v, 2 * v]))
    torch.testing.assert_close(batched, torch.stack([layer(v), layer(2 * v)]))


@pytest.mark.parametrize("backend", available_cpu_backends())
def test_attention_has_no_second_derivative(backend):
    """Differentiating the backward raises, as the registered op does, instead of being wrong."""
    q, k, v = (x.requires_grad_() for x in inputs())
    out, _ = sk.self_guided_attention(q, k, v, ratio=0.3, num_per_query=1, backend=backend,
                                      generator=torch.Generator().manual_seed(6))
    (grad_q,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad_q.sum().backward()


EAGER_OPTIONS = {"ratio": 0.5, "num_per_query": 1, "head_mix": "random", "noise": 0.0}


def eager_case():
    q, k, v = inputs()
    valid = torch.tensor([[True] * L, [True, False, True, True, False, True]])
    return q, k, v, valid, sk.make_plan(B, Q, L, H, generator=torch.Generator().manual_seed(5))


def op_mask_arguments(valid, plan, backend):
    """The registered mask and fused ops' arguments after the tensors q, k (and v) for
    EAGER_OPTIONS: valid, the query pool, the plan and the options, positionally."""
    return (valid, torch.ones(B, Q, dtype=torch.bool), *plan, EAGER_OPTIONS["ratio"],
            EAGER_OPTIONS["num_per_query"], EAGER_OPTIONS["head_mix"], False,
            EAGER_OPTIONS["noise"], D ** -0.5, backend)


def with_square_loss_grads(attend, q, k, v):
    """``attend(q, k, v)`` on fresh leaves, its first output's square summed and
    backpropagated: (the outputs, the leaves' gradients)."""
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    outputs = attend(*leaves)
    outputs[0].square().sum().backward()
    return outputs, [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("backend", available_cpu_backends())
def test_eager_mask_equals_the_registered_op(backend):
    """Eager calls skip the custom-op dispatch; the mask is the op's."""
    q, k, _, valid, plan = eager_case()
    op_mask = torch.ops.sma_kernels.self_guided_mask(q, k, *op_mask_arguments(valid, plan, backend))
    assert torch.equal(sk.self_guided_mask(q, k, valid, plan=plan, backend=backend, **EAGER_OPTIONS),
                       op_mask)


def eager_attention(valid, plan, backend):
    return lambda q, k, v: sk.self_guided_attention(q, k, v, valid, plan=plan, backend=backend,
                                                    **EAGER_OPTIONS)


@pytest.mark.parametrize("backend", available_cpu_backends())
def test_eager_attention_equals_the_registered_op(backend):
    """Outputs and gradients of masked_attention's eager autograd.Function are the op's, bit for
    bit. (The fused op's are in the next test: self_guided_attention takes it where a backend
    has one, a kernel of its own whose rounding need not match masked_attention's.)"""
    q, k, v, valid, plan = eager_case()
    keep = valid & ~sk.self_guided_mask(q, k, valid, plan=plan, backend=backend, **EAGER_OPTIONS)
    (out,), grads = with_square_loss_grads(
        lambda q, k, v: (ops.masked_attention(q, k, v, keep, scale=D ** -0.5, backend=backend),),
        q, k, v)
    (op_out, _), op_grads = with_square_loss_grads(
        lambda q, k, v: torch.ops.sma_kernels.masked_attention(q, k, v, keep, D ** -0.5, backend),
        q, k, v)
    assert torch.equal(out, op_out)
    for grad, op_grad in zip(grads, op_grads):
        assert torch.equal(grad, op_grad)


@pytest.mark.parametrize("backend", fused_cpu_backends())
def test_eager_fused_attention_equals_the_registered_op(backend):
    """The fused op's eager autograd.Function gives the op's outputs and gradients, bit for bit."""
    q, k, v, valid, plan = eager_case()
    (out, mask), grads = with_square_loss_grads(eager_attention(valid, plan, backend), q, k, v)
    (op_out, _, op_mask, _, _), op_grads = with_square_loss_grads(
        lambda q, k, v: torch.ops.sma_kernels.self_guided_attention(
            q, k, v, *op_mask_arguments(valid, plan, backend)), q, k, v)
    assert torch.equal(mask, op_mask) and torch.equal(out, op_out)
    for grad, op_grad in zip(grads, op_grads):
        assert torch.equal(grad, op_grad)


@pytest.mark.parametrize("backend", available_cpu_backends())
def test_calls_without_grad_skip_the_autograd_node_and_agree(backend, monkeypatch):
    """Without grad to record (no_grad, or no input requiring grad) the eager path calls the
    computation directly, not through its autograd.Function, with the same outputs."""
    q, k, v, valid, plan = eager_case()
    with_grad = eager_attention(valid, plan, backend)(*(x.requires_grad_() for x in (q, k, v)))
    applied = []
    for function in (ops._EagerSelfGuidedAttention, ops._EagerAttention):
        monkeypatch.setattr(function, "apply", lambda *args, fn=function.apply: applied.append(1)
                            or fn(*args))
    with torch.no_grad():
        without = eager_attention(valid, plan, backend)(q, k, v)
    detached = eager_attention(valid, plan, backend)(*(x.detach() for x in (q, k, v)))
    assert applied == []
    for results in (without, detached):
        assert torch.equal(results[0], with_grad[0]) and torch.equal(results[1], with_grad[1])
        assert results[0].grad_fn is None


# ----------------------------------------------------------------------------- drop_masked

def assert_packs_kept_tokens(x: torch.Tensor, keep: torch.Tensor, packed: torch.Tensor,
                             valid: torch.Tensor, index: torch.Tensor) -> None:
    """drop_masked(x, keep) gave (packed, valid, index): each sample's kept tokens first, in
    order, zeros after them."""
    width = int(keep.sum(1).max()) if keep.numel() else 0
    assert packed.shape == (x.shape[0], width, *x.shape[2:]) and packed.dtype == x.dtype
    assert valid.shape == index.shape == packed.shape[:2]
    for b in range(x.shape[0]):
        kept = keep[b].nonzero().flatten()
        n = len(kept)
        assert valid[b].tolist() == [True] * n + [False] * (width - n)
        assert torch.equal(index[b, :n], kept)
        assert torch.equal(packed[b, :n], x[b, kept])
        assert bool((packed[b, n:] == 0).all())


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_drop_masked_packs_kept_tokens_in_order(batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, 3, generator=g, requires_grad=True)
    keep = torch.rand(batch, length, generator=g) < 0.5
    packed, valid, index = sk.drop_masked(x, keep)
    assert_packs_kept_tokens(x, keep, packed, valid, index)
    packed.sum().backward()
    assert torch.equal(x.grad, keep[..., None].expand_as(x).float())


def test_drop_masked_bad_input():
    with pytest.raises(TypeError, match=blames("keep")):
        sk.drop_masked(torch.randn(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match=blames("keep")):
        sk.drop_masked(torch.randn(2, 3), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=blames("x")):
        sk.drop_masked(torch.randn(3), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^keep is on meta but x is on cpu"):
        sk.drop_masked(torch.randn(2, 3), torch.ones(2, 3, dtype=torch.bool, device="meta"))


def test_make_plan_for_reads_the_sizes_and_names_bad_tensors():
    q, k, _ = inputs()
    plan = sk.make_plan_for(q, k, generator=torch.Generator().manual_seed(0))
    assert torch.equal(plan.head, sk.make_plan(B, Q, L, H, generator=torch.Generator().manual_seed(0)).head)
    with pytest.raises(TypeError, match=blames("q", prefix="make_plan_for: ")):
        sk.make_plan_for([1.0], k)
    with pytest.raises(ValueError, match=blames("k", prefix="make_plan_for: ")):
        sk.make_plan_for(q, k[0])


def test_make_plan_takes_numpy_integers():
    np = pytest.importorskip("numpy", reason="NumPy is not installed")
    sizes = {"batch_size": np.int64(B), "num_queries": np.int32(Q), "num_tokens": np.uint8(L),
             "num_heads": np.int64(H)}
    plan = sk.make_plan(**sizes, generator=torch.Generator().manual_seed(0))
    assert torch.equal(plan.token_rank, sk.make_plan(B, Q, L, H, generator=torch.Generator().manual_seed(0)).token_rank)
