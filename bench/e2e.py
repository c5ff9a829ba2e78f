"""End to end: one pretraining step of the reference SMA model (``python/sma``) per masking provider.

At the molecule setting (self-attention encoder, SMILES bytes L = 512, r = 0.3, npq = 3, random
head mix, mask_self) and the protein setting (Perceiver cross-attention, bytes L = 1024, 256
latents, r = 0.15, npq = 4, mean), a training step (forward, backward, AdamW step; bf16 autocast
on a GPU) is timed with the model's first layer routed through each masking provider. The
provider's mask alone is then timed on the q, k the model's first layer produced, and
``mask_share`` = mask time / step time: the part of a training step spent choosing the mask.

Each provider replaces ``sma_kernels.self_guided_attention`` inside ``sma.model`` for the
duration of its timing (the sma-kernels backends through the public op with ``backend=``, as
the model's own ``backend=`` argument would). The compiled and FlexAttention routes are left
out: compiling them for each model shape would dominate a one-step measurement. Sizes:
:func:`settings`.
"""

from __future__ import annotations

import sys
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

import sma_kernels
import sma_kernels.nn

from . import measure
from .cases import Inputs
from .providers import Provider, PublishedEager, SmaBackend, Vectorized

_MOLECULES = {"ratio": 0.3, "num_per_query": 3, "head_mix": "random", "mask_self": True}
_PROTEINS = {"ratio": 0.15, "num_per_query": 4, "head_mix": "mean", "mask_self": False}


def settings(device_type: str, tiny: bool = False) -> list[dict[str, Any]]:
    """The two settings: model shape (``sma.model.ModelConfig`` fields), batch and masking.

    GPU: the published widths (molecules 12 x 64, proteins 8 x 32 with 256 latents) and batches.
    CPU: the same L, heads and masking with head dim 16, 1 layer and a batch of 2. ``tiny``:
    a few tokens, for the smoke tests.
    """
    gpu = device_type == "cuda"
    rows = [("molecules", "self", 512, 12, 64 if gpu else 16, 32 if gpu else 2, 12 if gpu else 1,
             _MOLECULES),
            ("proteins", "cross", 1024, 8, 32 if gpu else 16, 64 if gpu else 2, 8 if gpu else 1,
             _PROTEINS)]
    if tiny:
        rows = [(name, encoder, 48, 2, 4, 2, 1, masking) for name, encoder, *_, masking in rows]
    return [{"name": name, "batch": batch, "masking": masking,
             "model": {"input_kind": "bytes", "max_len": max_len, "encoder": encoder,
                       "width": heads * dim, "depth": depth, "heads": heads,
                       "latents": 16 if tiny else 256, "widening": 1}}
            for name, encoder, max_len, heads, dim, batch, depth, masking in rows]


def _import_model() -> tuple[types.ModuleType | None, str | None]:
    """``sma.model`` (installed, or from ``python/`` beside ``bench/``), or why not."""
    source = Path(__file__).resolve().parent.parent / "python"
    for attempt in range(2):
        try:
            import sma.model
            return sma.model, None
        except ImportError as error:
            if attempt or not (source / "sma" / "model.py").exists():
                return None, f"the reference model package sma (python/sma) did not import: {error}"
            sys.path.insert(0, str(source))
    raise AssertionError("unreachable")


class _Routed:
    """Stands in for the op module that ``sma_kernels.nn.SelfGuidedAttention`` (the model's first
    layer) calls: the first layer goes through a provider, and the inputs of its last call are
    kept for timing the mask alone. Everything else is the real module's."""

    def __init__(self, provider: Provider) -> None:
        self.provider = provider
        self.last: Inputs | None = None
        self.prepared_for: tuple | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(sma_kernels.api, name)

    def self_guided_attention(self, q, k, v, valid=None, *, ratio, num_per_query, head_mix="mean",
                              query_valid=None, mask_self=False, noise=0.0, scale=None,
                              generator=None, plan=None, backend="auto"):
        batch, heads, num_queries, dim = q.shape
        num_tokens = k.shape[2]
        pool = query_valid if query_valid is not None else (
            valid if mask_self else torch.ones(batch, num_queries, dtype=torch.bool, device=q.device))
        if mask_self:
            pool = pool & valid
        if plan is None:
            plan = sma_kernels.make_plan(batch, num_queries, num_tokens, heads, generator=generator,
                                         device=q.device)
        options = {"ratio": ratio, "num_per_query": num_per_query, "head_mix": head_mix,
                   "mask_self": mask_self, "noise": noise, "scale": scale or dim ** -0.5}
        x = Inputs(q.detach(), k.detach(), v.detach(), valid, pool, plan, options)
        if self.prepared_for != tuple(q.shape) + tuple(k.shape):
            self.provider.prepare(x)
            self.prepared_for = tuple(q.shape) + tuple(k.shape)
        self.last = x
        return self.provider.forward(x, q, k, v)


