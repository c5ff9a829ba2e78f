"""CUDA graphs: the fused op captured with its backward, and under torch.compile's
"reduce-overhead" mode (CUDA graphs through Inductor). Both need a call that never syncs with
the host (tests/test_no_host_sync.py checks that on any machine); these run on a GPU only.

* ``torch.cuda.graph`` captures the forward and backward of ``self_guided_attention`` drawing
  its plan from a CUDA generator registered with the graph: each replay draws a new mask, the
  same one an eager call makes from the generator's state before that replay.
* ``torch.compile(mode="reduce-overhead")`` matches eager with a plan passed in, and with
  ``plan=None`` draws a new, well-formed mask per call.

Each runs at L = 256 (the general path: score kernel, selection, attention) and at L = 28 (the
short-sequence kernel).
"""

from __future__ import annotations

import pytest
import torch
from helpers import needs_gpu

import sma_kernels as sk

pytestmark = needs_gpu

B, H, D = 2, 4, 32
OPTIONS = {"ratio": 0.3, "num_per_query": 3, "head_mix": "random", "mask_self": True, "noise": 0.25,
           "backend": "triton"}
# The sequence length of each path, and the tokens masked per sample there (round(0.3 L)).
MASKED_PER_SAMPLE = {256: 77, 28: 8}


@pytest.fixture(params=sorted(MASKED_PER_SAMPLE), ids=lambda length: f"L{length}")
def length(request: pytest.FixtureRequest) -> int:
    return request.param


def inputs(length: int) -> tuple[torch.Tensor, ...]:
    """bf16 q, k, v (leaves), all-real valid, and a gradient for the output."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, length, D, generator=gen, device="cuda", dtype=torch.bfloat16)
               .requires_grad_() for _ in range(3))
    valid = torch.ones(B, length, dtype=torch.bool, device="cuda")
    grad_out = torch.randn(B, H, length, D, generator=gen, device="cuda", dtype=torch.bfloat16)
    return q, k, v, valid, grad_out


def test_graph_replays_draw_new_masks_equal_to_eager_calls(length):
    q, k, v, valid, grad_out = inputs(length)
    generator = torch.Generator(device="cuda").manual_seed(1)

    def step(gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        out, mask = sk.self_guided_attention(q, k, v, valid, generator=gen, **OPTIONS)
        return (mask, out, *torch.autograd.grad(out, (q, k, v), grad_out))

    # Warm-up on a side stream, as torch.cuda.graph requires: Triton compiles and autotunes here.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(generator)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(generator)  # each replay advances it, as an eager call would
    with torch.cuda.graph(graph):
        static = step(generator)

    masks = []
    for _ in range(3):
        state = generator.get_state()
        graph.replay()
        replayed = [t.clone() for t in static]
        eager = step(torch.Generator(device="cuda").set_state(state))  # a copy of the state
        assert torch.equal(replayed[0], eager[0]), "the replayed mask is not the eager call's"
        for got, want in zip(replayed[1:], eager[1:]):
            torch.testing.assert_close(got, want)
        assert (replayed[0].sum(dim=1) == MASKED_PER_SAMPLE[length]).all()
        masks.append(replayed[0])
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2]), \
        "replays drew the same mask: the generator did not advance"


def test_compile_reduce_overhead_matches_eager(length):
    q, k, v, valid, grad_out = inputs(length)
    plan = sk.make_plan_for(q, k, generator=torch.Generator(device="cuda").manual_seed(2))

    def step(q, k, v, plan):
        return sk.self_guided_attention(q, k, v, valid, plan=plan, **OPTIONS)

    eager_out, eager_mask = step(q, k, v, plan)
    eager_grads = torch.autograd.grad(eager_out, (q, k, v), grad_out)
    torch._dynamo.reset()
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # CUDA graph trees record at the second call and replay from the third
        torch.compiler.cudagraph_mark_step_begin()
        out, mask = compiled(q, k, v, plan)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        assert torch.equal(mask, eager_mask)
        torch.testing.assert_close(out, eager_out)
        for got, want in zip(grads, eager_grads):
            torch.testing.assert_close(got, want)


def test_compile_reduce_overhead_without_a_plan_draws_a_new_mask_per_call(length):
    q, k, v, valid, grad_out = inputs(length)

    def step(q, k, v):
        return sk.self_guided_attention(q, k, v, valid, **OPTIONS)

    torch._dynamo.reset()
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    masks = []
    for _ in range(4):
        torch.compiler.cudagraph_mark_step_begin()
        out, mask = compiled(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        assert (mask.sum(dim=1) == MASKED_PER_SAMPLE[length]).all()
        assert all(torch.isfinite(g).all() for g in grads)
        masks.append(mask.clone())
    assert not torch.equal(masks[-2], masks[-1]), "two replays drew the same mask"


@pytest.mark.parametrize("how", ["moved", "sliced"])
def test_graph_capture_with_a_moved_or_sliced_plan(how, length):
    q, k, v, valid, grad_out = inputs(length)
    cpu_plan = sk.make_plan(2 * B, length, length, H, generator=torch.Generator().manual_seed(3))
    plan = sk.MaskPlan(*(field[::2] for field in cpu_plan)).to("cuda") if how == "moved" else \
        sk.MaskPlan(*(field.cuda()[::2] for field in cpu_plan))

    def step() -> tuple[torch.Tensor, ...]:
        out, mask = sk.self_guided_attention(q, k, v, valid, plan=plan, **OPTIONS)
        return (mask, out, *torch.autograd.grad(out, (q, k, v), grad_out))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = [t.clone() for t in step()]
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # a host sync here would raise: capture forbids it
        static = step()
    graph.replay()
    assert torch.equal(static[0], eager[0])
    for got, want in zip(static[1:], eager[1:]):
        torch.testing.assert_close(got, want)
