"""Guided masking vs its EMA-teacher variant vs random masking vs no pretraining, per domain.

    python -m sma.experiments --out runs/experiments --seeds 0 1 2 --workers 2

For each domain and seed: pretrain one encoder with guided masking, one whose guided mask is
chosen by an EMA teacher (``teacher_ema`` = 0.999) and one with random masking (same op, eta = 1)
on the domain's unlabelled corpus, then fine-tune each, and a freshly initialised encoder
("none"), on every task of the domain with identical settings. The test metric is read after the
last fine-tuning step (no model selection). Each pretrained encoder's masks are also measured on
held-out data of its domain (:mod:`sma.mask_structure`: its guided mask against a random mask of
the same size). Writes ``experiments.json`` (settings, every run, the summary),
``experiments.png`` and ``experiments.md`` (the markdown tables) to ``--out``; the run
directories (checkpoints, per-run metrics) go to ``--runs``, and a run whose ``metrics.json``
exists there is not repeated.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

import sma_kernels
from sma_kernels.backends import resolve

from . import data as datasets
from . import mask_structure
from .masking import MaskingConfig
from .model import ModelConfig, SMAPredictor
from .train import METRICS, TrainConfig, finetune, pretrain, setup

CONDITIONS = ("guided", "teacher", "random", "none")
LABELS = {"guided": "guided", "teacher": "teacher 0.999", "random": "random",
          "none": "no pretraining"}
TEACHER_EMA = 0.999  # the decay that kept the planted pairs in every seed ("What the mask learns")
MODEL = {"width": 64, "depth": 2, "heads": 4, "latents": 32, "widening": 2}
# Masking settings follow the paper's per-domain ones (python/sma/README.md, "Experiment"):
# molecules and jets use the self-attention encoder with random head mix and mask_self (jets:
# curriculum over the first 25 % of steps, like HIGGS); proteins the cross-attention encoder with
# head mean.
DOMAINS = {
    "molecules": {
        "corpus": "molecules", "encoder": "self",
        "masking": MaskingConfig("guided", 0.3, 3, "random", True, 0.0),
        "pretrain": TrainConfig(steps=500, batch_size=64, lr=5e-4, warmup=50),
        "tasks": {"freesolv": TrainConfig(steps=300, batch_size=32, lr=5e-4, warmup=30,
                                          weight_decay=1e-3),
                  "solubility": TrainConfig(steps=300, batch_size=32, lr=5e-4, warmup=30,
                                            weight_decay=1e-3)}},
    "proteins": {
        "corpus": "proteins", "encoder": "cross",
        "masking": MaskingConfig("guided", 0.15, 4, "mean", False, 0.0),
        "pretrain": TrainConfig(steps=500, batch_size=64, lr=5e-4, warmup=50),
        "tasks": {"amp": TrainConfig(steps=300, batch_size=64, lr=5e-4, warmup=30)}},
    "jets": {
        "corpus": "jets", "encoder": "self",
        "masking": MaskingConfig("guided", 0.2, 3, "random", True, 0.25),
        "pretrain": TrainConfig(steps=600, batch_size=128, lr=5e-4, warmup=60),
        "tasks": {"jets-1k": TrainConfig(steps=200, batch_size=64, lr=5e-4, warmup=20),
                  "jets-10k": TrainConfig(steps=400, batch_size=128, lr=5e-4, warmup=40)}},
}
# The structure metric of each domain shown in the table (every metric of the domain is saved).
STRUCTURE = {"molecules": "ring_branch_share", "proteins": "run_length", "jets": "comasked_corr"}
HELDOUT = {"examples": 512, "draws": 2, "resamples": 1000}


@functools.cache
def _corpus(name: str) -> datasets.TokenSet:
    return datasets.load_corpus(name)


@functools.cache
def _task(name: str) -> datasets.Task:
    return datasets.load_task(name)


def _model_config(domain: str, corpus: datasets.TokenSet) -> ModelConfig:
    max_len = corpus.length if corpus.kind == "features" else datasets.MAX_LEN
    return ModelConfig(input_kind=corpus.kind, max_len=max_len, encoder=DOMAINS[domain]["encoder"],
                       **MODEL)


def _scaled(config: TrainConfig, scale: float, seed: int) -> TrainConfig:
    steps = max(4, round(config.steps * scale))
    return replace(config, steps=steps, warmup=max(1, round(config.warmup * scale)), seed=seed)


def _cached(out_dir: Path, run: Callable[..., dict], *args: object, **kwargs: object) -> dict:
    """The metrics of the run in ``out_dir``: read back if it finished before, else run it."""
    path = out_dir / METRICS
    if path.exists():
        return json.loads(path.read_text())
    return run(*args, **kwargs)


def masking_for(domain: str, condition: str) -> MaskingConfig:
    """The pretraining masking of ``condition`` ("guided", "teacher" or "random") in ``domain``."""
    base = DOMAINS[domain]["masking"]
    if condition == "teacher":
        return replace(base, teacher_ema=TEACHER_EMA)
    return replace(base, strategy=condition)


def _structure(checkpoint: Path, corpus: str, backend: str) -> dict:
    """Every structure metric of the pretrained encoder's masks on its domain's held-out data,
    written next to the checkpoint and read back from there."""
    path = checkpoint.parent / "structure.json"
    if path.exists():
        return json.loads(path.read_text())
    result = mask_structure.analyze_checkpoints(
        [checkpoint], corpus, count=HELDOUT["examples"], draws=HELDOUT["draws"],
        resamples=HELDOUT["resamples"], backend=backend)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def run_unit(unit: tuple[str, str, int, Path, float, str]) -> list[dict]:
    """Pretrain (unless "none"), measure the masks and fine-tune every task of one (domain,
    condition, seed)."""
    domain, condition, seed, runs, scale, backend = unit
    torch.set_num_threads(1)
    spec = DOMAINS[domain]
    dist = setup("cpu")
    corpus = _corpus(spec["corpus"])
    model_config = _model_config(domain, corpus)
    root = runs / domain / condition / f"seed{seed}"
    init, pre, structure = None, None, None
    if condition != "none":
        pre = _cached(root / "pretrain", pretrain, corpus, spec["corpus"], model_config,
                      masking_for(domain, condition), _scaled(spec["pretrain"], scale, seed),
                      root / "pretrain", dist=dist, backend=backend, progress=False)
        init = root / "pretrain" / "checkpoint.pt"
        structure = _structure(init, spec["corpus"], backend)["records"][0]["metrics"]
    results = []
    for task_name, config in spec["tasks"].items():
        task = _task(task_name)
        out = _cached(root / task_name, finetune, task, _scaled(config, scale, seed),
                      root / task_name, dist=dist, init=init, model_config=model_config,
                      backend=backend, progress=False)
        results.append({
            "domain": domain, "task": task_name, "condition": condition, "seed": seed,
            "metric": task.metric, "test": out["eval"]["test"][task.metric],
            "valid": out["eval"]["valid"][task.metric], "finetune_wall_s": out["wall_s"],
            "pretrain_final_loss": None if pre is None else pre["final_loss"],
            "pretrain_wall_s": None if pre is None else pre["wall_s"],
            "structure": structure})
    return results


def _mean_std(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)),
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, "values": values}


def summarize(results: list[dict]) -> list[dict]:
    """Mean and (sample) std of the test metric per task and condition."""
    rows = []
    for domain, spec in DOMAINS.items():
        for task in spec["tasks"]:
            row = {"domain": domain, "task": task}
            for condition in CONDITIONS:
                values = [r["test"] for r in results if r["task"] == task and r["condition"] == condition]
                if values:
                    row["metric"] = next(r["metric"] for r in results if r["task"] == task)
                    row[condition] = _mean_std(values)
            if "metric" in row:
                rows.append(row)
    return rows


def summarize_structure(results: list[dict]) -> list[dict]:
    """Per domain and pretrained condition, over seeds: the table's structure metric of the
    encoder's guided mask, of a random mask of the same size, their ratio, the share of seeds
    whose ratio's 95 % interval lies above 1, and the masked-token loss; plus pretraining wall time."""
    rows = []
    for domain in DOMAINS:
        name = STRUCTURE[domain]
        for condition in CONDITIONS[:-1]:
            # One record per seed: every task of a (domain, condition, seed) shares its pretraining.
            seeds = {r["seed"]: r for r in results
                     if r["domain"] == domain and r["condition"] == condition}
            if not seeds:
                continue
            runs = [seeds[s] for s in sorted(seeds)]
            entries = [r["structure"][name] for r in runs]
            rows.append({
                "domain": domain, "condition": condition, "metric": name,
                "guided": _mean_std([e["guided"]["value"] for e in entries]),
                "random": _mean_std([e["random"]["value"] for e in entries]),
                "ratio": _mean_std([e["ratio"]["value"] for e in entries]),
                "above_random": sum(e["ratio"]["ci95"][0] > 1 for e in entries),
                "masked_loss": _mean_std([r["structure"]["masked_loss"]["guided"]["value"]
                                          for r in runs]),
                "pretrain_wall_s": _mean_std([r["pretrain_wall_s"] for r in runs])})
    return rows


