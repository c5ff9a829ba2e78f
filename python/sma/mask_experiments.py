"""Does the self-guided mask keep to planted structure? Coverage against the pretraining step.

    python -m sma.mask_experiments --out runs/mask-structure --seeds 0 1 2 3

On the two synthetic sets with planted groups (``synthetic-features``: features in correlated
pairs; ``synthetic-groups``: upper-case words of 3-6 letters in random letters), in three setups
(:data:`SETS`: ``pairs`` and ``groups``, the default model for 1,500 / 1,000 steps; ``pairs-fast``,
a smaller model at a higher learning rate for 400 steps, where plain guided masking collapses in
most seeds), each masking condition (:data:`CONDITIONS`: plain guided, random, the EMA mask
teacher at several decays, the random -> guided curriculum, the random head mix) pretrains a
small cross-attention encoder per seed, keeping a snapshot every 100 steps. Every snapshot is then read by
:func:`sma.mask_structure.analyze` on held-out examples: the structure metric (planted-group
coverage), the leak check (an error that no honest prediction can go below) and the masked
loss, for the model's guided mask and for a random mask of the same size. With ``--finetune``
each final encoder, and a freshly initialised one, is also fine-tuned on the set's task.

Writes ``mask_structure.json`` (settings, every run's curves, the summary), ``mask_structure.md``
(the tables) and ``mask_structure.png`` to ``--out``; run directories go to ``--runs`` and a run
whose ``metrics.json`` exists there is not repeated.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from . import data as datasets
from . import mask_structure as ms
from .masking import MaskingConfig
from .model import ModelConfig
from .train import METRICS, TrainConfig, finetune, pretrain, setup

SETS = {
    "pairs": {
        "data": "synthetic-features",
        "model": ModelConfig(input_kind="features", max_len=8, encoder="cross", width=64, depth=2,
                             heads=4, latents=8, widening=2),
        "masking": MaskingConfig("guided", ratio=0.25, num_per_query=2, head_mix="mean"),
        "pretrain": TrainConfig(steps=1500, batch_size=64, lr=3e-4, warmup=100, checkpoint_every=100),
        "structure": "pair_coverage", "leak": "hidden_pair_loss", "floor": 1.0,
        "conditions": ("guided", "random", "teacher-0.999", "teacher-0.995", "teacher-0.99",
                       "curriculum-0.5", "head-mix-random"), "seeds": (0, 1, 2, 3),
        "finetune": ("guided", "random", "teacher-0.999")},
    "pairs-fast": {
        "data": "synthetic-features",
        "model": ModelConfig(input_kind="features", max_len=8, encoder="cross", width=32, depth=1,
                             heads=2, latents=8, widening=1),
        "masking": MaskingConfig("guided", ratio=0.25, num_per_query=2, head_mix="mean"),
        "pretrain": TrainConfig(steps=400, batch_size=32, lr=1e-3, warmup=40, checkpoint_every=100),
        "structure": "pair_coverage", "leak": "hidden_pair_loss", "floor": 1.0,
        "conditions": ("guided", "random", "teacher-0.999", "teacher-0.99", "curriculum-0.5",
                       "head-mix-random"), "seeds": (0, 1, 2, 3, 4, 5),
        "finetune": ("guided", "random", "teacher-0.99")},
    "groups": {
        "data": "synthetic-groups",
        "model": ModelConfig(input_kind="bytes", max_len=datasets.MAX_LEN, encoder="cross", width=64,
                             depth=2, heads=4, latents=8, widening=2),
        "masking": MaskingConfig("guided", ratio=0.25, num_per_query=2, head_mix="mean"),
        "pretrain": TrainConfig(steps=1000, batch_size=64, lr=3e-4, warmup=100, checkpoint_every=100),
        "structure": "group_mate_share", "leak": "background_loss", "floor": float(np.log(8)),
        "conditions": ("guided", "random", "teacher-0.999", "teacher-0.99", "curriculum-0.5"),
        "seeds": (0, 1, 2), "finetune": ("guided", "random", "teacher-0.999")},
}
CONDITIONS = {
    "guided": {},
    "random": {"strategy": "random"},
    "teacher-0.999": {"teacher_ema": 0.999},
    "teacher-0.995": {"teacher_ema": 0.995},
    "teacher-0.99": {"teacher_ema": 0.99},
    "curriculum-0.5": {"curriculum": 0.5},
    "head-mix-random": {"head_mix": "random"},
}
# How a condition is named in the tables and the picture: under "random" the model is pretrained
# with random masks, and what is measured is the mask its own attention would choose.
LABELS = {"random": "pretrained with random masks"}
FINETUNE = TrainConfig(steps=300, batch_size=64, lr=5e-4, warmup=30)
FINETUNE_SEEDS = (0, 1, 2)
REPORTED = ("structure", "leak", "masked_loss")


def _pretrain(name: str, condition: str, seed: int, runs: Path, backend: str) -> Path:
    spec = SETS[name]
    out = runs / name / condition / f"s{seed}"
    if not (out / METRICS).exists():
        masking = replace(spec["masking"], **CONDITIONS[condition])
        pretrain(datasets.load_corpus(spec["data"]), spec["data"], spec["model"], masking,
                 replace(spec["pretrain"], seed=seed), out, dist=setup("cpu"), backend=backend,
                 progress=False)
    return out


def _curves(out: Path, name: str, backend: str, draws: int, resamples: int) -> dict:
    """Per reported metric: steps, guided and random values and their 95 % CIs (kept in the run
    directory's ``curves.json`` for these settings)."""
    spec = SETS[name]
    cached = out / "curves.json"
    key = {"draws": draws, "resamples": resamples, "structure": spec["structure"], "leak": spec["leak"]}
    if cached.exists():
        stored = json.loads(cached.read_text())
        if stored["settings"] == key:
            return stored["curves"]
    result = ms.analyze_checkpoints(ms.checkpoint_files(out), spec["data"], draws=draws,
                                    resamples=resamples, backend=backend)
    names = {"structure": spec["structure"], "leak": spec["leak"], "masked_loss": "masked_loss"}
    curves = {"steps": [r["step"] for r in result["records"]]}
    for key, metric in names.items():
        curves[key] = {s: {"value": [r["metrics"][metric][s]["value"] for r in result["records"]],
                           "ci95": [r["metrics"][metric][s]["ci95"] for r in result["records"]]}
                       for s in ms.STRATEGIES}
    cached.write_text(json.dumps({"settings": key, "curves": curves}) + "\n")
    return curves


def _finetune(name: str, init: Path | None, seed: int, runs: Path, condition: str, backend: str) -> dict:
    out = runs / name / condition / f"s{seed}" / "finetune"
    if (out / METRICS).exists():
        return json.loads((out / METRICS).read_text())
    config = None if init is not None else SETS[name]["model"]
    return finetune(datasets.load_task(SETS[name]["data"]), replace(FINETUNE, seed=seed), out, dist=setup("cpu"),
                    init=init, model_config=config, backend=backend, progress=False)


def _mean_ci(values: list[float]) -> dict:
    """Mean and std over the seeds that have a value (a metric has none when its denominator is
    empty, e.g. no hidden pair at all in a collapsed run); ``missing`` counts the others."""
    values = np.asarray(values, dtype=np.float64)
    present = values[np.isfinite(values)]
    return {"mean": float(present.mean()) if len(present) else None,
            "std": float(present.std(ddof=1)) if len(present) > 1 else 0.0,
            "per_seed": [float(v) if np.isfinite(v) else None for v in values],
            "missing": int(len(values) - len(present))}


def summarize(results: dict) -> dict:
    """Per set and condition: the guided structure metric at its peak and at the last step, the
    random baseline, the leak check at the last step, and the share of seeds that stayed >= 2x
    random at the last step."""
    summary = {}
    for name, conditions in results["runs"].items():
        summary[name] = {}
        for condition, seeds in conditions.items():
            final = [c["structure"]["guided"]["value"][-1] for c in seeds.values()]
            peak = [max(c["structure"]["guided"]["value"]) for c in seeds.values()]
            random = [c["structure"]["random"]["value"][-1] for c in seeds.values()]
            leak = [c["leak"]["guided"]["value"][-1] for c in seeds.values()]
            loss = [c["masked_loss"]["guided"]["value"][-1] for c in seeds.values()]
            summary[name][condition] = {
                "structure_final": _mean_ci(final), "structure_peak": _mean_ci(peak),
                "random_final": _mean_ci(random), "leak_final": _mean_ci(leak),
                "masked_loss_final": _mean_ci(loss),
                "seeds_at_least_2x_random": int(sum(f >= 2 * r for f, r in zip(final, random, strict=True))),
                "seeds": len(final)}
            tuned = results.get("finetune", {}).get(name, {}).get(condition)
            if tuned:
                summary[name][condition]["test_roc_auc"] = _mean_ci(list(tuned.values()))
        tuned = results.get("finetune", {}).get(name, {}).get("none")
        if tuned:
            summary[name]["none"] = {"test_roc_auc": _mean_ci(list(tuned.values()))}
    return summary


def table(results: dict) -> str:
    """The summary as markdown tables, one per set."""
    lines = []
    for name, conditions in results["summary"].items():
        spec = SETS[name]
        tuned = any("test_roc_auc" in c for c in conditions.values())
        lines += [f"### {name} ({spec['data']})", "",
                  (f"Structure: `{spec['structure']}`; leak check: `{spec['leak']}` (floor "
                  f"{spec['floor']:.3f}: a value below it means the mask tells what it hides). "
                  "Mean ± std over seeds (per-seed values in the JSON); the guided mask of each "
                  "checkpoint, except the random row's random baseline."), "",
                  "| condition | structure at peak | structure at end (per seed) | ≥ 2× random at end | "
                  "leak check at end | masked loss at end |" + (" test ROC-AUC |" if tuned else ""),
                  "|---|---|---|---|---|---|" + ("---|" if tuned else "")]
        for condition, entry in conditions.items():
            if condition == "none":
                continue
            per_seed = " / ".join(f"{v:.2f}" for v in entry["structure_final"]["per_seed"])
            leak = entry["leak_final"]
            none = f" ({leak['missing']} without any)" if leak["missing"] else ""
            leak_text = "none" if leak["mean"] is None else f"{leak['mean']:.3f} ± {leak['std']:.3f}{none}"
            row = (f"| {LABELS.get(condition, condition)} | {entry['structure_peak']['mean']:.3f} | "
                   f"{entry['structure_final']['mean']:.3f} ({per_seed}) | "
                   f"{entry['seeds_at_least_2x_random']} of {entry['seeds']} | {leak_text} | "
                   f"{entry['masked_loss_final']['mean']:.3f} |")
            if tuned:
                auc = entry.get("test_roc_auc")
                row += f" {auc['mean']:.3f} ± {auc['std']:.3f} |" if auc else " |"
            lines.append(row)
        random = next(iter(conditions.values()))["random_final"]["mean"]
        lines.append(f"| random mask of the same size | | {random:.3f} | | | |" + (" |" if tuned else ""))
        if "none" in conditions:
            auc = conditions["none"]["test_roc_auc"]
            lines.append(f"| no pretraining | | | | | | {auc['mean']:.3f} ± {auc['std']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Per set: the structure metric and the leak check against the step, mean over seeds (thin
    lines: single seeds), per condition; the random mask dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(results["runs"])
    fig, axes = plt.subplots(len(sets), 2, figsize=(11, 3.6 * len(sets)), squeeze=False)
    colours = dict(zip(CONDITIONS, plt.get_cmap("tab10").colors, strict=False))
    for row, name in enumerate(sets):
        spec = SETS[name]
        for col, key in enumerate(("structure", "leak")):
            ax = axes[row][col]
            for condition, seeds in results["runs"][name].items():
                curves = list(seeds.values())
                steps = curves[0]["steps"]
                values = np.array([c[key]["guided"]["value"] for c in curves], dtype=np.float64)
                for single in values:
                    ax.plot(steps, single, color=colours[condition], alpha=0.25, linewidth=0.8)
                with np.errstate(invalid="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # a step where no seed has a value
                    mean = np.nanmean(values, 0)
                ax.plot(steps, mean, color=colours[condition], linewidth=2,
                        label=LABELS.get(condition, condition))
            baseline = np.array([c[key]["random"]["value"] for c in results["runs"][name]["guided"].values()])
            if key == "structure":
                ax.plot(steps, baseline.mean(0), "k--", linewidth=1.2, label="random mask")
                ax.plot(steps, 2 * baseline.mean(0), "k:", linewidth=1, label="2 × random")
                ax.set_ylabel(spec["structure"])
            else:
                ax.axhline(spec["floor"], color="k", linestyle="--", linewidth=1.2,
                           label="floor without a leak")
                ax.set_ylim(0, 3 * spec["floor"])
                ax.set_ylabel(spec["leak"])
            what = "guided mask" if key == "structure" else f"leak check: below {spec['floor']:.3f} = leak"
            ax.set_title(f"{name} ({spec['data']}), {what}", fontsize=8)
            ax.set_xlabel("pretraining step")
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=7, ncol=2)
    fig.suptitle("guided masks on held-out data (thin: single seeds, thick: mean)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sma.mask_experiments",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True,
                        help="directory for mask_structure.json, .md and .png")
    parser.add_argument("--runs", type=Path, default=Path("/tmp/sma-mask-structure"),
                        help="run directories (a finished run is not repeated)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="seeds of every set (default: each set's own, see SETS)")
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--conditions", nargs="+", default=None, choices=list(CONDITIONS),
                        help="conditions of every set (default: each set's own, see SETS)")
    parser.add_argument("--finetune", action="store_true",
                        help="also fine-tune the final encoders of each set's finetune conditions, "
                             "and a fresh one, on the set's task (seeds 0, 1, 2)")
    parser.add_argument("--draws", type=int, default=2, help="masks per held-out example")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples")
    parser.add_argument("--backend", default="auto", help="sma_kernels backend of the first layer")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    results: dict = {"settings": {
        "sets": {name: {"data": SETS[name]["data"], "model": SETS[name]["model"].to_dict(),
                        "masking": SETS[name]["masking"].to_dict(),
                        "pretrain": asdict(SETS[name]["pretrain"]),
                        "structure": SETS[name]["structure"], "leak": SETS[name]["leak"],
                        "floor": SETS[name]["floor"],
                        "conditions": {c: CONDITIONS[c] for c in args.conditions or SETS[name]["conditions"]},
                        "seeds": list(args.seeds or SETS[name]["seeds"])} for name in args.sets},
        "heldout": "512 fresh generator examples (seed 1)", "draws": args.draws,
        "bootstrap_resamples": args.bootstrap, "finetune": asdict(FINETUNE) if args.finetune else None,
        "threads": 1, "backend": args.backend}, "runs": {}}
    for name in args.sets:
        results["runs"][name] = {}
        for condition in args.conditions or SETS[name]["conditions"]:
            results["runs"][name][condition] = {}
            for seed in args.seeds or SETS[name]["seeds"]:
                out = _pretrain(name, condition, seed, args.runs, args.backend)
                results["runs"][name][condition][f"s{seed}"] = _curves(out, name, args.backend,
                                                                       args.draws, args.bootstrap)
                print(f"{name} {condition} seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    if args.finetune:
        results["finetune"] = {}
        for name in args.sets:
            tuned = results["finetune"][name] = {}
            for condition in [*SETS[name]["finetune"], "none"]:
                tuned[condition] = {}
                for seed in FINETUNE_SEEDS:
                    init = None if condition == "none" else \
                        args.runs / name / condition / f"s{seed}" / "checkpoint.pt"
                    metrics = _finetune(name, init, seed, args.runs, condition, args.backend)
                    tuned[condition][f"s{seed}"] = metrics["eval"]["test"]["roc_auc"]
    results["summary"] = summarize(results)
    results["wall_s"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mask_structure.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "mask_structure.md").write_text(table(results) + "\n")
    plot(results, args.out / "mask_structure.png")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
