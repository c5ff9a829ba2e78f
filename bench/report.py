"""Tables from benchmark JSON: the terminal table, the README section and the run history.

``python -m bench.report [RESULT.json ...] [--dir DIR] [--readme README.md]`` prints the table of
each result (default: every ``latest-*.json`` of the committed results, ``bench/results/``;
``--dir runs/bench`` reads those of local runs instead) and, with ``--readme``, replaces what
lies between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` in that file with a markdown
table generated from the same JSON. Nothing in the README's table is typed by hand, and it is
made from committed results only.

``python -m bench.report --history [CSV]`` prints the run history (default:
``bench/results/history.csv``): one line per (run, workload) with the headline ratios, appended
by every saved run (:func:`append_history`), so that the committed results keep one full JSON
per device and a compact record of every run before it.

Every ratio says which way is better: ``X / SDPA`` is a time ratio (lower is better), a
speed-up is the other route's time over ours (higher is better).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

from . import summary

ROOT = Path(__file__).resolve().parent.parent
# Committed results: only ``python -m bench --save`` (or an explicit --out) writes here.
RESULTS = ROOT / "bench" / "results"
# Default output of a run: git-ignored (``/runs/`` in .gitignore), so a run leaves the checkout clean.
LOCAL = ROOT / "runs" / "bench"
LOWER, HIGHER = "(lower is better)", "(higher is better)"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
# One line per (run, workload): who ran what, and the best sma-kernels backend's headline ratios.
HISTORY = RESULTS / "history.csv"
HISTORY_FIELDS = ("created_utc", "device", "device_name", "cpu_cores", "commit", "dirty", "torch",
                  "triton", "dtype", "workload", "shape", "best", "fwd_over_sdpa", "fwdbwd_over_sdpa",
                  "fwd_speedup_over_published", "fwdbwd_speedup_over_published",
                  "mask_speedup_over_vectorized")


def add_output_options(parser: argparse.ArgumentParser, written: str = "the JSON") -> None:
    """The commands' ``--out DIR`` (default: runs/bench/, git-ignored) and ``--save`` (the
    committed bench/results/ instead), as ``args.out``."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=LOCAL,
                       help=f"directory for {written} (default: runs/bench/, git-ignored)")
    where.add_argument("--save", action="store_const", dest="out", const=RESULTS,
                       help="write to the committed results, bench/results/")


def _ms(record: dict[str, Any], metric: str, key: str = "median_ms") -> str:
    value = record.get("times", {}).get(metric, {}).get(key)
    return f"{value:.3f}" if value is not None else "-"


def _count(record: dict[str, Any], metric: str) -> str:
    value = record.get("launches", {}).get(metric)
    return str(value) if value is not None else "-"


def _ratio(record: dict[str, Any], key: str, suffix: str = "x") -> str:
    value = record.get("ratios", {}).get(key)
    return f"{value:.2f}{suffix}" if value is not None else "-"


def _mb(record: dict[str, Any], metric: str) -> str:
    value = record.get("peak_extra_mb", {}).get(metric)
    return f"{value:.1f}" if value is not None else "-"


def _shape(case: dict[str, Any]) -> str:
    c = case["case"]
    return f"({c['batch']}, {c['heads']}, {c['queries']}, {c['tokens']}, {c['dim']}, {c['dim_v']})"


def _header(result: dict[str, Any]) -> str:
    device, versions = result["device"], result["versions"]
    commit = (result["git"]["commit"] or "unknown")[:10]
    return (f"{device['name']} ({device['type']}, {device['cpu_cores']} CPU cores), torch "
            f"{versions['torch']}, triton {versions['triton']}, commit {commit}, {result['created_utc']}")