@contextmanager
def _routed(provider: Provider) -> Iterator[_Routed]:
    routed = _Routed(provider)
    original = sma_kernels.nn.api
    sma_kernels.nn.api = routed
    try:
        yield routed
    finally:
        sma_kernels.nn.api = original


def _batch(max_len: int, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random byte ids, right-padded to ``max_len`` with lengths in [max_len / 4, max_len]."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(max_len // 4, max_len + 1, (batch,), generator=gen)
    valid = torch.arange(max_len)[None, :] < lengths[:, None]
    ids = torch.randint(6, 262, (batch, max_len), generator=gen).masked_fill(~valid, 0)
    return ids.to(device), valid.to(device)


def run(device: torch.device, *, min_run_time: float, log: Callable[[str], None] = print,
        providers: list[Provider] | None = None, tiny: bool = False,
        deadline: float | None = None) -> dict[str, Any]:
    """Time the training steps (skipping those not started by ``deadline``, a ``time.time()``);
    returns the ``end_to_end`` JSON record."""
    model_module, reason = _import_model()
    if model_module is None:
        log(f"end-to-end skipped: {reason}")
        return {"status": "skipped", "reason": reason}
    if providers is None:
        providers = [PublishedEager(), Vectorized()] + [
            SmaBackend(name, plan_given=True) for name in sma_kernels.backends() if name != "reference"]
    record: dict[str, Any] = {"status": "ok", "reason": None, "settings": []}
    for setting in settings(device.type, tiny):
        config = model_module.ModelConfig(**setting["model"])
        ids, valid = _batch(config.max_len, setting["batch"], device)
        setting["providers"] = {}
        for provider in providers:
            if deadline is not None and time.time() > deadline:
                setting["providers"][provider.name] = {"status": "skipped",
                                                       "reason": "time limit (--time-limit)"}
                continue
            setting["providers"][provider.name] = entry = _time_step(
                model_module, provider, config, setting["masking"], ids, valid, device, min_run_time)
            if entry["status"] == "ok":
                log(f"  e2e {setting['name']:>9} {provider.name:<12} step "
                    f"{entry['step']['median_ms']:9.2f} ms, mask share {100 * entry['mask_share']:.1f}%")
        record["settings"].append(setting)
    return record


def _time_step(model_module: types.ModuleType, provider: Provider, config: Any, masking: dict[str, Any],
               ids: torch.Tensor, valid: torch.Tensor, device: torch.device,
               min_run_time: float) -> dict[str, Any]:
    """One provider at one setting: the step time, the mask time and the mask's share."""
    unavailable = provider.unavailable(device)
    if unavailable:
        return {"status": "skipped", "reason": unavailable}
    from sma.masking import MaskingConfig

    torch.manual_seed(0)
    model = model_module.SMAPretrainer(config, MaskingConfig(**masking)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    on_gpu = device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
            loss, _ = model(ids, valid)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    entry: dict[str, Any] = {"status": "ok", "reason": None}
    try:
        with _routed(provider) as routed:
            entry["step"] = measure.time_call(step, device, min_run_time)
            entry["mask"] = measure.time_call(lambda: provider.mask(routed.last), device, min_run_time)
        entry["mask_share"] = entry["mask"]["median_ms"] / entry["step"]["median_ms"]
    except Exception as error:  # noqa: BLE001  (recorded; the benchmark goes on)
        entry.update(status="skipped", reason=f"{type(error).__name__}: {error}"[:300])
    return entry


def text_table(record: dict[str, Any]) -> str:
    """Step time and mask share per setting and provider."""
    if record["status"] != "ok":
        return f"end-to-end: {record['status']} ({record['reason']})"
    lines = [f"{'end-to-end':>10} {'provider':<12} {'step ms':>10} {'mask ms':>9} {'mask share':>10}"]
    for setting in record["settings"]:
        for name, entry in setting["providers"].items():
            if entry["status"] != "ok":
                lines.append(f"{setting['name']:>10} {name:<12} {entry['status']}: {entry['reason']}"[:140])
                continue
            lines.append(f"{setting['name']:>10} {name:<12} {entry['step']['median_ms']:10.2f} "
                         f"{entry['mask']['median_ms']:9.2f} {100 * entry['mask_share']:9.1f}%")
    return "\n".join(lines)
