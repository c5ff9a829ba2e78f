"""``python -m bench.cpu_attention``: the attention after the CPU mask, four ways, at four workloads.

Every route but the first chooses the cpp backend's self-guided mask and then attends over the
keys it keeps; each is timed as the first SMA layer (mask + attention), forward and forward +
backward (the gradients of q, k and v), against SDPA with no mask at all, in the same process:

* ``sdpa``: ``scaled_dot_product_attention`` over every key, no mask: the floor.
* ``sdpa+keep``: the mask, then SDPA over every key with the keep mask (keys not kept zeroed
  first, so that NaN there cannot leak): the masked keys are computed and thrown away.
* ``packed (a)``: the mask, then the kept keys and values gathered into a packed layout (kept
  keys first, padded to the batch's largest kept count, the padding as a key mask) and SDPA on
  that; the gradients scatter back through the gather (``index_select``). PyTorch's fused CPU
  kernel needs d == dv, so proteins and pixels (d != dv) take SDPA's math path.
* ``kept (b)``: ``self_guided_attention(backend="cpp")``: the mask, then the C++ attention over
  the kept keys only (csrc/cpu/kept_attention.cpp), forward and backward.

Two timings, because this machine is shared and small: wall time with 2 threads, each route
once per round in a fresh random order, median over ``--rounds``; and CPU time
(``time.process_time``) with 1 thread, the same way, which other load disturbs far less. Ratios
are over ``sdpa`` (lower is better). The outputs of the masked routes are checked against each
other before any timing. The workloads are those of ``bench/cases.py`` (inputs, padding, SMA
options) at the sizes below.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F

import sma_kernels
from sma_kernels.reference import kept_rows

from . import summary
from .cases import WORKLOADS, Case, Inputs, make_inputs

SIZES = {  # (B, H, Q, L, d, dv)
    "proteins": (4, 8, 256, 1024, 32, 128),
    "molecules": (4, 12, 512, 512, 64, 64),
    "higgs": (256, 8, 28, 28, 16, 16),
    "pixels": (1, 8, 256, 8192, 32, 128),
}
ROUTES = ("sdpa", "sdpa+keep", "packed (a)", "kept (b)")
MODES = ("fwd", "fwdbwd")


def cases(names: list[str]) -> list[Case]:
    by_name = {case.name: case for case in WORKLOADS}
    fields = ("batch", "heads", "queries", "tokens", "dim", "dim_v")
    return [replace(by_name[name], **dict(zip(fields, SIZES[name]))) for name in names]


def mask(x: Inputs) -> torch.Tensor:
    return sma_kernels.self_guided_mask(x.q, x.k, x.valid, query_valid=x.query_pool, plan=x.plan,
                                        backend="cpp", **x.options)


def masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                scale: float) -> torch.Tensor:
    """SDPA over every key with the keep mask; zero for a sample with no kept key."""
    any_kept = keep.any(dim=1)
    attend = keep | ~any_kept[:, None]
    out = F.scaled_dot_product_attention(q, kept_rows(k, keep), kept_rows(v, keep),
                                         attn_mask=attend[:, None, None, :], scale=scale)
    return out * any_kept[:, None, None, None].to(out.dtype)


def packed_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                scale: float) -> torch.Tensor:
    """SDPA over the kept keys gathered to the front, padded to the largest kept count (k and v
    are read as (B * H * L, d) rows: a view for the benchmark's contiguous inputs)."""
    batch, heads, length, _ = k.shape
    counts = keep.sum(dim=1)
    width = max(int(counts.max()), 1)
    order = (~keep).to(torch.uint8).argsort(dim=1, stable=True)[:, :width]  # kept keys first
    slot_kept = torch.arange(width)[None, :] < counts[:, None]
    # Padded slots read the sample's first kept key (the key mask removes them), so that no key
    # that is not kept is ever read; a sample with no kept key is zeroed below.
    index = torch.where(slot_kept, order, order[:, :1])
    rows = ((torch.arange(batch)[:, None, None] * heads + torch.arange(heads)[None, :, None]) * length
            + index[:, None, :]).reshape(-1)
    k_packed = k.reshape(-1, k.shape[-1]).index_select(0, rows).view(batch, heads, width, -1)
    v_packed = v.reshape(-1, v.shape[-1]).index_select(0, rows).view(batch, heads, width, -1)
    any_kept = counts > 0
    if not bool(any_kept.all()):
        empty = ~any_kept[:, None, None, None]
        k_packed, v_packed = k_packed.masked_fill(empty, 0), v_packed.masked_fill(empty, 0)
        slot_kept = slot_kept | ~any_kept[:, None]
    out = F.scaled_dot_product_attention(q, k_packed, v_packed, attn_mask=slot_kept[:, None, None, :],
                                         scale=scale)
    return out * any_kept[:, None, None, None].to(out.dtype)


def route(name: str) -> Callable[[Inputs, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    def run(x: Inputs, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scale = x.options["scale"]
        if name == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        if name == "kept (b)":
            return sma_kernels.self_guided_attention(q, k, v, x.valid, query_valid=x.query_pool,
                                                     plan=x.plan, backend="cpp", **x.options)[0]
        with torch.no_grad():
            keep = x.valid & ~mask(x)
        attend = masked_sdpa if name == "sdpa+keep" else packed_sdpa
        return attend(q, k, v, keep, scale)

    return run


def calls(x: Inputs, grad_out: torch.Tensor) -> dict[tuple[str, str], Callable[[], object]]:
    def forward(run):
        def call():
            with torch.no_grad():
                return run(x, x.q, x.k, x.v)
        return call

    def gradients(run):
        def call():
            q, k, v = (t.detach().requires_grad_() for t in (x.q, x.k, x.v))
            return torch.autograd.grad(run(x, q, k, v), (q, k, v), grad_out)
        return call

    return {(name, mode): (forward if mode == "fwd" else gradients)(route(name))
            for name in ROUTES for mode in MODES}


def check(x: Inputs, grad_out: torch.Tensor) -> None:
    """The masked routes agree with ``sdpa+keep`` on the output and the gradients."""
    all_calls = calls(x, grad_out)
    results = {}
    for name in ROUTES[1:]:
        with torch.no_grad():
            out = route(name)(x, x.q, x.k, x.v)
        results[name] = (out, *all_calls[(name, "fwdbwd")]())
    for name, got in results.items():
        for value, want in zip(got, results["sdpa+keep"]):
            torch.testing.assert_close(value, want, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def interleaved(fns: dict, rounds: int, clock: Callable[[], float], seed: int) -> dict:
    """Median time (ms) of each call: one warm-up each, then every call once per round, in a fresh
    random order each round."""
    rng = random.Random(seed)
    for fn in fns.values():
        fn()
    times: dict = {key: [] for key in fns}
    for _ in range(rounds):
        keys = list(fns)
        rng.shuffle(keys)
        for key in keys:
            start = clock()
            fns[key]()
            times[key].append((clock() - start) * 1e3)
    return {key: statistics.median(values) for key, values in times.items()}


def table(title: str, rows: list[tuple[Case, dict]]) -> str:
    head = "| workload (B, H, Q, L, d, dv) | kept | " + " | ".join(
        f"{name} {mode}" for mode in MODES for name in ROUTES) + " |"
    lines = [f"{title}: ms, and / sdpa (lower is better)", "", head,
             "|" + "---|" * (2 + len(ROUTES) * len(MODES))]
    for case, record in rows:
        cells = []
        for mode in MODES:
            base = record["times"][("sdpa", mode)]
            for name in ROUTES:
                ms = record["times"][(name, mode)]
                cells.append(f"{ms:.1f}" if name == "sdpa" else f"{ms:.1f} ({ms / base:.2f})")
        shape = ", ".join(str(s) for s in case.shape)
        lines.append(f"| {case.name} ({shape}) | {record['kept']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_attention",
                                     description=summary(__doc__))
    parser.add_argument("--cases", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds per timing (median)")
    parser.add_argument("--timings", nargs="+", default=["wall", "cpu"], choices=["wall", "cpu"],
                        help="wall: 2 threads, perf_counter; cpu: 1 thread, process_time")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average at start "
          f"{os.getloadavg()[0]:.2f}")
    styles = {"wall": (2, time.perf_counter, "wall time, 2 threads"),
              "cpu": (1, time.process_time, "CPU time, 1 thread")}
    rows: dict[str, list] = {style: [] for style in args.timings}
    try:
        for case in cases(args.cases):
            x = make_inputs(case, torch.device("cpu"), torch.float32)
            grad_out = torch.randn(*case.shape[:3], case.dim_v, generator=torch.Generator().manual_seed(1))
            torch.set_num_threads(2)
            check(x, grad_out)
            kept = float((x.valid & ~mask(x)).sum() / x.valid.numel())
            for style in args.timings:
                count, clock, _ = styles[style]
                torch.set_num_threads(count)
                times = interleaved(calls(x, grad_out), args.rounds, clock, seed=len(rows[style]))
                rows[style].append((case, {"times": times, "kept": kept}))
                print(f"{case.name}: {style} timed, load average {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        torch.set_num_threads(threads)
    for style in args.timings:
        print()
        print(table(f"{styles[style][2]}, median of {args.rounds} interleaved rounds", rows[style]))
    print("\nkept: the fraction of the (B, L) key slots that the attention reads (valid and not masked).")


if __name__ == "__main__":
    main()
