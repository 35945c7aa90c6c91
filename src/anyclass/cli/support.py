"""`anyclass support ...`: build SuS support sets from class names (issue 3)."""
from __future__ import annotations

from ..errors import AnyclassError


def _classes(a) -> list[str]:
    from ..data.classnames import parse_classes, read_classes_file
    if (a.classes is None) == (a.classes_file is None):
        raise AnyclassError("give the class names with exactly one of --classes or "
                            "--classes-file")
    return read_classes_file(a.classes_file) if a.classes_file else parse_classes(a.classes)


def cmd_build(a) -> int:
    from ..backbones.factory import create_backbone
    from ..support import build_support
    names = _classes(a)
    if a.strategy == "retrieval" and not a.pool:  # before loading a backbone
        raise AnyclassError("retrieval needs a pool: --pool folder:DIR | list:FILE | "
                            "wds:SHARDS | world:pool")
    if a.strategy == "generation" and not a.generator:
        raise AnyclassError("generation needs a local diffusers model folder: "
                            "--generator DIR")
    backbone = create_backbone(a.backbone, a.device) if a.strategy == "retrieval" else None
    s = build_support(backbone, names, pool=a.pool, out_dir=a.out, strategy=a.strategy,
                      prompts=a.prompts, descriptions=a.descriptions, per_class=a.per_class,
                      seed=a.seed, generator=a.generator, progress=not a.quiet,
                      allow_partial=a.allow_partial, search=a.search, guidance=a.guidance,
                      steps=a.steps, image_size=a.image_size, batch_size=a.batch_size,
                      force=a.force)
    w = max(len("class"), *(len(c) for c in s.counts))
    print(f"{'class':<{w}}  images")
    for c, n in s.counts.items():
        print(f"{c:<{w}}  {n:>6}" + ("" if n >= a.per_class else f"  (asked {a.per_class})"))
    how = "reused" if s.reused else "built"
    extra = f", search {s.info['search']}" if s.info.get("search") else ""
    print(f"{how} {sum(s.counts.values())} images in {len(s.counts)} classes{extra}")
    print(f"support set: {s.root}")
    print(f"use it as a dataset: folder:{s.root}")
    return 0


def cmd_index(a) -> int:
    import time
    from ..backbones.factory import create_backbone
    from ..support import build_index, load_pool
    t0 = time.perf_counter()
    pool = load_pool(a.pool, progress=not a.quiet)
    index = build_index(create_backbone(a.backbone, a.device), pool,
                        batch_size=a.batch_size, progress=not a.quiet)
    print(f"pool {pool.spec}: {len(index)} images, {index.n_valid} readable, "
          f"{index.features.shape[1]}-d, search {index.method_for(a.search)}, "
          f"{time.perf_counter() - t0:.1f} s")
    print(f"index cache key: {index.key}")
    return 0


def add_parser(sub) -> None:
    s = sub.add_parser("support", help="build support sets from class names (SuS)")
    ssub = s.add_subparsers(dest="support_cmd", required=True)

    b = ssub.add_parser("build", help="retrieve or generate M images per class name into a "
                        "folder dataset (class folders + manifest.json)")
    b.add_argument("--classes", help='comma-separated class names, e.g. "cat,dog,car"')
    b.add_argument("--classes-file", help="UTF-8 file, one class name per line")
    b.add_argument("--strategy", choices=["retrieval", "generation"], default="retrieval")
    b.add_argument("--pool", help="retrieval pool: folder:DIR, list:FILE, wds:DIR|GLOB, "
                   "world:pool")
    b.add_argument("--prompts", choices=["photo", "cupl"], default="photo",
                   help='photo: "A photo of a {}."; cupl: sentences from --descriptions')
    b.add_argument("--descriptions", help="CuPL JSON {class: [sentences]} (for --prompts cupl)")
    b.add_argument("--per-class", type=int, default=16, help="images per class (M)")
    b.add_argument("--out", help="output folder (default: $ANYCLASS_HOME/support/<key>)")
    b.add_argument("--backbone", default="builtin", help="embeds pool and queries (retrieval)")
    b.add_argument("--generator", help="local diffusers model folder (generation)")
    b.add_argument("--seed", type=int, default=1)
    b.add_argument("--guidance", type=float, default=9.5)
    b.add_argument("--steps", type=int, default=85)
    b.add_argument("--image-size", type=int, default=None, help="generated image side")
    b.add_argument("--search", choices=["auto", "exact", "faiss"], default="auto")
    b.add_argument("--allow-partial", action="store_true",
                   help="keep going when a class gets no image (else an error)")
    b.add_argument("--force", action="store_true", help="replace what --out holds")
    b.add_argument("--batch-size", type=int, default=256)
    b.add_argument("--device")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(fn=cmd_build)

    i = ssub.add_parser("index", help="embed a pool once (cached) for later retrievals")
    i.add_argument("--pool", required=True)
    i.add_argument("--backbone", default="builtin")
    i.add_argument("--search", choices=["auto", "exact", "faiss"], default="auto")
    i.add_argument("--batch-size", type=int, default=256)
    i.add_argument("--device")
    i.add_argument("--quiet", action="store_true")
    i.set_defaults(fn=cmd_index)
