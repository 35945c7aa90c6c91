"""The `anyclass` command: parses, calls the library, prints. No logic of its own."""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from ..errors import AnyclassError


def _warning_line(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def _hparams(pairs: list[str]) -> dict:
    out = {}
    for p in pairs or []:
        k, sep, v = p.partition("=")
        if not sep:
            raise AnyclassError(f"--hparam expects KEY=VALUE, got {p!r}")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def cmd_classify(a) -> int:
    from ..backbones.factory import create_backbone
    from ..data.classnames import parse_classes, read_classes_file
    from ..eval.classify import classify, expand_inputs
    if a.classes is not None and a.classes_file is not None:
        raise AnyclassError("give the class names with only one of --classes or --classes-file")
    if a.classes is None and a.classes_file is None:
        if not a.prompts:
            raise AnyclassError("give the class names with --classes or --classes-file")
        from ..methods.prompted import read_prompt_file
        classes = json.loads(read_prompt_file(a.prompts)[1]["classnames"])  # the file's own
    else:
        classes = read_classes_file(a.classes_file) if a.classes_file else parse_classes(a.classes)
    paths = expand_inputs(a.images)
    if not paths:
        raise AnyclassError("no images given")
    rows = classify(paths, classes, create_backbone(a.backbone, a.device), a.templates, a.top_k,
                    method=a.method, hub=a.hub, prompts=a.prompts, new_classes=a.new_classes)
    if a.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            tops = ", ".join(f"{t['class']} {t['score']:.3f}" for t in r["top"])
            print(f"{r['image']}: {tops}")
    return 0


def cmd_eval(a) -> int:
    from ..eval.runner import EvalConfig, run_eval, write_json
    hparams = _hparams(a.hparam)
    for flag, key in ((a.init, "init"), (a.tta_stats, "stats")):   # test-time tuning
        if flag is not None:
            hparams[key] = flag
    cfg = EvalConfig(dataset=a.dataset, backbone=a.backbone, method=a.method,
                     templates=a.templates, cupl=a.cupl, cupl_mode=a.cupl_mode, shots=a.shots,
                     seed=a.seed, split=a.split, hparams=hparams,
                     batch_size=a.batch_size, num_workers=a.workers, device=a.device,
                     pool=a.pool, support_per_class=a.support_per_class,
                     support_strategy=a.support_strategy, support_prompts=a.support_prompts,
                     generator=a.generator, save_prompts=a.save_prompts)
    res = run_eval(cfg)
    m = res["metrics"]
    print(f"{res['dataset']} {res['method']} shots={res['shots']} seed={res['seed']}: "
          f"acc1 {100 * m['acc1']:.2f}  acc5 {100 * m['acc5']:.2f}  "
          f"mean_per_class_recall {100 * m['mean_per_class_recall']:.2f}")
    if a.out:
        print(f"wrote {write_json(res, a.out)}")
    return 0


def cmd_world(a) -> int:
    from ..world.build import describe_tasks, ensure_world
    from ..world.config import get_config
    world = ensure_world(get_config(a.config), progress=True)
    if a.world_cmd == "build":
        print(f"world ready at {world.root}")
    elif a.world_cmd == "artefacts":
        from ..world.artefacts import ARTEFACT_ROOT
        from ..world.export import export
        m = export(world, a.out or ARTEFACT_ROOT)
        print(f"wrote {a.out or ARTEFACT_ROOT}: model {m['model']['key']}, "
              f"{len(m['experts']['experts'])} experts {m['experts']['key']}")
    else:
        print("\n".join(describe_tasks(world)))
    return 0


def cmd_report(a) -> int:
    from ..eval.report import (bar_chart, load_results, protocol_tables, results_table,
                               write_report)
    results = load_results(a.results)
    if not results:
        raise AnyclassError("no result files found in " + ", ".join(a.results))
    single = [r for r in results if not r.get("protocol")]
    tables = protocol_tables(results, a.metric)
    print("\n\n".join(([results_table(single, a.metric)] if single else [])
                      + [f"## {t.title}\n\n{t.to_markdown()}" for t in tables.values()]))
    if a.plot:
        if not single:
            raise AnyclassError("--plot draws single-run results; a sweep's plots are "
                                "written with --out DIR")
        print(f"wrote {bar_chart(single, a.plot, a.metric)}")
    if a.out:
        for p in write_report(results, a.out, a.metric):
            print(f"wrote {p}")
    return 0


def cmd_sweep(a) -> int:
    from ..eval.protocols import expand, load_grid_file, make_grid, parse_hparam_flags
    from ..eval.sweep import run_sweep
    grid = make_grid(load_grid_file(a.config) if a.config else None,
                     protocol=a.protocol, methods=a.methods, datasets=a.datasets,
                     seeds=a.seeds, shots=a.shots, backbone=a.backbone,
                     templates=a.templates, source=a.source,
                     hparams=parse_hparam_flags(a.hparam))
    cells = expand(grid)
    out = Path(a.out or f"runs/sweep-{grid.protocol}")
    if a.dry_run:
        for c in cells:
            print(f"{c.name}  ->  {out / c.relpath()}")
        print(f"{len(cells)} cells")
        return 0
    summary = run_sweep(cells, out, workers=a.workers, ray=a.ray, device=a.device)
    if summary.failed:
        print(f"error: {len(summary.failed)} cells failed", file=sys.stderr)
        return 1
    return 0


def cmd_demo(a) -> int:
    from ..eval.demo import run_demo
    print(f"wrote {run_demo(Path(a.out), backbone=a.backbone)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="anyclass", description=__doc__.splitlines()[0]
                                if __doc__ else None)
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("classify", help="top-k class names for images or folders of images")
    c.add_argument("images", nargs="+")
    c.add_argument("--classes", help='comma-separated class names, e.g. "cat,dog,car"')
    c.add_argument("--classes-file", help="UTF-8 file, one class name per line")
    c.add_argument("--backbone", default="builtin")
    c.add_argument("--templates", default="single")
    c.add_argument("--top-k", type=int, default=5)
    c.add_argument("--method", choices=["zeroshot", "hub"], default="zeroshot",
                   help="hub: expert heads selected from the hub (backbone = fallback)")
    c.add_argument("--hub", help="hub file for --method hub (default: the offline world's)")
    c.add_argument("--prompts", help="learned-prompt file (.safetensors from anyclass eval "
                   "--save-prompts); classes default to the ones it was learned for")
    c.add_argument("--new-classes", action="store_true",
                   help="with --prompts: apply the learned prompts to other class names")
    c.add_argument("--json", action="store_true")
    c.add_argument("--device")
    c.set_defaults(fn=cmd_classify)

    e = sub.add_parser("eval", help="evaluate a method on a dataset, write a result JSON")
    e.add_argument("--dataset", required=True, help="world:TASK[@DOMAIN] (colour, sketch, rendition, v2, adversarial), folder:DIR, "
                   "csv:FILE, coop:NAME@ROOT")
    e.add_argument("--method", default="zeroshot")
    e.add_argument("--backbone", default="builtin")
    e.add_argument("--templates", default="single",
                   help="single, ensemble7, openai80, dataset, or a file")
    e.add_argument("--cupl", help="CuPL descriptions JSON {class: [sentences]}")
    e.add_argument("--cupl-mode", choices=["plus", "alone"], default="plus")
    e.add_argument("--shots", type=int, default=0)
    e.add_argument("--seed", type=int, default=1)
    e.add_argument("--split", default="test")
    e.add_argument("--hparam", action="append", metavar="KEY=VALUE")
    e.add_argument("--batch-size", type=int, default=128)
    e.add_argument("--workers", type=int, default=None)
    e.add_argument("--device")
    e.add_argument("--out", help="result JSON path")
    e.add_argument("--save-prompts", metavar="PATH",
                   help="prompt-learning methods: write the learned state (.safetensors) there "
                   "(reused if it exists); `classify --prompts PATH` applies it")
    e.add_argument("--init", metavar="PROMPTS", help="test-time tuning (tpt, promptalign, "
                   "promptsync): start from this CoOp/MaPLe prompt file (world: a cached "
                   "source-trained MaPLe by default for promptalign/promptsync)")
    e.add_argument("--tta-stats", metavar="FILE", help="promptalign/promptsync: source statistics "
                   "from `anyclass tta stats` (world: computed and cached by default)")
    e.add_argument("--pool", help="support-set methods (sus-x): image pool spec, folder:DIR, "
                   "list:FILE, wds:SHARDS or world:pool (default for world: datasets)")
    e.add_argument("--support-per-class", type=int, default=16)
    e.add_argument("--support-strategy", choices=["retrieval", "generation"], default="retrieval")
    e.add_argument("--support-prompts", choices=["photo", "cupl"], default="photo")
    e.add_argument("--generator", help="local diffusers model folder (--support-strategy generation)")
    e.set_defaults(fn=cmd_eval)

    w = sub.add_parser("world", help="the offline world: build it, list its tasks")
    wsub = w.add_subparsers(dest="world_cmd", required=True)
    for name, what in (("build", "build the world (shipped weights where they match)"),
                       ("tasks", "list the tasks"),
                       ("artefacts", "train what is missing and write the shipped artefacts")):
        x = wsub.add_parser(name, help=what)
        x.add_argument("--config", default=None, help="full or mini (default: $ANYCLASS_WORLD or full)")
        if name == "artefacts":
            x.add_argument("--out", type=Path, default=None,
                           help="folder to write (default: the package's resources/world)")
        x.set_defaults(fn=cmd_world)

    r = sub.add_parser("report", help="tables (markdown, CSV) and plots from result JSON "
                       "files or folders of them (single runs and sweeps)")
    r.add_argument("results", nargs="+", help="result JSON files or folders (recursive)")
    r.add_argument("--metric", default="acc1", help="acc1, acc5 or mean_per_class_recall")
    r.add_argument("--plot", help="PNG path for a bar chart of single-run results")
    r.add_argument("--out", help="folder for table_<protocol>.md/.csv and plots")
    r.set_defaults(fn=cmd_report)

    sw = sub.add_parser("sweep", help="run a protocol (fewshot, base2new, xd, dg) as one "
                        "resumable sweep of result files")
    sw.add_argument("--config", help="YAML grid file (keys: protocol, methods, datasets, seeds, "
                    "shots, backbone, hparams, templates, source); flags override it")
    sw.add_argument("--protocol", help="fewshot, base2new, xd or dg")
    sw.add_argument("--methods", help="comma-separated method names")
    sw.add_argument("--datasets", help="comma-separated dataset specs (xd/dg: the targets; "
                    "default xd: every world task but the source, dg: the source in every "
                    "shifted domain)")
    sw.add_argument("--seeds", help="comma-separated (default 1,2,3)")
    sw.add_argument("--shots", help="comma-separated (default fewshot 1,2,4,8,16, others 16)")
    sw.add_argument("--backbone", help="backbone spec (default builtin)")
    sw.add_argument("--templates", help="prompt templates (default single)")
    sw.add_argument("--source", help="xd/dg training dataset (default world:source)")
    sw.add_argument("--hparam", action="append", metavar="METHOD.NAME=VALUE")
    sw.add_argument("--out", help="result folder (default runs/sweep-<protocol>)")
    sw.add_argument("--workers", type=int, default=1,
                    help="local worker processes (default 1: in this process)")
    sw.add_argument("--ray", metavar="auto|local|ADDRESS",
                    help="run cells as Ray tasks on a cluster (auto: the running one; local: "
                    "start one here)")
    sw.add_argument("--device")
    sw.add_argument("--dry-run", action="store_true", help="list the cells and their files")
    sw.set_defaults(fn=cmd_sweep)

    d = sub.add_parser("demo", help="build the world, classify samples, evaluate every task")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--backbone", default="builtin")
    d.set_defaults(fn=cmd_demo)

    # command groups that live in their own modules (each has add_parser(sub))
    from . import hub, serve, support, tta
    support.add_parser(sub)
    hub.add_parser(sub)
    tta.add_parser(sub)
    serve.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _warning_line
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except AnyclassError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (completed feature chunks are cached; rerun to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
