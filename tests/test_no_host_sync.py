"""No host sync in a call of the public ops, forward or backward, on every backend available.

A host sync (``.item()``, ``.tolist()``, ``bool(tensor)``, ``nonzero``, a copy to the CPU, ...)
makes the host wait for the device on every call, and breaks CUDA-graph capture. The check is
``bench.launches.count_launches``, whose dispatch mode lists every op that syncs (aten ops inside
an interpreted Triton kernel run are the interpreter's own and are left out). Each call is
checked with no plan, with a generator, with a user's plan, with a plan moved by
``MaskPlan.to()`` and with a sliced (strided) plan, and on both paths of the Triton backend
(short-sequence and general).
"""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, use_triton_path

import sma_kernels as sk
from bench.launches import available_backends, count_launches
from sma_kernels.plan import MaskPlan

B, H, L, D = 2, 2, 16, 8
OPTIONS = {"ratio": 0.5, "num_per_query": 2, "head_mix": "random", "mask_self": True, "noise": 0.5}
BACKENDS = available_backends(torch.device(DEVICE))
PLANS = ("none", "generator", "user", "moved", "sliced")
# Each backend on its path at these shapes, and the Triton backend's general path too.
ROUTES = [(backend, "short") for backend in BACKENDS] + (
    [("triton", "general")] if "triton" in BACKENDS else [])


def plan_arguments(how: str) -> dict[str, object]:
    """The plan=/generator= arguments of one way to call the ops."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    if how == "none":
        return {}
    if how == "generator":
        return {"generator": torch.Generator(device=DEVICE).manual_seed(0)}
    if how == "user":
        return {"plan": sk.make_plan(B, L, L, H, generator=generator, device=DEVICE)}
    if how == "moved":  # drawn on the CPU, moved to where the inputs are
        return {"plan": sk.make_plan(B, L, L, H, generator=generator).to(DEVICE)}
    # every other sample of a plan for twice the batch: strided views
    wide = sk.make_plan(2 * B, L, L, H, generator=generator, device=DEVICE)
    return {"plan": MaskPlan(*(field[::2] for field in wide))}


@pytest.mark.parametrize("how", PLANS)
@pytest.mark.parametrize(("backend", "path"), ROUTES)
def test_calls_make_no_host_sync(backend, path, how, monkeypatch):
    if backend == "triton":
        use_triton_path(monkeypatch, path)
    gen = torch.Generator(device="cpu").manual_seed(1)
    q, k, v = (torch.randn(B, H, L, D, generator=gen).to(DEVICE).requires_grad_() for _ in range(3))
    valid = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    valid[1, -3:] = False
    arguments = {**OPTIONS, **plan_arguments(how), "backend": backend}
    # The first calls compile (Triton's JIT) and may read back what they like.
    sk.self_guided_mask(q, k, valid, **arguments)
    out, _ = sk.self_guided_attention(q, k, v, valid, **arguments)
    torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    with count_launches() as mask_call:
        sk.self_guided_mask(q, k, valid, **arguments)
    with count_launches() as forward:
        out, mask = sk.self_guided_attention(q, k, v, valid, **arguments)
    grad_out = torch.ones_like(out)
    with count_launches() as backward:
        torch.autograd.grad(out, (q, k, v), grad_out)
    for name, launches in (("self_guided_mask", mask_call), ("forward", forward), ("backward", backward)):
        assert launches.names, f"{name}: nothing was counted"
        assert launches.syncs == [], f"{name} syncs with the host: {launches.syncs} ({launches.summary()})"
    assert int(mask.sum()) == 8 + 6  # k = round(0.5 n) per sample: the call did its work


SYNCS = {
    "item": lambda x: x.sum().item(),
    "tolist": lambda x: x.tolist(),
    "bool": lambda x: bool(x[0] > 0),
    "int": lambda x: int(x.max()),
    "nonzero": lambda x: x.nonzero(),
    "bool index": lambda x: x[x > 0],
    "masked_select": lambda x: x.masked_select(x > 0),
}


@pytest.mark.parametrize("sync", SYNCS)
def test_the_check_sees_each_kind_of_sync(sync):
    x = torch.arange(-2.0, 3.0, device=DEVICE)
    with count_launches() as launches:
        SYNCS[sync](x)
    assert launches.syncs, f"{sync} was not seen as a host sync: {launches.names}"
    with count_launches() as launches:
        x.clamp_min(0).sum()  # stays on the device
    assert launches.syncs == [] and launches.names == ["clamp_min", "sum"]
