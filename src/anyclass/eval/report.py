"""Tables and plots from result files: single runs (`run_eval`) and protocol sweeps
(`anyclass sweep`, one table per protocol in the layout its paper uses)."""
from __future__ import annotations

import csv
import io
import json
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from ..errors import AnyclassError
from .sweep import harmonic_mean


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
    return _save(fig, path)


# --------------------------------------------------------------------------- sweep tables
# Result files of `anyclass sweep` carry a "protocol"; each protocol has the table its papers
# print. Values are percentages: the mean over seeds, ± the (population, as CoOp's
# parse_test_res.py) standard deviation over seeds when there is more than one seed.

PROTOCOL_TITLES = {"fewshot": "Few-shot", "base2new": "Base-to-new generalisation",
                   "xd": "Cross-dataset transfer", "dg": "Domain generalisation"}


@dataclass
class Stat:
    """A table value in [0, 1]: `mean`, and `std` over `n` seeds (None: not a seed spread)."""
    mean: float
    std: float | None = None
    n: int = 1

    @classmethod
    def of(cls, values: list[float]) -> "Stat":
        m = sum(values) / len(values)
        std = math.sqrt(sum((v - m) ** 2 for v in values) / len(values))
        return cls(m, std, len(values))


@dataclass
class Table:
    protocol: str
    title: str
    index: list[str]                               # label column names
    columns: list[str]                             # value column names
    rows: list[tuple[list[str], list[Stat | None]]]

    def to_markdown(self) -> str:
        head = self.index + self.columns
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for labels, vals in self.rows:
            cells = [("–" if v is None else f"{100 * v.mean:.2f}"
                      + (f" ± {100 * v.std:.2f}" if v.std is not None and v.n > 1 else ""))
                     for v in vals]
            lines.append("| " + " | ".join(labels + cells) + " |")
        return "\n".join(lines)

    def to_csv(self) -> str:
        """Percentages; each value column followed by its std over seeds (empty if none)."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.index + [x for c in self.columns for x in (c, f"{c} std")])
        for labels, vals in self.rows:
            w.writerow(labels + [x for v in vals for x in (
                ("", "") if v is None else
                (f"{100 * v.mean:.4f}",
                 f"{100 * v.std:.4f}" if v.std is not None and v.n > 1 else ""))])
        return buf.getvalue()


def load_results(paths: list[str | Path]) -> list[dict]:
    """Result dicts from files and (recursively) folders. A file named explicitly must be a
    result; in folders, other JSON files are passed over and unreadable ones warned about."""
    out: list[dict] = []
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.rglob("*.json")):
                if any(part.startswith(".") for part in f.relative_to(p).parts):
                    continue                      # half-written temporaries, hidden files
                try:
                    r = json.loads(f.read_text(encoding="utf-8"))
                except (OSError, ValueError) as e:
                    warnings.warn(f"{f}: not a readable result file ({type(e).__name__}); "
                                  f"skipped", stacklevel=2)
                    continue
                if isinstance(r, dict) and "metrics" in r:
                    out.append(r)
        else:
            try:
                r = json.loads(p.read_text(encoding="utf-8"))
            except OSError as e:
                raise AnyclassError(f"{p}: cannot read ({e.strerror or e})") from None
            except ValueError:
                raise AnyclassError(f"{p}: not a JSON result file") from None
            if not isinstance(r, dict) or "metrics" not in r:
                raise AnyclassError(f"{p}: not a result file (no \"metrics\")")
            out.append(r)
    return out


def _labeller(results: list[dict]):
    """Row/column label of a result: the method, with backbone / hparams / templates added
    only where results of one protocol differ in them (so variants are not averaged)."""
    backbones = {r.get("backbone") for r in results}
    templates = {r.get("templates") for r in results}
    hp: dict[str, set] = defaultdict(set)
    for r in results:
        hp[r["method"]].add(json.dumps(r.get("hparams") or {}, sort_keys=True))

    def label(r: dict) -> str:
        s = r["method"]
        if len(hp[r["method"]]) > 1:
            h = r.get("hparams") or {}
            s += " " + (",".join(f"{k}={json.dumps(v)}" for k, v in sorted(h.items()))
                        or "defaults")
        if len(templates) > 1:
            s += f" templates={r.get('templates')}"
        if len(backbones) > 1:
            s += f" ({r.get('backbone')})"
        return s
    return label


def _short(spec: str) -> str:
    return spec.removeprefix("world:")


def _uniq(xs) -> list:
    return list(dict.fromkeys(xs))


def base2new_table(results: list[dict], metric: str = "acc1") -> Table:
    """CoCoOp's Table 1: per dataset Base, New, HM for each method; the Average row is the
    mean Base and mean New over datasets and the HM of those two means. A dataset's HM is
    the HM of its seed-mean Base and New (± the spread of the per-seed HMs)."""
    label = _labeller(results)
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in results:
        groups[(r["dataset"], label(r))].append(r)
    labels = _uniq(label(r) for r in results)
    datasets = sorted(_uniq(r["dataset"] for r in results), key=_order_key)
    rows = []
    sums: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for ds in datasets:
        vals: list[Stat | None] = []
        for lb in labels:
            g = groups.get((ds, lb))
            if not g:
                vals += [None, None, None]
                continue
            b = [r["metrics"][f"base_{metric}"] for r in g]
            n = [r["metrics"][f"new_{metric}"] for r in g]
            sb, sn = Stat.of(b), Stat.of(n)
            sh = Stat.of([harmonic_mean(x, y) for x, y in zip(b, n)])
            vals += [sb, sn, Stat(harmonic_mean(sb.mean, sn.mean), sh.std, sh.n)]
            sums[lb].append((sb.mean, sn.mean))
        rows.append(([_short(ds)], vals))
    avg: list[Stat | None] = []
    for lb in labels:
        mb = sum(b for b, _ in sums[lb]) / len(sums[lb])
        mn = sum(n for _, n in sums[lb]) / len(sums[lb])
        avg += [Stat(mb), Stat(mn), Stat(harmonic_mean(mb, mn))]
    rows.append((["Average"], avg))
    cols = [f"{lb} {x}" for lb in labels for x in ("Base", "New", "HM")]
    return Table("base2new", f"{PROTOCOL_TITLES['base2new']} ({metric}, %)", ["dataset"],
                 cols, rows)


def _fewshot_means(results: list[dict], metric: str):
    """{(dataset, label): {shots: Stat over seeds}}, labels, datasets, shots."""
    label = _labeller(results)
    vals: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        vals[(r["dataset"], label(r))][int(r["shots"])].append(r["metrics"][metric])
    stats = {k: {s: Stat.of(v) for s, v in d.items()} for k, d in vals.items()}
    labels = _uniq(label(r) for r in results)
    datasets = sorted(_uniq(r["dataset"] for r in results), key=_order_key)
    shots = sorted({int(r["shots"]) for r in results})
    return stats, labels, datasets, shots


def _fewshot_average(stats, datasets, lb: str, s: int) -> Stat | None:
    xs = [stats[(d, lb)][s].mean for d in datasets if s in stats.get((d, lb), {})]
    return Stat(sum(xs) / len(xs)) if xs else None


def fewshot_table(results: list[dict], metric: str = "acc1") -> Table:
    """Rows dataset × method, columns shots; then one Average row per method (the mean over
    datasets of the seed means). While a sweep is incomplete the Average takes only the
    datasets where every method has all its shot counts, and says how many, so that methods
    and shot counts are never averaged over different task sets."""
    stats, labels, datasets, shots = _fewshot_means(results, metric)
    rows = []
    for ds in datasets:
        for lb in labels:
            if (ds, lb) in stats:
                rows.append(([_short(ds), lb], [stats[(ds, lb)].get(s) for s in shots]))
    own = {lb: {s for (d, m), v in stats.items() if m == lb for s in v} for lb in labels}
    complete = [d for d in datasets
                if all(s in stats.get((d, lb), {}) for lb in labels for s in own[lb])]
    name = "Average" if len(complete) == len(datasets) else \
        f"Average ({len(complete)} of {len(datasets)} datasets with every cell)"
    for lb in labels:
        rows.append(([name, lb], [_fewshot_average(stats, complete, lb, s) for s in shots]))
    return Table("fewshot", f"{PROTOCOL_TITLES['fewshot']} ({metric}, %)",
                 ["dataset", "method"], [f"{s}-shot" for s in shots], rows)


def transfer_table(results: list[dict], protocol: str, metric: str = "acc1") -> Table:
    """xd (CoOp/CoCoOp Table 2) and dg (Table 3): rows method (per source), columns the
    source, each target, and the average over the targets (the source excluded)."""
    label = _labeller(results)
    vals: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for r in results:
        vals[(r["source"], label(r), r["target"])].append(r["metrics"][metric])
    sources = _uniq(r["source"] for r in results)
    targets = [t for t in sorted(_uniq(r["target"] for r in results), key=_order_key)
               if t not in sources]
    cols = sources + targets
    rows = []
    for src in sources:
        for lb in _uniq(label(r) for r in results if r["source"] == src):
            row = [Stat.of(vals[(src, lb, t)]) if vals.get((src, lb, t)) else None
                   for t in cols]
            tv = [v.mean for t, v in zip(cols, row) if t != src and t in targets and v]
            row.append(Stat(sum(tv) / len(tv)) if tv else None)
            rows.append(([_short(src), lb], row))
    return Table(protocol, f"{PROTOCOL_TITLES[protocol]} ({metric}, %)", ["source", "method"],
                 [_short(c) for c in cols] + ["Average"], rows)


def protocol_tables(results: list[dict], metric: str = "acc1") -> dict[str, Table]:
    """One table per protocol found among sweep results (others are ignored here)."""
    by: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        if r.get("protocol"):
            by[r["protocol"]].append(r)
    out = {}
    for p in ("fewshot", "base2new", "xd", "dg"):
        if by.get(p):
            out[p] = (fewshot_table(by[p], metric) if p == "fewshot" else
                      base2new_table(by[p], metric) if p == "base2new" else
                      transfer_table(by[p], p, metric))
    unknown = sorted(set(by) - set(out))
    if unknown:
        warnings.warn(f"results of unknown protocol {unknown[0]!r} skipped", stacklevel=2)
    return out


def fewshot_plot(results: list[dict], path: str | Path, metric: str = "acc1") -> Path:
    """CoOp's Figure 3: mean `metric` vs shots per method, the average over datasets first
    and then one panel per dataset; methods without training are a star at 0 shots and a
    dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in results if r.get("protocol") == "fewshot"]
    stats, labels, datasets, shots = _fewshot_means(results, metric)
    pos = {s: i for i, s in enumerate(shots)}        # evenly spaced, as in CoOp's figure
    panels = ["Average"] + (datasets if len(datasets) > 1 else [])
    ncol = min(4, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 3.0 * nrow), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes.flat, panels):
        for i, lb in enumerate(labels):
            if panel == "Average":
                pts = [(s, a.mean) for s in shots
                       if (a := _fewshot_average(stats, datasets, lb, s)) is not None]
            else:
                pts = [(s, v.mean) for s, v in sorted(stats.get((panel, lb), {}).items())]
            if not pts:
                continue
            c = colors[i % len(colors)]
            if [s for s, _ in pts] == [0]:
                ax.axhline(100 * pts[0][1], color=c, ls="--", lw=1)
                ax.plot([pos[0]], [100 * pts[0][1]], "*", ms=11, color=c, label=lb)
            else:
                ax.plot([pos[s] for s, _ in pts], [100 * v for _, v in pts], "o-",
                        color=c, label=lb)
        ax.set_xticks(range(len(shots)), [str(s) for s in shots])
        ax.set_title(_short(panel), fontsize=10)
        ax.set_xlabel("shots per class")
        ax.set_ylabel(f"{metric} (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: list[dict], out: str | Path, metric: str = "acc1") -> list[Path]:
    """table_<protocol>.md and .csv per protocol, plot_fewshot.png; single-run results
    (`anyclass eval`) as table_eval.md and plot_eval.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for p, t in protocol_tables(results, metric).items():
        (out / f"table_{p}.md").write_text(f"## {t.title}\n\n{t.to_markdown()}\n")
        (out / f"table_{p}.csv").write_text(t.to_csv())
        written += [out / f"table_{p}.md", out / f"table_{p}.csv"]
        if p == "fewshot":
            written.append(fewshot_plot(results, out / "plot_fewshot.png", metric))
    single = [r for r in results if not r.get("protocol")]
    if single:
        (out / "table_eval.md").write_text(results_table(single, metric) + "\n")
        written += [out / "table_eval.md", bar_chart(single, out / "plot_eval.png", metric)]
    return written
