"""pytest-benchmark version of the workloads: ``pytest bench/ --benchmark-only``.

The four workloads (bench/README.md, "Workloads") at their small CPU sizes (full sizes on a GPU), for each
masking provider that needs no compile step, timing the mask alone and the forward pass. Each
provider's mask, and its forward's output and mask, are checked against the reference before
either is timed. ``python -m bench`` is the complete suite (compiled routes, backward, memory,
ratios, JSON); this file is for pytest-benchmark's comparison and history tools. It is not
collected by ``pytest tests``.
"""

from __future__ import annotations

import pytest
import torch

import sma_kernels
from bench.cases import make_inputs, workloads
from bench.providers import (
    Flex,
    PublishedEager,
    SmaBackend,
    Vectorized,
    check_mask,
    check_output,
    reference_scores,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
CASES = workloads(DEVICE.type, full=False)
PROVIDERS = [PublishedEager(), Vectorized(), Flex()] + [
    SmaBackend(name) for name in sma_kernels.backends() if name != "reference"]


@pytest.fixture(scope="module", params=CASES, ids=lambda case: case.name)
def checked_inputs(request):
    x = make_inputs(request.param, DEVICE, DTYPE)
    ref_out, ref_mask = sma_kernels.self_guided_attention(
        x.q, x.k, x.v, x.valid, query_valid=x.query_pool, plan=x.plan, backend="reference", **x.options)
    return x, ref_out, ref_mask, *reference_scores(x)


@pytest.mark.parametrize("metric", ["mask", "fwd"])
@pytest.mark.parametrize("provider", PROVIDERS, ids=lambda p: p.name)
def test_workload(benchmark, checked_inputs, provider, metric):
    x, ref_out, ref_mask, scores, forced = checked_inputs
    reason = provider.unavailable(DEVICE)
    if reason:
        pytest.skip(f"{provider.name}: {reason}")
    provider.prepare(x)
    check_mask(provider.mask(x), ref_mask, scores, x.valid, forced)
    provider.rewind(x)  # a provider that draws its own plan draws x.plan again
    with torch.no_grad():
        out, mask = provider.forward(x, x.q, x.k, x.v)
    check_mask(mask, ref_mask, scores, x.valid, forced)
    check_output(out, ref_out, (mask == ref_mask).all(dim=1))

    def run():
        with torch.no_grad():
            result = provider.mask(x) if metric == "mask" else provider.forward(x, x.q, x.k, x.v)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return result

    benchmark(run)
