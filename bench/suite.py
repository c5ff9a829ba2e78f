"""Run providers over cases: check each mask against the reference, then time it.

The workloads run before the sweeps, each in two passes: every case with the providers that
need no compile step, then every case with those that compile (torch.compile; FlexAttention on
a GPU), so that under a time limit the sweeps and the compile-bound baselines are what is cut,
not a workload.

For every case the reference (``sma_kernels`` with ``backend="reference"``) gives the mask and
output that each masking provider must reproduce under the same plan (exact, or a float
near-tie; :func:`bench.providers.check_mask`). A provider that fails the check is not timed, and
the run fails: a fast but wrong provider must not win. A baseline that cannot run here (compile
error, unsupported op, over the memory or compile budget) is skipped with its reason recorded; an
sma-kernels backend that raises is a failure.

Per provider and case: ``mask`` (the mask alone), ``fwd`` (mask + attention, no grad) and
``fwdbwd`` (forward and gradients of q, k, v) times, each with the host time of one call
(``host_median_ms``: the wall time of the Python call; on the CPU the same as the time) and its
device launches (``launches``, by :func:`bench.launches.count_launches`; the launches themselves
in ``launch_names`` for sma-kernels; not counted through torch.compile), the time of each
mode's first call
(``first_call_s``: torch.compile's compile time for the compiled routes, JIT compilation and
autotuning for Triton; routes that compile share ``--compile-budget``), peak extra memory of
fwd and fwdbwd, achieved TFLOP/s and GB/s against the measured ceilings, and ratios against the
baselines timed in the same process. A baseline that fails after its forward pass was timed
keeps its times, with the error as its ``reason``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

import sma_kernels

from . import measure
from .cases import Case, Inputs, make_inputs
from .launches import count_launches
from .providers import Provider, SmaBackend, check_mask, check_output, reference_scores

SCHEMA = "sma-kernels-bench/1"
TIME_LIMIT = "time limit (--time-limit)"
METRICS = ("mask", "fwd", "fwdbwd")
# (B, H, Q, L) fp32 tensors that the unfused routes hold at once, for the memory guard.
DENSE_COPIES = 4


class Budget:
    """Seconds left for torch.compile; compiling stops once they are spent."""

    def __init__(self, seconds: float) -> None:
        self.left = seconds

    def spend(self, seconds: float) -> None:
        self.left -= seconds


def _cache_hits() -> int:
    # Inductor reuses compiled graphs from its on-disk cache: a warm cache makes first_call_s small.
    from torch._dynamo.utils import counters
    return int(counters["inductor"]["fxgraph_cache_hit"])


def _achieved(case: Case, metric: str, ms: float, element_size: int,
              ceiling: dict[str, Any]) -> dict[str, float]:
    tflops = case.flops(metric) / (ms * 1e-3) / 1e12
    gbps = case.bytes(metric, element_size) / (ms * 1e-3) / 1e9
    return {"tflops": tflops, "gbps": gbps, "pct_matmul": 100 * tflops / ceiling["matmul_tflops"],
            "pct_copy": 100 * gbps / ceiling["copy_gbps"]}


def run_provider(provider: Provider, case: Case, x: Inputs, ref: dict[str, torch.Tensor],
                 device: torch.device, *, min_run_time: float, budget: Budget,
                 dense_budget_bytes: float, ceiling: dict[str, Any]) -> dict[str, Any]:
    """Check, then time one provider on one case. Returns its JSON record."""
    record: dict[str, Any] = {"kind": provider.kind, "status": "ok", "reason": None, "check": None,
                              "compiles": provider.compiles_on(device), "first_call_s": {}, "times": {},
                              "launches": {}, "launch_names": {}, "peak_extra_mb": {}, "achieved": {}}
    if isinstance(provider, SmaBackend):
        record["plan"] = "given" if provider.plan_given else "generator"
    reason = provider.unavailable(device)
    if reason is None and provider.dense(device):
        need = DENSE_COPIES * case.dense_elements * 4
        if need > dense_budget_bytes:
            reason = (f"would hold ~{need / 1e9:.1f} GB of (B, H, Q, L) tensors, over the "
                      f"{dense_budget_bytes / 1e9:.0f} GB budget (--dense-budget-gb)")
    if reason is not None:
        record.update(status="skipped", reason=reason)
        return record

    def grads() -> tuple[torch.Tensor, ...]:
        q, k, v = (t.detach().requires_grad_() for t in (x.q, x.k, x.v))
        out, _ = provider.forward(x, q, k, v)
        return torch.autograd.grad(out, (q, k, v), ref["grad_out"])

    def forward() -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.no_grad():
            return provider.forward(x, x.q, x.k, x.v)

    calls: dict[str, Callable[[], Any]] = {"fwd": forward}
    if provider.produces_mask:
        calls["mask"] = lambda: provider.mask(x)
    if case.backward:
        calls["fwdbwd"] = grads
    metric = "fwd"
    try:
        provider.prepare(x)
        for metric in ("fwd", "mask", "fwdbwd"):  # fwd first: its first call is the check
            if metric not in calls:
                continue
            if provider.compiles_on(device) and budget.left <= 0:
                if metric == "fwd":
                    record.update(status="skipped", reason="compile budget spent (--compile-budget)")
                    return record
                continue
            hits = _cache_hits()
            provider.rewind(x)  # a provider that draws its own plan draws x.plan for the check
            start = time.perf_counter()
            if metric == "fwd":
                out, mask = forward()
                measure.synchronize(device)
                record["first_call_s"][metric] = time.perf_counter() - start
                if provider.produces_mask:
                    record["check"] = check_mask(mask, ref["mask"], ref["scores"], x.valid, ref["forced"])
                    same = (mask == ref["mask"]).all(dim=1)
                    record["out_max_abs_err"] = check_output(out, ref["out"], same)
                del out, mask
            else:
                output = calls[metric]()
                measure.synchronize(device)
                record["first_call_s"][metric] = time.perf_counter() - start
                if metric == "mask":  # its own code path (a separate graph when compiled)
                    check_mask(output, ref["mask"], ref["scores"], x.valid, ref["forced"])
                del output
            if provider.compiles_on(device):
                record["compile_cache_hits"] = record.get("compile_cache_hits", 0) + _cache_hits() - hits
                budget.spend(record["first_call_s"][metric])
            record["times"][metric] = measure.time_call(calls[metric], device, min_run_time)
            if provider.countable(device):
                with count_launches() as launches:
                    calls[metric]()
                record["launches"][metric] = len(launches)
                if provider.kind == "sma-kernels":
                    record["launch_names"][metric] = launches.names
            if metric != "mask":
                record["peak_extra_mb"][metric] = measure.peak_extra_bytes(calls[metric], device) / 1e6
            record["achieved"][metric] = _achieved(case, metric, record["times"][metric]["median_ms"],
                                                   x.q.element_size(), ceiling)
    except AssertionError as error:
        record.update(status="failed", reason=f"wrong result ({metric}): {error}")
    except Exception as error:  # noqa: BLE001  (recorded: a baseline may not run on this torch)
        lines = str(error).strip().splitlines()
        message = f"{metric}: {type(error).__name__}: {lines[0] if lines else ''}"[:500]
        if provider.kind == "sma-kernels":
            record.update(status="failed", reason=message)
        elif "fwd" in record["times"]:  # what was measured stays; the rest is explained
            record["reason"] = message
        else:
            record.update(status="skipped", reason=message)
    return record


def _ratios(providers: dict[str, dict[str, Any]]) -> None:
    """Add each provider's time ratios against the baselines of the same case (same process)."""
    def median(name: str, metric: str) -> float | None:
        entry = providers.get(name, {})
        return entry.get("times", {}).get(metric, {}).get("median_ms")

    for record in providers.values():
        ratios: dict[str, float] = {}
        for metric in METRICS:
            mine = median_of(record, metric)
            if mine is None:
                continue
            for base in ("sdpa", "sdpa+pad"):
                if metric != "mask" and (other := median(base, metric)):
                    ratios[f"{metric}_over_{base}"] = mine / other
            for base in ("published", "vectorized", "compiled", "flex"):
                if (other := median(base, metric)) is not None:
                    ratios[f"{metric}_speedup_over_{base}"] = other / mine
        record["ratios"] = ratios