def markdown(rows: list[dict], structure: list[dict]) -> str:
    """The downstream table, then the mask-structure table."""
    lines = ["| domain | task (metric) | " + " | ".join(LABELS[c] for c in CONDITIONS)
             + " | guided − random | teacher − random |",
             "|---|---|" + "---|" * (len(CONDITIONS) + 2)]
    for row in rows:
        arrow = "↓" if row["metric"] == "rmse" else "↑"
        cells = [f"{row[c]['mean']:.3f} ± {row[c]['std']:.3f}" if c in row else "–" for c in CONDITIONS]
        diffs = [f"{row[c]['mean'] - row['random']['mean']:+.3f}" if c in row and "random" in row
                 else "–" for c in ("guided", "teacher")]
        lines.append(f"| {row['domain']} | {row['task']} ({row['metric']} {arrow}) | "
                     + " | ".join(cells + diffs) + " |")
    lines += ["", ("| domain | structure metric | pretrained with | its guided mask | random mask "
                   "| ratio | seeds with ratio CI > 1 | masked-token loss | pretraining wall (s) |"),
              "|---|---|---|---|---|---|---|---|---|"]
    for row in structure:
        def cell(stats: dict, digits: int = 3) -> str:
            return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"
        lines.append(f"| {row['domain']} | {row['metric']} | {LABELS[row['condition']]} | "
                     f"{cell(row['guided'])} | {cell(row['random'])} | {cell(row['ratio'], 2)} | "
                     f"{row['above_random']} of {len(row['ratio']['values'])} | "
                     f"{cell(row['masked_loss'])} | {row['pretrain_wall_s']['mean']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, subtitle: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colours = {"guided": "#e6550d", "teacher": "#31a354", "random": "#6baed6", "none": "#969696"}
    fig, axes = plt.subplots(1, len(rows), figsize=(3.0 * len(rows), 3.2))
    for ax, row in zip(np.atleast_1d(axes), rows, strict=True):
        for i, condition in enumerate(CONDITIONS):
            if condition not in row:
                continue
            stats = row[condition]
            ax.bar(i, stats["mean"], yerr=stats["std"], color=colours[condition], capsize=3)
            ax.scatter([i] * len(stats["values"]), stats["values"], color="black", s=8, zorder=3)
        means = [row[c]["mean"] for c in CONDITIONS if c in row]
        spread = max(max(means) - min(means), 0.02)
        ax.set_ylim(min(means) - 2 * spread, max(means) + 2 * spread)
        ax.set_xticks(range(len(CONDITIONS)), ["guided", "teacher", "random", "none"], fontsize=7)
        ax.set_title(f"{row['task']}\n{row['metric']} {'(lower better)' if row['metric'] == 'rmse' else '(higher better)'}",
                     fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(subtitle, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sma.experiments", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/experiments"),
                        help="where the results go (the committed ones: python/results)")
    parser.add_argument("--runs", type=Path, default=Path("/tmp/sma-experiments"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=list(DOMAINS))
    parser.add_argument("--workers", type=int, default=2, help="parallel processes, 1 thread each")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step count")
    parser.add_argument("--backend", default="auto", choices=("auto", *sma_kernels.backends()),
                        help="sma_kernels backend of the first layer")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    units = [(domain, condition, seed, args.runs, args.scale, args.backend)
             for seed in args.seeds for domain in args.domains for condition in CONDITIONS]
    results: list[dict] = []
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        for done in pool.imap_unordered(run_unit, units):
            results += done
            print(f"[{time.perf_counter() - start:7.1f} s] {done[0]['domain']} {done[0]['condition']} "
                  f"seed {done[0]['seed']}: " + ", ".join(f"{r['task']} {r['test']:.3f}" for r in done),
                  flush=True)
    wall = time.perf_counter() - start
    rows = summarize(results)
    structure = summarize_structure(results)
    table = markdown(rows, structure)
    sizes = {d: len(_corpus(spec["corpus"])) for d, spec in DOMAINS.items() if d in args.domains}
    params = {d: sum(p.numel() for p in
                     SMAPredictor(_model_config(d, _corpus(DOMAINS[d]["corpus"]))).encoder.parameters())
              for d in args.domains}
    report = {
        "wall_s": wall, "workers": args.workers, "threads_per_worker": 1, "seeds": args.seeds,
        "backend": resolve(args.backend, torch.device("cpu"), torch.float32),
        "teacher_ema": TEACHER_EMA,
        "heldout": HELDOUT, "structure_metric": STRUCTURE,
        "scale": args.scale, "model": MODEL, "encoder_parameters": params,
        "pretrain_corpus_sizes": sizes,
        "domains": {d: {"corpus": s["corpus"], "encoder": s["encoder"],
                        "masking": s["masking"].to_dict(), "pretrain": asdict(s["pretrain"]),
                        "tasks": {t: asdict(c) for t, c in s["tasks"].items()}}
                    for d, s in DOMAINS.items() if d in args.domains},
        "summary": rows, "structure": structure, "runs": sorted(results, key=lambda r: (r["task"], r["condition"], r["seed"]))}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "experiments.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "experiments.md").write_text(table + "\n")
    plot(rows, args.out / "experiments.png",
         f"mean ± std over seeds {args.seeds} (dots: single seeds); wall {wall / 60:.1f} min")
    print(table)
    print(f"wall time {wall:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
