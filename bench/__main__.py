"""``python -m bench``: time every sma-kernels backend against the pure-PyTorch baselines.

Default: the four workloads of bench/README.md, "Workloads" (shrunk on the CPU, full size on a
GPU, where an L sweep is added). ``--full`` adds bigger CPU sizes and the sweeps over L, Q, B and
head dim. Writes ``<device>-<UTC date>.json`` and ``latest-<device>.json`` plus plots under
``--out`` (default ``runs/bench/``, git-ignored, so a run leaves the checkout clean). ``--save``
writes to the committed ``bench/results/`` instead, which keeps one full result per device: there
a run replaces ``latest-<device>.json`` and its plots and appends its headline ratios to
``history.csv`` (``python -m bench.report --history`` prints it) instead of adding a dated copy.
Then it prints each provider's mask check, the timing table and the end-to-end steps, and exits 1
if any provider's mask or output was wrong or an sma-kernels backend failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from . import cases as bench_cases
from . import e2e, measure, plots, report, suite, summary
from .providers import SmaBackend, default_providers

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=summary(__doc__))
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full", action="store_true", help="bigger CPU sizes and all sweeps")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes only (smoke tests)")
    report.add_output_options(parser, "JSON and plots")
    parser.add_argument("--dtype", choices=tuple(DTYPES),
                        help="input dtype (default: bfloat16 on a GPU, float32 on the CPU)")
    parser.add_argument("--cases", nargs="+", metavar="NAME", help="only these cases (e.g. higgs L=4096)")
    parser.add_argument("--providers", nargs="+", metavar="NAME", help="only these providers")
    parser.add_argument("--min-run-time", type=float, help="seconds of repeats per timing "
                        "(default: 0.2 on the CPU, 0.1 on a GPU)")
    parser.add_argument("--compile-budget", type=float, default=None,
                        help="seconds of torch.compile allowed in total (default: 120 CPU, 150 GPU)")
    parser.add_argument("--dense-budget-gb", type=float, default=None,
                        help="skip routes that would hold more (B, H, Q, L) data than this "
                             "(default: 6 on the CPU, 60 on a GPU)")
    parser.add_argument("--time-limit", type=float, help="seconds: start no case after 90%% of it "
                        "and no end-to-end step after it (what is left is recorded as not run)")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end training steps")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--readme", type=Path, help="also regenerate this README's bench table "
                        "from the committed results (needs --save)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.readme and args.out.resolve() != report.RESULTS:
        parser.error("--readme: the README table comes from the committed results; add --save")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    on_gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if on_gpu else torch.float32)
    min_run_time = args.min_run_time or (0.1 if on_gpu else 0.2)
    compile_budget = args.compile_budget if args.compile_budget is not None else (150.0 if on_gpu else 120.0)
    dense_budget = args.dense_budget_gb or (60.0 if on_gpu else 6.0)

    if args.tiny:
        cases = bench_cases.tiny_cases()
    else:
        cases = bench_cases.workloads(device.type, args.full) + bench_cases.sweeps(device.type, args.full)
    if args.cases:
        cases = [case for case in cases if case.name in args.cases]
    providers = default_providers()
    if args.providers:
        providers = [p for p in providers if p.name in args.providers]
        for provider in providers:  # asked for by name: run it even under Triton's interpreter
            if isinstance(provider, SmaBackend):
                provider.allow_interpreter = True

    def log(line: str) -> None:
        print(line, flush=True)

    settings = {"full": args.full, "tiny": args.tiny, "dtype": str(dtype).removeprefix("torch."),
                "min_run_time": min_run_time, "compile_budget_s": compile_budget,
                "dense_budget_gb": dense_budget, "seed": args.seed, "time_limit_s": args.time_limit}
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = measure.utc_stamp()
    # The committed results hold the latest run per device and the history, not a dated copy.
    committed = args.out.resolve() == report.RESULTS

    def save(result: dict) -> list[Path]:
        # Written after every case too, so a run cut short still leaves its results.
        slug = measure.device_slug(result["device"])
        text = json.dumps(result, indent=1) + "\n"
        paths = [args.out / f"latest-{slug}.json"]
        if not committed:
            paths.insert(0, args.out / f"{slug}-{stamp}.json")
        for path in paths:
            path.write_text(text)
        return paths

    def save_partial(result: dict) -> None:
        save({**result, "partial": True,
              "end_to_end": {"status": "skipped", "reason": "not run yet (partial result)"}})

    started = time.time()
    deadline = started + 0.9 * args.time_limit if args.time_limit else None
    result = suite.run_suite(cases, providers, device, dtype, min_run_time=min_run_time,
                             compile_budget=compile_budget, dense_budget_gb=dense_budget,
                             args=settings, log=log, seed=args.seed, deadline=deadline,
                             on_case=save_partial)
    if args.no_e2e:
        result["end_to_end"] = {"status": "skipped", "reason": "--no-e2e"}
    else:
        try:
            result["end_to_end"] = e2e.run(device, min_run_time=min_run_time, log=log, tiny=args.tiny,
                                           deadline=started + args.time_limit if args.time_limit else None)
        except Exception as error:  # noqa: BLE001  (the model is another package: record, go on)
            result["end_to_end"] = {"status": "skipped", "reason": f"{type(error).__name__}: {error}"[:300]}
    result["partial"] = False
    suite.validate(result)
    written = save(result)
    if committed:
        report.append_history(result, measure.device_slug(result["device"]), report.HISTORY)
        written.append(report.HISTORY)
    if not args.no_plots:
        try:
            written += plots.make_plots(result, args.out / f"latest-{measure.device_slug(result['device'])}")
        except ImportError as error:
            log(f"plots skipped: matplotlib is not installed ({error})")
    if args.readme:
        report.update_readme(args.readme, [json.loads(p.read_text())
                                           for p in sorted(report.RESULTS.glob("latest-*.json"))])
        written.append(args.readme)
    log("wrote " + ", ".join(str(path) for path in written))
    log("")
    log(report.text_table(result))  # the mask check first, then the timings
    log("")
    log(e2e.text_table(result["end_to_end"]))
    if result["failures"]:
        log(f"benchmark FAILED: {len(result['failures'])} provider(s) gave wrong results or crashed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