def median_of(record: dict[str, Any], metric: str) -> float | None:
    return record.get("times", {}).get(metric, {}).get("median_ms")


def _summary(providers: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The best sma-kernels backend (by forward time), its speed-ups and the 1.3x-of-SDPA gap."""
    # As users call it: the rows given a ready plan are a second view, not the headline.
    ours = [(median_of(r, "fwd"), name) for name, r in providers.items()
            if r["kind"] == "sma-kernels" and r.get("plan") != "given" and r["status"] == "ok"
            and median_of(r, "fwd")]
    if not ours:
        return None
    _, best = min(ours)
    record = providers[best]
    return {"best_backend": best, **record["ratios"],
            "fwd_target_over_sdpa": 1.3,
            "meets_fwd_target": record["ratios"].get("fwd_over_sdpa", float("inf")) <= 1.3,
            "meets_fwdbwd_target": record["ratios"].get("fwdbwd_over_sdpa", float("inf")) <= 1.3}


def run_case(case: Case, providers: Sequence[Provider], device: torch.device, dtype: torch.dtype, *,
             min_run_time: float, budget: Budget, dense_budget_bytes: float,
             ceiling: dict[str, Any], log: Callable[[str], None] = print, seed: int = 0,
             deadline: float | None = None) -> dict[str, Any]:
    """Every provider on one case (those not started by ``deadline`` are skipped); returns the
    case's JSON record."""
    x = make_inputs(case, device, dtype, seed)
    ref_out, ref_mask = sma_kernels.self_guided_attention(
        x.q, x.k, x.v, x.valid, query_valid=x.query_pool, plan=x.plan, backend="reference", **x.options)
    scores, forced = reference_scores(x)
    gen = torch.Generator().manual_seed(seed + 1)
    ref = {"out": ref_out, "mask": ref_mask, "scores": scores, "forced": forced,
           "grad_out": torch.randn(ref_out.shape, generator=gen).to(device=device, dtype=dtype)}
    lengths = x.valid.sum(1)
    result: dict[str, Any] = {"name": case.name, "group": case.group, "case": case.to_json(),
                              "dtype": str(dtype).removeprefix("torch."),
                              "lengths": {"min": int(lengths.min()), "max": int(lengths.max()),
                                          "mean": float(lengths.float().mean())},
                              "providers": {}}
    for provider in providers:
        started = time.perf_counter()
        if deadline is not None and time.time() > deadline:
            record = {"kind": provider.kind, "status": "skipped", "reason": TIME_LIMIT}
        else:
            record = run_provider(provider, case, x, ref, device, min_run_time=min_run_time,
                                  budget=budget, dense_budget_bytes=dense_budget_bytes, ceiling=ceiling)
        result["providers"][provider.name] = record
        fwd = median_of(record, "fwd")
        note = f"fwd {fwd:9.3f} ms" if fwd is not None else f"{record['status']}: {record['reason']}"
        if record.get("check") is not None:  # the mask check, ahead of the time it qualifies
            note = f"mask {record['check']}; {note}"
        log(f"  {case.name:>10} {provider.name:<12} {note}  ({time.perf_counter() - started:.1f} s)")
    return result


def finish_case(result: dict[str, Any], providers: Sequence[Provider]) -> None:
    """Put the providers in their listed order (a time limit skips the missing ones), then add
    the ratios and the summary."""
    records = result["providers"]
    result["providers"] = {p.name: records.get(p.name, {"kind": p.kind, "status": "skipped",
                                                        "reason": TIME_LIMIT})
                           for p in providers}
    _ratios(result["providers"])
    result["summary"] = _summary(result["providers"])


def failures(result: dict[str, Any]) -> list[str]:
    """Every failed provider of a run, as 'case/provider: reason'."""
    return [f"{case['name']}/{name}: {record['reason']}"
            for case in result["cases"] for name, record in case["providers"].items()
            if record["status"] == "failed"]


def run_suite(cases: Sequence[Case], providers: Sequence[Provider], device: torch.device,
              dtype: torch.dtype, *, min_run_time: float, compile_budget: float,
              dense_budget_gb: float, args: dict[str, Any] | None = None,
              log: Callable[[str], None] = print, seed: int = 0, deadline: float | None = None,
              on_case: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run every case, in order, until ``deadline`` (a ``time.time()``; the cases left are listed
    under ``not_run``), calling ``on_case`` with the result so far after each case (to save
    partial results); returns the whole JSON document (see :func:`validate`)."""
    started = time.time()
    result: dict[str, Any] = {"schema": SCHEMA,
                              "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                              **measure.environment(device), "args": args or {},
                              "timing_method": measure.TIMING_METHOD[device.type],
                              "memory_method": measure.MEMORY_METHOD[device.type]}
    log(f"device: {result['device']['name']} ({device.type}), torch {torch.__version__}")
    result["ceilings"] = ceiling = measure.ceilings(device, min_run_time)
    log(f"ceilings: matmul {ceiling['matmul_tflops']:.3f} TFLOP/s ({ceiling['matmul_dtype']}), "
        f"copy {ceiling['copy_gbps']:.1f} GB/s")
    budget = Budget(compile_budget)
    result["cases"], result["not_run"], result["failures"] = [], [], []
    done: dict[str, dict[str, Any]] = {}
    workloads = [case for case in cases if case.group == "workload"]
    others = [case for case in cases if case.group != "workload"]
    # Workloads before sweeps, and within each the providers that compile second, so that a
    # time limit cuts sweeps and compile-bound baselines rather than a workload.
    passes = [(batch, compiling) for batch in (workloads, others) for compiling in (False, True)]
    for batch, compiling in passes:
        group = [p for p in providers if p.compiles_on(device) == compiling]
        for case in batch if group else ():
            if deadline is not None and time.time() > deadline:
                continue
            record = run_case(case, group, device, dtype, min_run_time=min_run_time, budget=budget,
                              dense_budget_bytes=dense_budget_gb * 1e9, ceiling=ceiling, log=log,
                              seed=seed, deadline=deadline)
            if case.name in done:
                done[case.name]["providers"].update(record["providers"])
            else:
                done[case.name] = record
                result["cases"].append(record)
            finish_case(done[case.name], providers)
            result["failures"] = failures(result)
            result["wall_s"] = time.time() - started
            if on_case is not None:
                on_case(result)
    result["not_run"] = [case.name for case in cases if case.name not in done]
    if result["not_run"]:
        log(f"time limit reached; not run: {', '.join(result['not_run'])}")
    result["wall_s"] = time.time() - started
    return result


def validate(result: dict[str, Any]) -> None:
    """Raise ValueError (TypeError for a wrongly typed field) unless ``result`` follows the
    benchmark's JSON schema."""
    def need(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
        if not isinstance(obj, dict) or key not in obj:
            raise ValueError(f"{where}: missing {key!r}")
        if not isinstance(obj[key], kind):
            raise TypeError(f"{where}.{key}: expected {kind}, got {type(obj[key]).__name__}")
        return obj[key]

    if need(result, "schema", str, "result") != SCHEMA:
        raise ValueError(f"result.schema: expected {SCHEMA!r}")
    for key in ("created_utc", "timing_method", "memory_method"):
        need(result, key, str, "result")
    device = need(result, "device", dict, "result")
    need(device, "type", str, "device")
    need(device, "name", str, "device")
    need(device, "cpu_cores", int, "device")
    need(need(result, "versions", dict, "result"), "torch", str, "versions")
    need(need(result, "git", dict, "result"), "commit", (str, type(None)), "git")
    ceiling = need(result, "ceilings", dict, "result")
    for key in ("matmul_tflops", "copy_gbps"):
        need(ceiling, key, float, "ceilings")
    need(result, "failures", list, "result")
    need(need(result, "end_to_end", dict, "result"), "status", str, "end_to_end")
    for case in need(result, "cases", list, "result"):
        where = f"cases[{case.get('name')}]"
        need(case, "name", str, where)
        need(case, "case", dict, where)
        for name, record in need(case, "providers", dict, where).items():
            at = f"{where}.{name}"
            if need(record, "status", str, at) not in ("ok", "skipped", "failed"):
                raise ValueError(f"{at}.status: {record['status']!r}")
            if record["status"] != "ok":
                need(record, "reason", str, at)
                continue
            times = need(record, "times", dict, at)
            need(times, "fwd", dict, at + ".times")
            for metric, timing in times.items():
                if metric not in METRICS:
                    raise ValueError(f"{at}.times: unknown metric {metric!r}")
                if need(timing, "median_ms", float, f"{at}.times.{metric}") <= 0:
                    raise ValueError(f"{at}.times.{metric}.median_ms must be > 0")
            need(record, "peak_extra_mb", dict, at)
            need(record, "ratios", dict, at)
