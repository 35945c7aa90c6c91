"""The hub as a service for the CLI and the eval runner: open a hub, initialise the offline
world's default hub (register its experts, build the graph with world images, label), and map
a task's class names to graph nodes."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

from .graph import canonical_synset
from .store import HubStore


def world_hub_path(world=None) -> Path:
    """The default hub: one per built world, next to its experts."""
    if world is None:
        from ..world.build import ensure_world
        world = ensure_world()
    return Path(world.root) / "hub" / "hub.sqlite"


def open_hub(path: str | Path | None = None, progress: bool = True) -> HubStore:
    """`path` = a hub file; None = the offline world's hub, initialised on first use."""
    if path is not None:
        return HubStore(path)
    return init_world_hub(progress=progress)


def init_world_hub(path: str | Path | None = None, progress: bool = True,
                   ray_address: str | None = None) -> HubStore:
    """Register every world expert, build the graph, label (each step skipped when done)."""
    from ..world.build import ensure_world
    from ..world.experts import ensure_world_experts
    from .label import label_models, refresh_graph
    world = ensure_world(progress=progress)
    store = HubStore(path or world_hub_path(world))
    specs = ensure_world_experts(world, progress=progress)
    have = {m.spec for m in store.models()}
    new = [s for s in specs if s not in have]
    for s in new:
        store.add_expert(s)
    if new or store.graph_hash() is None:
        refresh_graph(store, images="world", world=world, progress=progress)
    label_models(store, progress=progress, ray_address=ray_address, torch_threads=1)
    return store


def class_nodes(classnames: Sequence[str], dataset_meta: dict | None = None,
                overrides=None) -> tuple[list[str | None], list[dict]]:
    """Graph nodes for a task's classes: the world's own concept synsets for `world:` tasks,
    else map_classnames (exact lemma → head noun → disambiguation in context)."""
    meta = dataset_meta or {}
    task = meta.get("task")
    if task and str(meta.get("spec", "")).startswith("world:"):
        from ..world.build import ensure_world
        world = ensure_world(progress=False)
        by_id = {c.id: c for c in world.concepts}
        info = world.tasks[task]
        nodes = [canonical_synset(by_id[cid].synset) if by_id[cid].synset else None
                 for cid in info.concept_ids]
        warn_unmapped(classnames, nodes)
        return nodes, [{"name": n, "synset": s, "how": "world concept"}
                       for n, s in zip(classnames, nodes)]
    from .mapping import map_classnames
    maps = map_classnames(list(classnames), context=True, overrides=overrides)
    nodes = [canonical_synset(m.synset) if m.synset else None for m in maps]
    return nodes, [{"name": m.name, "synset": s, "how": m.how,
                    "confidence": round(float(m.confidence), 3)} for m, s in zip(maps, nodes)]


def warn_unmapped(classnames: Sequence[str], nodes: Sequence[str | None]) -> None:
    missing = [c for c, n in zip(classnames, nodes) if n is None]
    if missing:
        warnings.warn(f"{len(missing)} class name(s) map to no WordNet synset and go to the "
                      f"fallback model: {', '.join(missing[:10])}", stacklevel=2)
