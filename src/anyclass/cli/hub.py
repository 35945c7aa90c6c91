"""`anyclass hub init|add|label|list|show|select`: the expert-model hub (MLL)."""
from __future__ import annotations

import json

from ..errors import AnyclassError


def _store(a, create: bool = False):
    from ..hub.service import open_hub
    from ..hub.store import HubStore
    if a.hub is None:
        return open_hub(None, progress=not a.quiet)
    return HubStore(a.hub) if create else open_hub(a.hub)


def cmd_init(a) -> int:
    from ..hub.service import init_world_hub
    if a.world:
        s = init_world_hub(a.hub, progress=not a.quiet, ray_address=a.ray)
    else:
        if a.hub is None:
            raise AnyclassError("hub init needs --hub PATH (or --world for the offline hub)")
        s = _store(a, create=True)
    print(f"hub {s.path}: {len(s.models())} model(s)")
    return 0


def cmd_add(a) -> int:
    from ..hub.label import refresh_graph
    s = _store(a, create=True)
    for spec in a.specs:
        mid = s.add_expert(spec, overrides=a.overrides)
        heads = s.heads(mid)
        unmapped = sum(h.synset is None for h in heads)
        print(f"added {spec} as model {mid}: {len(heads)} heads, {unmapped} unmapped")
    refresh_graph(s, images=a.images, progress=not a.quiet)
    return 0


def cmd_label(a) -> int:
    from ..hub.label import label_models
    s = _store(a)
    ids = [s.model(r).id for r in a.models] if a.models else None
    rep = label_models(s, ids, ray_address=a.ray, progress=not a.quiet, torch_threads=a.threads)
    print(f"labelled: {rep}")
    return 0


def cmd_list(a) -> int:
    s = _store(a)
    done = set(s.labelled_models())
    print(f"{'id':>4}  {'kind':<6} {'heads':>6} {'params(M)':>10} {'labelled':<8} spec")
    for m in s.models():
        print(f"{m.id:>4}  {m.kind:<6} {len(s.heads(m.id)):>6} {m.num_params / 1e6:>10.2f} "
              f"{'yes' if m.id in done else 'no':<8} {m.spec}")
    return 0


def cmd_show(a) -> int:
    s = _store(a)
    m = s.model(a.model)
    print(f"model {m.id}: {m.spec} ({m.kind}, {m.num_params / 1e6:.2f} M params)")
    for h in s.heads(m.id):
        print(f"  {h.index:>4}  {h.name:<30} {h.synset or '-':<28} {h.how} {h.confidence:.2f}")
    return 0


def cmd_select(a) -> int:
    from ..data.classnames import parse_classes, read_classes_file
    from ..hub.select import select_heads
    from ..hub.service import class_nodes
    if (a.classes is None) == (a.classes_file is None):
        raise AnyclassError("give the class names with exactly one of --classes or --classes-file")
    names = read_classes_file(a.classes_file) if a.classes_file else parse_classes(a.classes)
    s = _store(a)
    nodes, _ = class_nodes(names, None, a.overrides)
    sel = select_heads(s.labels(), nodes, max_models=a.max_models, solver=a.solver,
                       classnames=names)
    if a.json:
        print(json.dumps(sel.summary(), indent=2))
        return 0
    specs = {m.id: m.spec for m in s.models()}
    heads = {}
    for ch in sel.choices:
        if ch is not None and ch.model_id not in heads:
            heads[ch.model_id] = s.heads(ch.model_id)
    for c, (name, node) in enumerate(zip(names, nodes)):
        ch = sel.choices[c]
        if ch is None:
            print(f"{name:<28} {node or '(unmapped)':<28} -> fallback")
        else:
            h = heads[ch.model_id][ch.head]
            print(f"{name:<28} {node:<28} -> {specs[ch.model_id]} head {ch.head} "
                  f"({h.name}) score {ch.score:.3f}")
    print(f"models to run: {len(sel.models)}; fallback classes: "
          f"{', '.join(names[c] for c in sel.fallback) or 'none'}; "
          f"objective {sel.objective:.4f} ({sel.solver}, {sel.seconds * 1000:.1f} ms)")
    return 0


def add_parser(sub) -> None:
    h = sub.add_parser("hub", help="the expert-model hub: init, add, label, list, show, select")
    hs = h.add_subparsers(dest="hub_cmd", required=True)

    def cmd(name, fn, help):
        p = hs.add_parser(name, help=help)
        p.add_argument("--hub", help="hub file (default: the offline world's hub)")
        p.add_argument("--quiet", action="store_true")
        p.set_defaults(fn=fn)
        return p

    p = cmd("init", cmd_init, "create a hub file, or (--world) the offline world's hub")
    p.add_argument("--world", action="store_true", help="register, graph and label the world's experts")
    p.add_argument("--ray", help="Ray address for labelling (local, auto, ray://host:port)")
    p = cmd("add", cmd_add, "register expert models by spec (timm:, torchvision:, hf-image:, world-expert:)")
    p.add_argument("specs", nargs="+")
    p.add_argument("--overrides", help="class name -> synset override file (TSV or JSON)")
    p.add_argument("--images", default="world", help="node images: world or a folder of "
                   "wnid/synset-named sub-folders")
    p = cmd("label", cmd_label, "run the models on the graph's node images (resumable)")
    p.add_argument("models", nargs="*", help="model ids or specs (default: all)")
    p.add_argument("--ray", help="Ray address (local, auto, ray://host:port)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per labelling worker")
    cmd("list", cmd_list, "models, heads, labelled or not")
    p = cmd("show", cmd_show, "a model's heads with their synsets")
    p.add_argument("model", help="model id or spec")
    p = cmd("select", cmd_select, "choose a head per class for a task (CHCO)")
    p.add_argument("--classes", help='comma-separated class names')
    p.add_argument("--classes-file")
    p.add_argument("--max-models", type=int, default=8)
    p.add_argument("--solver", choices=["auto", "milp", "greedy"], default="auto")
    p.add_argument("--overrides")
    p.add_argument("--json", action="store_true")
