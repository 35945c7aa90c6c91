"""Start-up of anyclass before and after the fast-start work (issue 12, part 2), as ratios
measured in one run on one machine (absolute seconds on a shared machine are noise).

Targets: a second identical `anyclass eval` >= 20x faster than the first at 1,000 images of
openclip ViT-B-32 (random weights: same cost as trained ones); a cached built-in eval's wall
time <= 2x `python -c "import torch"`; `anyclass --help` and `anyclass world tasks` <= 1.5x
`python -c "import torch"`.

"Before" is the code of a git revision (default HEAD), exported with `git archive` and put
first on PYTHONPATH; "after" is the working tree. Both run in a private $ANYCLASS_HOME whose
`world` links to the normal one (the world is reused, never rebuilt; no card, hash memo,
text classifier or feature entry exists at the start), deleted at the end. Each dataset is a
fresh folder of copies (a feature-cache key never seen before); its first run (extraction)
is measured once, with the "after" code — extraction is the same code path in both, and the
first run is all extraction — and its second run with both codes, on the same cache entry,
`--repeats` times, interleaved with the baselines; medians are reported.

    python benchmarks/startup.py [--sizes 1000 3000] [--builtin-n 2400] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_jpegs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def wall(cmd: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - t


def export_revision(rev: str, dest: Path) -> Path:
    """The package source of `rev` under dest/src (git archive: no change to the repo)."""
    dest.mkdir(parents=True, exist_ok=True)
    tar = subprocess.run(["git", "-C", str(REPO), "archive", rev, "src"], check=True,
                         capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=tar, check=True)
    return dest / "src"


def private_home(tmp: Path) -> Path:
    """A fresh $ANYCLASS_HOME sharing only the built world with the normal one."""
    from anyclass.paths import home
    h = tmp / "home"
    h.mkdir()
    (h / "world").symlink_to(home() / "world", target_is_directory=True)
    return h


def builtin_folder(dst: Path, n: int) -> Path:
    """n images of the world's `source` task (its test split), one folder per class."""
    from anyclass.data.sources import load_dataset
    ds = load_dataset("world:source", "test")
    if len(ds) < n:
        raise SystemExit(f"world:source has {len(ds)} test images, asked for {n}")
    for p, y in list(zip(ds.paths, ds.labels))[:n]:
        d = dst / ds.classnames[y].replace("/", " ")
        d.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, d / Path(p).name)
    return dst


def jpeg_folder(dst: Path, n: int, cache: Path) -> Path:
    """n photo-sized JPEGs in two classes (fresh copies: new mtimes, new cache key)."""
    for i, p in enumerate(write_jpegs(cache, n)):
        d = dst / ("class a" if i % 2 else "class b")
        d.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, d / Path(p).name)
    return dst


def eval_cmd(folder: Path, backbone: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "anyclass.cli.main", "eval", "--dataset", f"folder:{folder}",
            "--backbone", backbone, "--out", str(out)]


def med(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


def markdown(table: dict) -> str:
    """The before/after table as markdown rows (one row per measured quantity)."""
    rows = ["| | before | after |", "|---|---|---|"]
    for k in table["after"]:
        rows.append(f"| {k} | {table['before'][k]} | {table['after'][k]} |")
    return "\n".join(rows + [f"\n`python -c \"import torch\"`: {table['import torch s']} s"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000])
    ap.add_argument("--backbone", default="openclip:ViT-B-32@random")
    ap.add_argument("--builtin-n", type=int, default=2400)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--before", default="HEAD", help="git revision of the 'before' code")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="anyclass-startup-"))
    try:
        home = private_home(tmp)
        base = {**os.environ, "ANYCLASS_HOME": str(home)}
        old_src = export_revision(a.before, tmp / "before")
        envs = {"after": base, "before": {**base, "PYTHONPATH": str(old_src)}}
        py = sys.executable
        cli = [py, "-m", "anyclass.cli.main"]

        # datasets and their first runs (after code), then the cached commands
        runs: dict[str, dict] = {}
        sets = [("builtin", "builtin", builtin_folder(tmp / "builtin", a.builtin_n),
                 a.builtin_n)]
        for n in a.sizes:
            sets.append((f"vit-b-32@{n}", a.backbone,
                         jpeg_folder(tmp / f"jpeg{n}", n, Path(tempfile.gettempdir())
                                     / "anyclass-bench-jpeg500x375"), n))
        for name, bb, folder, n in sets:
            out = tmp / f"{name}.first.json"
            first = wall(eval_cmd(folder, bb, out), envs["after"])
            runs[name] = {"images": n, "backbone": bb, "first_s": round(first, 2),
                          "metrics": json.loads(out.read_text())["metrics"],
                          "second": {"after": [], "before": []}}
            print(f"{name}: first run {first:.1f} s", file=sys.stderr, flush=True)

        timings: dict[str, list[float]] = {k: [] for k in (
            "import torch", "help after", "help before", "world tasks after",
            "world tasks before")}
        for r in range(a.repeats):
            timings["import torch"].append(wall([py, "-c", "import torch"], base))
            for which in (("after", "before") if r % 2 == 0 else ("before", "after")):
                timings[f"help {which}"].append(wall([*cli, "--help"], envs[which]))
                timings[f"world tasks {which}"].append(
                    wall([*cli, "world", "tasks"], envs[which]))
                for name, bb, folder, n in sets:
                    out = tmp / f"{name}.{which}.json"
                    runs[name]["second"][which].append(
                        wall(eval_cmd(folder, bb, out), envs[which]))
                    if json.loads(out.read_text())["metrics"] != runs[name]["metrics"]:
                        raise SystemExit(f"{name}: the cached run ({which}) gave other metrics")
            print(f"repeat {r + 1}/{a.repeats} done", file=sys.stderr, flush=True)

        torch_s = med(timings["import torch"])
        table = {"import torch s": torch_s}
        for which in ("before", "after"):
            row: dict[str, float] = {
                "help / import torch": round(med(timings[f"help {which}"]) / torch_s, 2),
                "world tasks / import torch": round(
                    med(timings[f"world tasks {which}"]) / torch_s, 2)}
            for name, r_ in runs.items():
                second = med(r_["second"][which])
                row[f"{name} second s"] = second
                row[f"{name} first / second"] = round(r_["first_s"] / second, 1)
                row[f"{name} second / import torch"] = round(second / torch_s, 2)
            table[which] = row
        print(markdown(table), file=sys.stderr)
        print(json.dumps({"table": table,
                          "first_runs_s": {k: v["first_s"] for k, v in runs.items()},
                          "raw_s": {**{k: [round(x, 2) for x in v] for k, v in timings.items()},
                                    **{f"{k} second {w}": [round(x, 2) for x in v["second"][w]]
                                       for k, v in runs.items() for w in ("before", "after")}},
                          "same_metrics": True, "before": a.before,
                          "machine": machine()}, indent=1))
    finally:
        world_link = tmp / "home" / "world"
        if world_link.is_symlink():
            world_link.unlink()                  # never follow it into the real world
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
