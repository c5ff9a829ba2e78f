"""Plots of one benchmark result (PNG, written next to its JSON).

* ``<stem>-time-vs-L.png``: forward time against L for each provider (the L sweep; log-log).
* ``<stem>-speedup.png``: mask, forward and forward+backward speed-up of each provider over the
  published eager algorithm, per workload (log scale; 1 = as fast as published).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def time_vs_length(result: dict[str, Any], path: Path) -> Path | None:
    """Forward time vs L per provider; None when the run has no L sweep."""
    cases = [case for case in result["cases"] if case["group"] == "sweep-L"]
    if not cases:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(dict.fromkeys(name for case in cases for name in case["providers"]))
    for name in names:
        points = [(case["case"]["tokens"], case["providers"][name]["times"]["fwd"]["median_ms"])
                  for case in cases
                  if "fwd" in case["providers"].get(name, {}).get("times", {})]
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
    base = cases[0]["case"]
    ax.set(xscale="log", yscale="log", xlabel="L (tokens)", ylabel="forward time (ms)",
           title=f"{result['device']['name']}: B={base['batch']}, H={base['heads']}, "
                 f"Q={base['queries']}, d={base['dim']}, dv={base['dim_v']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def speedup(result: dict[str, Any], path: Path) -> Path | None:
    """Bars of speed-up over the published algorithm; None when it was not timed."""
    cases = [case for case in result["cases"] if case["group"] == "workload"]
    metrics = {"mask": "mask only", "fwd": "forward", "fwdbwd": "forward + backward"}

    def value(case: dict[str, Any], name: str, metric: str) -> float:
        return case["providers"].get(name, {}).get("ratios", {}).get(
            f"{metric}_speedup_over_published", 0.0)

    names = [name for name in dict.fromkeys(n for case in cases for n in case["providers"])
             if name != "published" and any(value(c, name, m) for c in cases for m in metrics)]
    if not cases or not names:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(15, 4.5), sharey=True)
    width = 0.8 / len(names)
    for ax, (metric, title) in zip(axes, metrics.items()):
        for offset, name in enumerate(names):
            ax.bar([i + offset * width for i in range(len(cases))],
                   [value(case, name, metric) for case in cases], width, label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], [c["name"] for c in cases])
        ax.set(yscale="log", title=title)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[0].set_ylabel("speed-up over published eager (x)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{result['device']['name']} ({result['cases'][0]['dtype']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def make_plots(result: dict[str, Any], stem: Path) -> list[Path]:
    """Write every plot for ``result`` as ``<stem>-*.png``; returns the files written."""
    written = [time_vs_length(result, stem.with_name(stem.name + "-time-vs-L.png")),
               speedup(result, stem.with_name(stem.name + "-speedup.png"))]
    return [path for path in written if path is not None]