def text_table(result: dict[str, Any], groups: tuple[str, ...] = ("workload",)) -> str:
    """Fixed-width table: the mask check of every provider first, then per case and provider,
    times (ms), memory and ratios (a second header line says which way each ratio is better)."""
    columns = ("case", "provider", "mask ms", "fwd ms", "fwd host ms", "fwd launches", "fwd+bwd ms",
               "fwd+bwd launches", "fwd MB", "fwd / SDPA", "fwd+bwd / SDPA",
               "fwd speed-up vs published", "mask speed-up vs vectorized")
    better = ("", "", "", "", "", "", "", "", "", LOWER, LOWER, HIGHER, HIGHER)
    rows = []
    for case in result["cases"]:
        if case["group"] not in groups:
            continue
        for name, record in case["providers"].items():
            if record["status"] != "ok":
                rows.append((case["name"], name, f"{record['status']}: {record['reason']}"[:90]))
                continue
            rows.append((case["name"], name, _ms(record, "mask"), _ms(record, "fwd"),
                         _ms(record, "fwd", "host_median_ms"), _count(record, "fwd"),
                         _ms(record, "fwdbwd"), _count(record, "fwdbwd"), _mb(record, "fwd"),
                         _ratio(record, "fwd_over_sdpa"),
                         _ratio(record, "fwdbwd_over_sdpa"), _ratio(record, "fwd_speedup_over_published"),
                         _ratio(record, "mask_speedup_over_vectorized")))
    widths = [max([len(columns[i]), len(better[i])] + [len(r[i]) for r in rows if len(r) == len(columns)])
              for i in range(len(columns))]
    lines = [_header(result), *mask_check_lines(result), "",
             "  ".join(c.rjust(w) for c, w in zip(columns, widths)),
             "  ".join(c.rjust(w) for c, w in zip(better, widths)).rstrip()]
    for row in rows:
        if len(row) == len(columns):
            lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        else:
            lines.append(f"{row[0].rjust(widths[0])}  {row[1].rjust(widths[1])}  {row[2]}")
    lines += summary_lines(result)
    lines += _sweep_table(result)
    if result["failures"]:
        lines.append("FAILED: " + "; ".join(result["failures"]))
    return "\n".join(lines)


