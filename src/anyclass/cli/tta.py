"""`anyclass tta stats`: source statistics and class prototypes for PromptAlign/PromptSync."""
from __future__ import annotations

from ..errors import AnyclassError


def cmd_stats(a) -> int:
    from ..backbones.factory import create_backbone
    from ..data.classnames import parse_classes, read_classes_file
    from ..eval.tta import ensure_stats
    from ..methods.tta import prompt_init
    given = [x for x in (a.classes, a.classes_file, a.for_dataset) if x is not None]
    if len(given) > 1:
        raise AnyclassError("give the classes with only one of --classes, --classes-file or --for-dataset")
    names = None
    if a.classes is not None:
        names = parse_classes(a.classes)
    elif a.classes_file is not None:
        names = read_classes_file(a.classes_file)
    elif a.for_dataset is not None:
        from ..data.sources import load_dataset
        names = list(load_dataset(a.for_dataset, "test").classnames)
    backbone = create_backbone(a.backbone, a.device)
    init = prompt_init(backbone, a.prompts)
    path = ensure_stats(backbone, init, names or [], a.layers,
                        source=None if names else a.source, pool=a.source if names else None,
                        per_class=a.per_class, seed=a.seed, out=a.out, progress=not a.quiet)
    from ..methods.tta_stats import SourceStats
    st = SourceStats.load(path)
    print(f"{st.source}: {int(st.class_count.sum())} images, {len(st.classnames)} classes, "
          f"{st.layers} blocks x {st.mean.shape[1]} tokens x {st.mean.shape[2]} channels; "
          f"prompts {st.prompts_key}")
    print(f"wrote {path}")
    return 0


def add_parser(sub) -> None:
    t = sub.add_parser("tta", help="test-time tuning: source statistics (PromptAlign, PromptSync)")
    tsub = t.add_subparsers(dest="tta_cmd", required=True)
    s = tsub.add_parser("stats", help="token statistics and class prototypes of a proxy source set")
    s.add_argument("--source", required=True,
                   help="a labelled dataset (world:source, folder:DIR, coop:NAME@ROOT ...: its "
                   "train split), or with --classes/--for-dataset an image pool to retrieve a "
                   "proxy set from (world:pool, folder:DIR, list:FILE, wds:SHARDS)")
    s.add_argument("--prompts", help="the CoOp/MaPLe prompt file the methods will tune "
                   "(default: the hand-written prompt)")
    s.add_argument("--out", required=True, help="statistics file (.safetensors)")
    s.add_argument("--classes", help="comma-separated class names (retrieval from a pool)")
    s.add_argument("--classes-file")
    s.add_argument("--for-dataset", help="retrieve for this dataset's class names")
    s.add_argument("--per-class", type=int, default=16, help="images retrieved per class")
    s.add_argument("--layers", type=int, default=3, help="vision blocks whose inputs are kept")
    s.add_argument("--backbone", default="builtin")
    s.add_argument("--device")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_stats)
