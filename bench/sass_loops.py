"""``python -m bench.sass_loops``: what each logit costs in the Triton kernels' streaming loops, read
from their sm_90 machine code. No GPU needed.

At the workloads' small head dims (16-64) a FlashAttention-style loop is not bound by its
tensor-core products: per logit an SM issues several warp instructions (4 a cycle, one per
scheduler) and computes one exponential (16 a cycle on its special-function units), against a
few dozen multiply-adds on the tensor cores. So the instructions a loop issues per logit, and
its exponentials, bound its speed, and the compiled code shows both.

For each workload of bench/README.md, "Workloads" whose mask takes the general path (HIGGS takes
the one-kernel short-sequence path, which has no streaming loop), this records under the
interpreter, at a small size with the workload's head dims and options:

* the score kernel (``mask_scores.py``) at the config the full-size workload takes (it is a
  function of the shape, see ``score_config``): loop 1, the row log-sum-exp, in its two
  copies: over the tiles that hold valid tokens only ("lse", which every tile of the
  workloads but the last takes), and over tiles that may hold invalid ones ("lse, masked");
  loop 2, the column sums of the probabilities;
* the attention (``attention.py``) at every autotune config: the forward's loop over the kept
  keys, and the backward's over the query tiles (dK and dV of a block of kept keys) and over the
  kept keys (dQ of a query tile). The forward and dQ run a sample's last block of keys, which
  masks its tail, after the loop.

It compiles them for sm_90 (``bench/compile_sm90.py``) and reads each loop from
``cuobjdump -sass``. Per loop and tile of BLOCK_M x BLOCK_N logits: the instructions each warp
issues per iteration; per logit, the warp instructions, the exponentials (MUFU.EX2), and the
cycles an SM needs for each at the rates above, the larger of the two being the loop's floor.
These are static counts, not times: memory stalls, latencies and occupancy are not in them.
Writes ``sass-loops-sm90.json`` under ``--out`` (default ``runs/bench/``, git-ignored;
``--save`` writes to the committed ``bench/results/``).
"""

from __future__ import annotations

import os

# Read by Triton when sma_kernels defines its kernels, so it is set before the imports below.
os.environ["TRITON_INTERPRET"] = "1"

import argparse
import json
import sys

import torch

import sma_kernels as sk
from sma_kernels.plan import default_query_pool
from sma_kernels.triton import mask_scores
from sma_kernels.triton.attention import attention_backward, attention_forward
from sma_kernels.triton.short_sequence import SHORT_LENGTH

from . import cases as bench_cases
from . import measure, report, summary
from .compile_sm90 import compile_launches, recorded_launches

ISSUE_PER_CYCLE = 4  # warp instructions an sm_90 SM issues per cycle (4 schedulers)
EXP_PER_CYCLE = 16  # MUFU.EX2 results an sm_90 SM computes per cycle
WARP = 32
# Each kernel's streaming loops, in program order.
KERNELS = {"_chosen_row_scores_kernel": ("lse", "lse, masked", "column sums"),
           "_attention_fwd_kernel": ("attention",), "_attention_bwd_dkdv_kernel": ("dK dV",),
           "_attention_bwd_dq_kernel": ("dQ",)}
# The recording's small size: enough keys for several tiles, and the full-size score config.
BATCH, HEADS, TOKENS = 1, 2, 256


def score_config(case: bench_cases.Case) -> mask_scores.TileConfig:
    """The score kernel's config at the case's full size."""
    rows = mask_scores.max_chosen_rows(case.queries, case.tokens, case.ratio, case.num_per_query)
    return mask_scores.default_score_config(rows, case.heads, case.head_mix, case.dim)


def record_launches(case: bench_cases.Case) -> list[dict]:
    """The score kernel's and the attention's launches at a small size of ``case``."""
    g = torch.Generator().manual_seed(0)
    queries = TOKENS if case.mask_self else min(case.queries, 64)
    q, k, v = (torch.randn(BATCH, HEADS, n, dim, generator=g, dtype=torch.bfloat16)
               for n, dim in ((queries, case.dim), (TOKENS, case.dim), (TOKENS, case.dim_v)))
    valid = torch.arange(TOKENS)[None, :] < TOKENS - 40  # padding at the end
    plan = sk.make_plan(BATCH, queries, TOKENS, HEADS, generator=g)
    pool = default_query_pool(valid, queries, valid if case.mask_self else None, case.mask_self)
    with recorded_launches() as launches:
        mask_scores.chosen_row_scores(q, k, valid, pool, plan, ratio=case.ratio,
                                      num_per_query=case.num_per_query,
                                      mask_self=case.mask_self, noise=0.0,
                                      head_mix=case.head_mix, scale=case.dim ** -0.5,
                                      config=score_config(case))
        out, lse = attention_forward(q, k, v, valid, scale=case.dim ** -0.5)
        attention_backward(torch.ones_like(out), q, k, v, valid, out, lse,
                           scale=case.dim ** -0.5)
    return [launch for launch in launches if launch["kernel"] in KERNELS]