def mask_checks(result: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Per provider, over every case of the run: (verdict, detail) of its mask against the
    reference's under the same plan (exact, or float near-ties; see bench.providers.check_mask).
    Verdicts: "ok", "FAILED" (a wrong mask or output, or an sma-kernels backend crashed),
    "not checked" (skipped everywhere) and "no mask" (the SDPA floors)."""
    records: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for case in result["cases"]:
        for name, record in case["providers"].items():
            records.setdefault(name, []).append((case["name"], record))
    checks = {}
    for name, pairs in records.items():
        failed = [(case, record) for case, record in pairs if record["status"] == "failed"]
        checked = [(case, record["check"]) for case, record in pairs
                   if record["status"] != "failed" and record.get("check") is not None]
        unchecked = [(case, record) for case, record in pairs
                     if record["status"] != "failed" and record.get("check") is None]
        if not failed and not checked and all(r.get("kind") == "floor" for _, r in unchecked):
            checks[name] = ("no mask", "attention only, nothing to check")
            continue
        details = []
        if failed:
            case, record = failed[0]
            details.append(f"failed at {len(failed)} of {len(pairs)} case(s), first {case}: "
                           f"{record['reason']}")
        if checked:
            ties = [f"{case}: {check}" for case, check in checked if check != "exact"]
            details.append(f"same mask as the reference at {len(checked)} of {len(pairs)} case(s) ("
                           + ("; ".join(ties) if ties else "exact") + ")")
        if unchecked:
            case, record = unchecked[0]
            details.append(f"skipped at {len(unchecked)} of {len(pairs)} case(s), first {case}: "
                           f"{record.get('reason')}")
        verdict = "FAILED" if failed else "ok" if checked else "not checked"
        checks[name] = (verdict, "; ".join(details))
    return checks


def mask_check_lines(result: dict[str, Any]) -> list[str]:
    """One line per provider: :func:`mask_checks`, printed before any timing."""
    checks = mask_checks(result)
    if not checks:
        return []
    width = max(len(name) for name in checks)
    title = ("mask check (each provider's mask against the reference's under the same plan; "
             "float near-ties accepted):")
    return [title] + [f"  {name:<{width}}  {verdict:<11}  {detail}"
                      for name, (verdict, detail) in checks.items()]


def summary_lines(result: dict[str, Any]) -> list[str]:
    """Per workload: the best sma-kernels backend against every baseline, the 1.3x-of-SDPA
    target, and its achieved rate against the measured ceilings."""
    def ratio(summary: dict[str, Any], key: str, fmt: str = "{:.1f}x") -> str:
        return fmt.format(summary[key]) if key in summary else "-"

    lines = []
    for case in result["cases"]:
        summary = case.get("summary")
        if case["group"] != "workload" or not summary:
            continue
        best = case["providers"][summary["best_backend"]]
        achieved = best["achieved"]["fwd"]
        speedups = ", ".join(f"{ratio(summary, f'fwd_speedup_over_{base}')} vs {base}"
                             for base in ("published", "vectorized", "compiled", "flex")
                             if f"fwd_speedup_over_{base}" in summary)
        lines.append(f"{case['name']}: best {summary['best_backend']}: time / SDPA fwd "
                     f"{ratio(summary, 'fwd_over_sdpa', '{:.2f}x')}, fwd+bwd "
                     f"{ratio(summary, 'fwdbwd_over_sdpa', '{:.2f}x')} (lower is better, target 1.3x); "
                     f"fwd speed-up {HIGHER} {speedups or 'unknown (no baseline ran)'}; "
                     f"{achieved['tflops']:.3g} TFLOP/s ({achieved['pct_matmul']:.2g}% of matmul), "
                     f"{achieved['gbps']:.3g} GB/s ({achieved['pct_copy']:.2g}% of copy)"
                     + _host_share(best["times"]["fwd"], result["device"]["type"]))
    return lines


def _host_share(timing: dict[str, Any], device_type: str) -> str:
    """'; host X of Y ms' on a GPU (see measure.time_call), else nothing (on the CPU the host
    time is the time)."""
    if device_type == "cpu" or "host_median_ms" not in timing:
        return ""
    return f"; host {_time(timing['host_median_ms'])} of {_time(timing['median_ms'])} ms per fwd call"


def _sweep_table(result: dict[str, Any]) -> list[str]:
    """Forward times (ms) of the sweep cases: one row per case, one column per provider."""
    cases = [case for case in result["cases"] if case["group"].startswith("sweep")]
    names = list(dict.fromkeys(n for case in cases for n, r in case["providers"].items()
                               if r["status"] == "ok"))
    if not cases:
        return []
    width = max(len(name) for name in names + ["fwd ms"]) + 1
    lines = ["sweep, forward ms".rjust(19) + "  " + "".join(name.rjust(width) for name in names)]
    for case in cases:
        cells = [_ms(case["providers"].get(name, {}), "fwd") for name in names]
        lines.append(case["name"].rjust(19) + ": " + "".join(cell.rjust(width) for cell in cells))
    return lines


def _time(ms: float) -> str:
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def _pair(record: dict[str, Any], first: str, second: str, fmt: Any) -> str:
    """'first (second)' from ``record``, each through ``fmt`` (a format string or a function)."""
    show = fmt if callable(fmt) else fmt.format
    values = [record.get(first), record.get(second)]
    if values[0] is None:
        return "-"
    return show(values[0]) if values[1] is None else f"{show(values[0])} ({show(values[1])})"


def markdown(results: list[dict[str, Any]]) -> str:
    """README section: per result file (device), one row per workload, the forward time of each
    provider, and the best sma-kernels backend's ratios."""
    parts = [("Generated by `python -m bench.report --readme README.md` from the committed "
              "`bench/results/latest-*.json` (`python -m bench --save` writes them). Forward time in ms "
              "(lower is better), forward+backward in parentheses; medians; every ratio against "
              "baselines timed in the same process. \"best\" is the fastest sma-kernels backend; "
              "\"best / SDPA\" is its time over SDPA's (lower is better), a speed-up is the "
              "other route's time over its (higher is better).")]
    for result in results:
        cases = [case for case in result["cases"] if case["group"] == "workload"]
        names = [name for name in dict.fromkeys(n for case in cases for n in case["providers"])
                 if any(case["providers"].get(name, {}).get("status") == "ok" for case in cases)]
        dtype = cases[0]["dtype"] if cases else ""
        parts.append(f"\n**{_header(result)}**, {dtype}\n")
        parts.append("| workload (B, H, Q, L, d, dv) | " + " | ".join(names) +
                     f" | best / SDPA {LOWER} | best speed-up vs published {HIGHER}"
                     f" | best mask speed-up vs vectorized {HIGHER} | best extra MB |")
        parts.append("|---" * (len(names) + 5) + "|")
        skipped: dict[str, str] = {}
        for case in cases:
            cells = []
            for name in names:
                record = case["providers"].get(name, {})
                if record.get("status") != "ok":
                    skipped.setdefault(name, str(record.get("reason")))
                    cells.append("-")
                    continue
                times = {metric: value["median_ms"] for metric, value in record["times"].items()}
                cells.append(_pair(times, "fwd", "fwdbwd", _time))
            summary = case.get("summary") or {}
            best = case["providers"].get(summary.get("best_backend"), {})
            cells += [_pair(summary, "fwd_over_sdpa", "fwdbwd_over_sdpa", "{:.2f}x"),
                      _pair(summary, "fwd_speedup_over_published", "fwdbwd_speedup_over_published",
                            "{:.1f}x"),
                      _pair(summary, "mask_speedup_over_vectorized", "", "{:.1f}x"),
                      _pair(best.get("peak_extra_mb", {}), "fwd", "", "{:.0f}")]
            parts.append(f"| {case['name']} {_shape(case)} | " + " | ".join(cells) + " |")
        for name, reason in skipped.items():
            parts.append(f"\n- {name} missing in some rows: {reason.replace('|', '/')}")
        checks = mask_checks({**result, "cases": cases})
        same = [name for name, (verdict, _) in checks.items() if verdict == "ok"]
        wrong = [f"{name} ({detail})" for name, (verdict, detail) in checks.items() if verdict == "FAILED"]
        parts.append("\nMask check: " + (", ".join(f"`{name}`" for name in same) or "no provider")
                     + " chose the reference's mask (exact or a float near-tie) at every workload"
                     + " where it ran" + (f"; wrong: {'; '.join(wrong)}" if wrong else "") + ".")
    return "\n".join(parts)


def history_rows(result: dict[str, Any], device: str) -> list[dict[str, str]]:
    """The lines of ``result`` for the history: one per workload that has a summary.

    ``device`` is the run's file-name tag (``bench.measure.device_slug``: "cpu", "h100", ...).
    Ratios are those of the best sma-kernels backend (see :func:`summary_lines`); an empty field
    means the run did not measure it. ``commit`` is empty where the run did not know its commit.
    """
    rows = []
    for case in result["cases"]:
        summary = case.get("summary")
        if case["group"] != "workload" or not summary:
            continue
        c = case["case"]
        rows.append({
            "created_utc": result["created_utc"], "device": device,
            "device_name": result["device"]["name"], "cpu_cores": str(result["device"]["cpu_cores"]),
            "commit": (result["git"]["commit"] or "")[:10],
            "dirty": {True: "yes", False: "no"}.get(result["git"].get("dirty"), "unknown"),
            "torch": result["versions"]["torch"], "triton": str(result["versions"].get("triton") or ""),
            "dtype": case["dtype"], "workload": case["name"],
            "shape": "x".join(str(c[key]) for key in ("batch", "heads", "queries", "tokens", "dim",
                                                      "dim_v")),
            "best": summary["best_backend"],
            **{key: f"{summary[key]:.3f}" if key in summary else ""
               for key in HISTORY_FIELDS[HISTORY_FIELDS.index("fwd_over_sdpa"):]},
        })
    return rows


def append_history(result: dict[str, Any], device: str, path: Path = HISTORY) -> list[dict[str, str]]:
    """Append the lines of ``result`` to the history CSV at ``path`` (with a header if new)."""
    rows = history_rows(result, device)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=HISTORY_FIELDS, lineterminator="\n")
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return rows


