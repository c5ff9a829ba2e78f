"""``python -m bench.score_configs``: the score kernel's device time under each candidate config.

The score kernel (``sma_kernels/triton/mask_scores.py``) is not autotuned: its config sets the
summation order of the token scores, so it is a fixed function of the shape
(``mask_scores.default_score_config``), chosen by measurement and never by a run's timings. At
the pixel workload the kernel takes most of a forward call's device time. Each of its programs
streams all L keys twice for one block of chosen rows (a few blocks in turn only where a sample
has more than ``MAX_PARTIALS``), so its speed depends on how many programs and warps
keep each SM busy. This command measures that choice, to inform it: it runs the kernel at the
pixel workload's full size (``--cases`` for others; a plan drawn as the ops draw one without a
plan) under the default config and under each of :data:`CANDIDATES`, some of which the rule
never picks today, and reports each config's device time per launch (``torch.profiler``, as
``bench.profile`` does) and its ratio to the default's. ``--time-limit`` starts no config after
it.

On the CPU (a smoke run) the kernels run under ``TRITON_INTERPRET=1`` at the tiny shapes, and
only the call's time is reported. Writes ``score-configs-<device>.json`` under ``--out``
(default ``runs/bench/``, git-ignored; ``--save``: the committed ``bench/results/``).
"""

from __future__ import annotations

import os

# Read by Triton when sma_kernels defines its kernels: the interpreter on a machine without a GPU.
if __name__ == "__main__":
    import torch
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import argparse
import math
import sys
import time
from typing import Any

import torch

from . import cases as bench_cases
from . import measure, summary
from .profile import add_workload_options, chosen_workloads, profile_call

SCORE_KERNEL = "_chosen_row_scores_kernel"
# (BLOCK_M, BLOCK_N, warps, stages): more programs (smaller row blocks), more warps per program,
# longer key tiles.
CANDIDATES = ((64, 64, 4, 3), (64, 64, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (32, 128, 4, 3),
              (128, 64, 8, 3), (16, 64, 4, 3))


def time_configs(case: bench_cases.Case, device: torch.device, dtype: torch.dtype,
                 candidates: tuple[tuple[int, int, int, int], ...], repeats: int,
                 deadline: float = math.inf) -> list[dict[str, Any]]:
    """One record per config of the score kernel at ``case``: the default first, then each
    candidate, none started after ``deadline`` (``time.monotonic()``; those are recorded as not
    run)."""
    from sma_kernels.plan import draw_plan
    from sma_kernels.triton._common import TileConfig
    from sma_kernels.triton.mask_scores import chosen_row_scores, default_score_config, max_chosen_rows

    x = bench_cases.make_inputs(case, device, dtype)
    batch, heads, num_q, num_k = x.q.shape[0], x.q.shape[1], x.q.shape[2], x.k.shape[2]
    plan = draw_plan(batch, num_q, num_k, generator=torch.Generator(device).manual_seed(1),
                     device=device)
    options = {name: x.options[name] for name in ("ratio", "num_per_query", "mask_self", "noise",
                                                   "head_mix")}
    scale = x.q.shape[-1] ** -0.5
    pool = x.query_pool if options["mask_self"] else None
    default = default_score_config(
        max_chosen_rows(num_q, num_k, options["ratio"], options["num_per_query"]), heads,
        options["head_mix"], x.q.shape[3])
    records = []
    for config in [None, *(TileConfig(*candidate) for candidate in candidates)]:
        record = {"case": case.name, "shape": list(case.shape), "config": _name(config or default),
                  "default": config is None}
        records.append(record)
        if time.monotonic() > deadline:
            record["not_run"] = "--time-limit reached"
            continue

        def call(config: TileConfig | None = config) -> Any:
            return chosen_row_scores(x.q, x.k, x.valid, pool, plan, **options, scale=scale,
                                     config=config)

        try:
            call()  # compiles
            measured = profile_call(call, device, repeats)
        except Exception as error:  # noqa: BLE001  (recorded: a config the card cannot run)
            record["error"] = f"{type(error).__name__}: {error}"[:300]
            continue
        record["kernel_ms"] = next((kernel["ms"] for kernel in measured["kernels"]
                                    if kernel["name"].startswith(SCORE_KERNEL)), None)
        record["time_ms"] = measured["time_ms"]
    # On a GPU the kernel's device time, on the CPU the call's (no device time there).
    metric = "kernel_ms" if device.type == "cuda" else "time_ms"
    base = records[0].get(metric)
    for record in records:
        mine = record.get(metric)
        record["over_default"] = mine / base if base and mine else None
    return records


def _name(config: tuple[int, int, int, int] | None) -> str | None:
    """A config, (BLOCK_M, BLOCK_N, warps, stages) or a TileConfig, by name."""
    return None if config is None else "BLOCK_M={} BLOCK_N={} warps={} stages={}".format(*config)


def main(argv: list[str] | None = None) -> int:
    """The command; returns its exit status."""
    parser = argparse.ArgumentParser(prog="python -m bench.score_configs",
                                     description=summary(__doc__))
    add_workload_options(parser, cases_default=["pixels"],
                         cases_help="workloads (default: pixels, the one whose call the kernel "
                                    "bounds)",
                         repeats_help="launches profiled per config (default: 10 on a GPU, 1 on "
                                      "the CPU)")
    parser.add_argument("--time-limit", type=float, default=math.inf, metavar="S",
                        help="start no config after S seconds (the rest are recorded as not run)")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.time_limit
    device, cases = chosen_workloads(parser, args)
    on_device = device.type == "cuda"
    repeats = args.repeats or (10 if on_device else 1)
    # The interpreter is slow: the default and two candidates are enough for a smoke run.
    candidates = CANDIDATES if on_device else CANDIDATES[:2]
    dtype = torch.bfloat16 if on_device else torch.float32
    result = measure.new_result(
        "sma-kernels-score-configs/1", device, dtype=str(dtype).removeprefix("torch."),
        method=f"torch.profiler over {repeats} launches after one: the score kernel's own device "
               "time per launch (CPU: the call's time, under the interpreter)",
        records=[])
    path = args.out / f"score-configs-{measure.device_slug(result['device'])}.json"
    for case in cases:
        name = case.name
        for record in time_configs(case, device, dtype, candidates, repeats, deadline):
            result["records"].append(record)
            measure.write_result(result, path)
            if "error" in record or "not_run" in record:
                print(f"{name:10s} {record['config']}: "
                      f"{record.get('error') or record['not_run']}", flush=True)
                continue
            kernel = "-" if record["kernel_ms"] is None else f"{record['kernel_ms']:.3f}"
            ratio = "-" if record["over_default"] is None else f"{record['over_default']:.2f}"
            print(f"{name:10s} {record['config']}{' (default)' if record['default'] else ''}: "
                  f"kernel {kernel} ms, call {record['time_ms']:.3f} ms, {ratio}x the default's",
                  flush=True)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
