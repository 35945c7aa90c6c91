"""Tables and plots from result files (dicts as written by `run_eval`)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def results_table(results: list[dict], metric: str = "acc1") -> str:
    """Markdown table: one row per dataset, one column per (method, shots), chance beside."""
    cols = sorted({(r["method"], r["shots"]) for r in results})
    cells: dict[tuple, dict] = defaultdict(dict)
    chance = {}
    for r in results:
        cells[r["dataset"]][(r["method"], r["shots"])] = cells[r["dataset"]].get(
            (r["method"], r["shots"]), []) + [r["metrics"][metric]]
        chance[r["dataset"]] = r.get("chance_acc1", float("nan"))
    head = ["dataset", "classes", "chance"] + [f"{m}" + (f" {s}-shot" if s else "") for m, s in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ncls = {r["dataset"]: r.get("num_classes", "") for r in results}
    for ds in sorted(cells, key=_order_key):
        row = [ds, str(ncls[ds]), f"{100 * chance[ds]:.1f}"]
        for c in cols:
            v = cells[ds].get(c)
            row.append(f"{100 * sum(v) / len(v):.1f}" if v else "–")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _order_key(ds: str):
    name, _, domain = ds.partition("@")
    return (domain != "colour" and domain != "", name)


def bar_chart(results: list[dict], path: str | Path, metric: str = "acc1",
              title: str = "zero-shot acc1") -> Path:
    """Grouped bars: datasets on x, one bar per domain/method, chance as a tick."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    by_task: dict[str, dict[str, float]] = defaultdict(dict)
    chance: dict[str, float] = {}
    for r in results:
        task, _, domain = r["dataset"].partition("@")
        series = (domain or "default") + ("" if r["method"] == "zeroshot" else f" {r['method']}")
        by_task[task][series] = 100 * r["metrics"][metric]
        chance[task] = 100 * r.get("chance_acc1", 0.0)
    tasks = list(by_task)
    series = sorted({s for d in by_task.values() for s in d})
    x = np.arange(len(tasks))
    w = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(tasks) + 2), 4.2))
    for i, s in enumerate(series):
        ax.bar(x + i * w - 0.4 + w / 2, [by_task[t].get(s, 0) for t in tasks], w, label=s)
    ax.scatter(x, [chance[t] for t in tasks], marker="_", s=400, color="k", label="chance", zorder=3)
    ax.set_xticks(x, [t.replace("world:", "") for t in tasks], rotation=35, ha="right")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