def read_history(path: Path = HISTORY) -> list[dict[str, str]]:
    with path.open(newline="") as stream:
        return list(csv.DictReader(stream))


def history_table(rows: list[dict[str, str]]) -> str:
    """The history as a fixed-width table, oldest run first; ratios of the best backend."""
    columns = ("created_utc", "device", "commit", "dtype", "workload", "best", "fwd_over_sdpa",
               "fwdbwd_over_sdpa", "fwd_speedup_over_published")
    titles = ("run (UTC)", "device", "commit", "dtype", "workload", "best", "fwd / SDPA",
              "fwd+bwd / SDPA", "fwd speed-up vs published")
    better = ("", "", "", "", "", "", LOWER, LOWER, HIGHER)
    cells = [[row.get(column) or "-" for column in columns] for row in rows]
    widths = [max([len(title), len(note)] + [len(line[i]) for line in cells])
              for i, (title, note) in enumerate(zip(titles, better))]
    lines = ["  ".join(t.rjust(w) for t, w in zip(titles, widths)),
             "  ".join(t.rjust(w) for t, w in zip(better, widths)).rstrip()]
    lines += ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def update_readme(readme: Path, results: list[dict[str, Any]]) -> None:
    """Replace the text between the bench markers of ``readme`` with :func:`markdown`."""
    text = readme.read_text()
    if START not in text or END not in text or text.index(START) > text.index(END):
        raise ValueError(f"{readme} has no {START} ... {END} section")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{markdown(results)}\n{END}{tail}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("results", nargs="*", type=Path,
                        help="result JSON files (default: DIR/latest-*.json)")
    parser.add_argument("--dir", type=Path, default=RESULTS,
                        help="read DIR/latest-*.json (default: the committed bench/results/; "
                             "runs/bench for local runs)")
    parser.add_argument("--readme", type=Path, help="README whose bench section to regenerate "
                                                    "(from committed results only)")
    parser.add_argument("--short", action="store_true", help="only the per-workload summary")
    parser.add_argument("--history", type=Path, nargs="?", const=HISTORY, metavar="CSV",
                        help="print the run history instead (default: bench/results/history.csv)")
    args = parser.parse_args(argv)
    if args.history:
        if not args.history.exists():
            parser.error(f"--history: {args.history} does not exist")
        print(history_table(read_history(args.history)))
        return
    paths = args.results or sorted(args.dir.glob("latest-*.json"))
    if not paths:
        parser.error(f"no results: {args.dir} has no latest-*.json")
    if args.readme:
        local = [path for path in paths if path.resolve().parent != RESULTS]
        if local:
            parser.error(f"--readme: the README table comes from committed results "
                         f"({RESULTS}) only, not {local[0]}; rerun with python -m bench --save")
    results = [json.loads(path.read_text()) for path in paths]
    for result in results:
        if args.short:
            print("\n".join([_header(result), *mask_check_lines(result), *summary_lines(result),
                             *(["FAILED: " + "; ".join(result["failures"])] if result["failures"] else [])]))
        else:
            print(text_table(result))
        print()
    if args.readme:
        update_readme(args.readme, results)
        print(f"updated {args.readme}")


if __name__ == "__main__":
    main()