def loop_costs(result: dict) -> list[dict]:
    """Per streaming loop of one compilation: its counts per warp and iteration, and its costs
    per logit (see the module docstring)."""
    constexprs, warps = result["constexprs"], result["options"]["num_warps"]
    logits = constexprs["BLOCK_M"] * constexprs["BLOCK_N"]
    names = KERNELS[result["kernel"]]
    if len(result["loops"]) != len(names):
        raise RuntimeError(f"{result['kernel']}: {len(result['loops'])} streaming loops in the "
                           f"machine code, expected {len(names)}")
    rows = []
    for name, loop in zip(names, result["loops"]):
        per_logit = {"warp_instructions": loop["instructions"] * warps / logits,
                     "exponentials": loop["MUFU.EX2"] * warps * WARP / logits}
        issue = per_logit["warp_instructions"] / ISSUE_PER_CYCLE
        exp = per_logit["exponentials"] / EXP_PER_CYCLE
        rows.append({"loop": name, "block_m": constexprs["BLOCK_M"],
                     "block_n": constexprs["BLOCK_N"], "warps": warps,
                     "per_warp_and_tile": {key: value for key, value in loop.items()
                                           if key not in ("start", "end")},
                     "per_logit": per_logit,
                     "sm_cycles_per_logit": {"issue": issue, "exp": exp, "floor": max(issue, exp)},
                     "bound": "issue" if issue >= exp else "exp"})
    return rows


def measure_loops() -> list[dict]:
    """One record per workload on the general path: its loops' costs. Launches that workloads
    share (the same head dims) are compiled once."""
    cases = [case for case in bench_cases.WORKLOADS if case.tokens > SHORT_LENGTH]
    unique: dict[str, int] = {}
    case_launches = {}
    for case in cases:
        keys = [json.dumps(launch, sort_keys=True) for launch in record_launches(case)]
        case_launches[case.name] = [unique.setdefault(key, len(unique)) for key in keys]
    results = compile_launches([json.loads(key) for key in unique], sass=True)
    for result in results:
        if "error" in result:
            raise RuntimeError(f"{result['kernel']}: {result['error']}")
    return [{"case": case.name, "shape": case.shape, "options": case.options(),
             "kernels": [{"kernel": result["kernel"], "config": result["config"],
                          "registers": result["registers"], "local_bytes": result["local_bytes"],
                          "loops": loop_costs(result)}
                         for result in results if result["launch"] in case_launches[case.name]]}
            for case in cases]


def table(records: list[dict]) -> str:
    header = ("| workload | loop | BLOCK_M x BLOCK_N, warps | instructions per warp and tile | "
              "warp instructions per logit | exponentials per logit | SM cycles per logit "
              "(issue / exp) |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    for record in records:
        for kernel in record["kernels"]:
            for loop in kernel["loops"]:
                cycles = loop["sm_cycles_per_logit"]
                lines.append(
                    f"| {record['case']} | {loop['loop']} | {loop['block_m']} x "
                    f"{loop['block_n']}, {loop['warps']} | "
                    f"{loop['per_warp_and_tile']['instructions']} | "
                    f"{loop['per_logit']['warp_instructions']:.3f} | "
                    f"{loop['per_logit']['exponentials']:.2f} | "
                    f"{cycles['issue']:.3f} / {cycles['exp']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sass_loops",
                                     description=summary(__doc__))
    report.add_output_options(parser)
    args = parser.parse_args(argv)

    records = measure_loops()
    print(table(records))
    result = measure.new_result(
        "sma-kernels-sass-loops/1", torch.device("cpu"),
        target="sm_90, compiled without a GPU by the installed Triton",
        method="static counts of cuobjdump -sass loop bodies; issue at "
               f"{ISSUE_PER_CYCLE} warp instructions and {EXP_PER_CYCLE} exponentials per SM "
               "and cycle",
        records=records)
    path = measure.write_result(result, args.out / "sass-loops-sm90.json")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
