"""The launch budget of the triton backend, counted by ``bench.launches`` (the interpreter on the
CPU, real launches on a GPU), and the counter itself on a known sequence of launches.

A call counts every device launch it makes: its Triton kernels and every PyTorch compute op
around them (the plan's random draw included). The budgets are today's counts, so that a change
that adds a launch fails here; they come down as the kernels are fused. The target of the GPU
path: a forward as users call it (``plan=None`` or a generator) at most 4 launches (met: the
draw, the score kernel, the selection with the kept-key order, the attention), at most 2 when
L <= 128 (met at any head dims and up to 1024 queries: the draw and the short-sequence
kernel), and a backward at most 3 (met with 2: dQ, which also writes delta, then dK/dV; 1 for
short sequences whose tile fits). A user's plan adds its on-device head check (four ops).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import triton
import triton.language as tl
from helpers import DEVICE, import_triton_backend, use_triton_path

import sma_kernels
from bench import cases as bench_cases
from bench.launches import calls, count_launches

# Per call of bench.launches.CALLS and Triton path: the most launches allowed. "short forward":
# the short-sequence forward at a shape whose backward tile does not fit, so the general backward.
LAUNCH_BUDGETS = {
    "forward (plan=None)": {"short": 2, "short forward": 2, "general": 4},
    "forward (generator)": {"short": 2, "short forward": 2, "general": 4},
    "forward (plan)": {"short": 5, "short forward": 5, "general": 7},
    "backward": {"short": 1, "short forward": 2, "general": 2},
}

import_triton_backend()
CASES = {case.name: case for case in bench_cases.tiny_cases()}
# Short peptides under the proteins workload's 256 latents: L <= 128, Q = 256 (two row blocks)
# and dv = 128, past the short backward's tile.
CASES["peptides"] = replace(CASES["proteins"], name="peptides", queries=256, tokens=100, dim=32,
                            dim_v=128)


# Tiny workloads (bench.cases.tiny_cases), each on the path of its full size: HIGGS is
# self-attention at L = 28 (head_mix "random", mask_self), the short-sequence path; molecules
# self-attention at L = 136 and pixels cross-attention at L = 300 (head_mix "mean") the general
# one. HIGGS is also forced onto the general path, and the peptides take the short forward.
@pytest.mark.parametrize(("workload", "path"), [("higgs", "short"), ("higgs", "general"),
                                                ("peptides", "short forward"),
                                                ("molecules", "general"), ("pixels", "general")])
def test_triton_calls_stay_within_their_launch_budget(workload, path, monkeypatch):
    use_triton_path(monkeypatch, "general" if path == "general" else "short")
    runs = calls(CASES[workload], "triton", torch.device(DEVICE))
    for call, budgets in LAUNCH_BUDGETS.items():
        runs[call]()  # warm-up: compilation and autotuning launch too
        launches = runs[call]()
        assert len(launches) <= budgets[path], (
            f"{call} at {workload} ({path} path): {len(launches)} launches, budget "
            f"{budgets[path]}: {launches.summary()}")
        triton_kernels = [name for name in launches.names if name.startswith("triton:")]
        assert triton_kernels, f"{call} at {workload} launched no Triton kernel: {launches.summary()}"
        if path == "short" or (path == "short forward" and call != "backward"):
            kernel = "_short_sequence_bwd_kernel" if call == "backward" else "_short_sequence_kernel"
            assert triton_kernels == [f"triton:{kernel}"], launches.summary()
        elif path == "short forward":  # the general backward over the short forward's order
            assert "triton:_short_sequence_bwd_kernel" not in triton_kernels, launches.summary()


@pytest.mark.parametrize(("workload", "path"), [("higgs", "short"), ("pixels", "general")])
def test_a_call_with_every_default_stays_within_the_budget(workload, path):
    # No valid and no query_valid: every token and every row, passed to the kernels as such,
    # so the call fills no (B, L) or (B, Q) tensor first.
    case = CASES[workload]
    x = bench_cases.make_inputs(case, torch.device(DEVICE), torch.float32)
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    for _ in range(2):  # the first call may compile
        with count_launches() as launches:
            sma_kernels.self_guided_attention(x.q, x.k, x.v, **case.options(), generator=generator,
                                              backend="triton")
    budget = LAUNCH_BUDGETS["forward (generator)"][path]
    assert len(launches) <= budget, launches.summary()


@triton.jit
def _add_one_kernel(src, dst, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(dst + offsets, tl.load(src + offsets, mask=offsets < n) + 1, mask=offsets < n)


# The same kernel behind the autotuner, which launches it through its own run().
_tuned_add_one_kernel = triton.autotune(configs=[triton.Config({"BLOCK": 8})], key=[])(_add_one_kernel)


def test_counter_counts_a_known_sequence():
    x = torch.zeros(8, device=DEVICE)
    y = torch.empty_like(x)
    for _ in range(2):  # the first round compiles; the second is the one checked
        with count_launches() as launches:
            z = torch.empty(8, device=DEVICE)  # an allocation: no launch
            x.view(2, 4).t()  # views: no launch
            _add_one_kernel[(1,)](x, y, 8, BLOCK=8)
            _tuned_add_one_kernel[(1,)](y, z, 8)  # behind the autotuner: counted once
            total = (z + 1).sum()
            value = total.item()
            listed = z.tolist()
    # On a GPU tolist() is a copy to the host, launched and counted as a sync; on the CPU it
    # launches nothing and counts as the sync it would be on a GPU.
    to_host = ["_to_copy"] if torch.device(DEVICE).type != "cpu" else []
    assert launches.names == ["triton:_add_one_kernel", "triton:_add_one_kernel", "add.Tensor", "sum",
                              "_local_scalar_dense", *to_host]
    assert launches.syncs == ["_local_scalar_dense", *(to_host or ["tolist"])]
    assert value == 24.0 and listed == [2.0] * 8  # the kernels ran
