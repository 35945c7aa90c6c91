"""SDAG — the semantic DAG of Model Label Learning (METHODS.md §5): WordNet noun synsets with
hypernym edges, restricted to what a hub needs.

A hub's graph holds the synsets of its models' heads (and of the tasks it will serve), every
ancestor of those (hypernyms *and* instance hypernyms, so a synset can have two parents and the
graph is a DAG, not a tree), and their descendants down to `descendant_depth` levels. The node
set is closed under "ancestor of": `graph.ancestors(v)` equals WordNet's own closure for every
node, so scores can be propagated along complete paths.

Each node carries representative images, which model labelling runs the hub's models on:
- `attach_world_images(world)`: the offline world renders a few images of every concept whose
  synset is in the graph, with seeds of their own (disjoint from task splits, the built-in
  model's pretraining renders and the experts' training renders);
- `attach_folder_images(root)`: a real user's folder of subfolders named by WordNet id
  (ImageNet's `n02084071` convention) or by synset name (`dog.n.01`).
A node without images of its own gets a seeded sample of its descendants' images (a dog
node is represented by images of poodles and terriers), taken round-robin over descendants
so no single one dominates.

Nodes are kept in a topological order (parents before children): label matrices index nodes
in that order and propagation walks it once.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import warnings
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import AnyclassError

GRAPH_FORMAT = "anyclass-sdag/1"
#: bump when hub image rendering changes (part of the rendered images' folder name)
HUB_IMAGES_VERSION = "1"
#: world renders for the hub use seeds HUB_SEED_BASE + k·2²¹ + code point: above every task
#: seed (< 2⁵⁷) and pretraining seed (< 2³²), below the experts' (≥ 2⁶¹)
HUB_SEED_BASE = 2 ** 59
_K_STRIDE = 2 ** 21
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
_WNID = re.compile(r"^n\d{8}$")
_SYNSET = re.compile(r"^.+\.n\.\d{2}$")


class GraphError(AnyclassError, ValueError):
    """A synset that WordNet does not know, or a malformed graph file."""


@dataclass
class Node:
    name: str                        # synset name, "dog.n.01"
    wnid: str                        # "n02084071" (ImageNet's WordNet id)
    lemmas: list[str]
    definition: str
    parents: list[str] = field(default_factory=list)
    children: list[str] = field(default_factory=list)


def wnid_of(syn: Any) -> str:
    return f"n{syn.offset():08d}"


def resolve_synset(ref: str, wn: Any | None = None) -> Any:
    """A WordNet noun synset from its name ("dog.n.01") or id ("n02084071"); GraphError
    naming `ref` otherwise."""
    from ..world.wordnet import get_wordnet
    wn = wn or get_wordnet()
    ref = str(ref).strip()
    try:
        with warnings.catch_warnings():   # nltk warns (and returns None) on unknown offsets
            warnings.simplefilter("ignore")
            syn = (wn.synset_from_pos_and_offset("n", int(ref[1:])) if _WNID.match(ref) else
                   wn.synset(ref) if _SYNSET.match(ref) else None)
        if syn is not None:
            return syn
    except Exception:  # nltk raises WordNetError / ValueError for unknown ones
        pass
    raise GraphError(f"not a WordNet noun synset: {ref!r} (expected e.g. 'dog.n.01' or "
                     "'n02084071')")


@lru_cache(maxsize=None)
def canonical_synset(ref: str) -> str | None:
    """WordNet's own name for a synset given by name or wnid, None when unknown. nltk accepts
    a lemma's sense name for its synset ("shamrock.n.01" is white_clover.n.01), so names from
    elsewhere are canonicalised before they are used as node keys."""
    try:
        return resolve_synset(ref).name()
    except GraphError:
        return None


def _parents(syn: Any) -> list[Any]:
    return syn.hypernyms() + syn.instance_hypernyms()


def _children(syn: Any) -> list[Any]:
    return syn.hyponyms() + syn.instance_hyponyms()


class SemanticGraph:
    """Nodes keyed by synset name, in topological order; `images[node]` = image paths."""

    def __init__(self, nodes: Iterable[Node], images: dict[str, list[str]] | None = None,
                 params: dict | None = None) -> None:
        nodes = list(nodes)
        by_name = {n.name: n for n in nodes}
        if len(by_name) != len(nodes):
            raise GraphError("duplicate node names in graph")
        for n in nodes:
            bad = [p for p in n.parents + n.children if p not in by_name]
            if bad:
                raise GraphError(f"node {n.name} links to nodes not in the graph: {bad[:5]}")
        self.nodes: dict[str, Node] = {n.name: by_name[n.name] for n in _topological(nodes)}
        self.order: list[str] = list(self.nodes)
        self.index: dict[str, int] = {n: i for i, n in enumerate(self.order)}
        self.images: dict[str, list[str]] = {k: list(v) for k, v in (images or {}).items()
                                             if k in self.nodes}
        self.params: dict = dict(params or {})
        self._anc: dict[str, frozenset[str]] = {}
        self._desc: dict[str, frozenset[str]] = {}
        self._by_wnid = {n.wnid: n.name for n in self.nodes.values()}

    # ---------------------------------------------------------------- structure
    def __len__(self) -> int:
        return len(self.nodes)

    def __contains__(self, name: object) -> bool:
        return name in self.nodes

    def node(self, ref: str) -> Node:
        """A node by synset name or wnid."""
        name = self.canonical(ref)
        if name is None:
            raise GraphError(f"{ref!r} is not a node of this graph")
        return self.nodes[name]

    def canonical(self, ref: str | None) -> str | None:
        """The node key for a synset name (any sense name WordNet accepts) or wnid; None when
        it is not in the graph."""
        if ref is None:
            return None
        name = self._by_wnid.get(ref, ref)
        if name in self.nodes:
            return name
        if not _SYNSET.match(str(ref)):
            return None
        name = canonical_synset(ref)
        return name if name in self.nodes else None

    @property
    def roots(self) -> list[str]:
        return [n for n in self.order if not self.nodes[n].parents]

    def ancestors(self, node: str) -> frozenset[str]:
        """Every hypernym (and instance hypernym) of `node`, transitively; excludes itself."""
        if not self._anc:
            for name in self.order:   # parents come first, so their closure is ready
                acc: set[str] = set()
                for p in self.nodes[name].parents:
                    acc.add(p)
                    acc |= self._anc[p]
                self._anc[name] = frozenset(acc)
        return self._anc[self.node(node).name]

    def descendants(self, node: str) -> frozenset[str]:
        """Every node below `node` in this graph; excludes itself."""
        if not self._desc:
            for name in reversed(self.order):
                acc: set[str] = set()
                for c in self.nodes[name].children:
                    acc.add(c)
                    acc |= self._desc[c]
                self._desc[name] = frozenset(acc)
        return self._desc[self.node(node).name]

    def edges(self) -> list[tuple[str, str]]:
        """(parent, child) pairs."""
        return [(p, n) for n in self.order for p in self.nodes[n].parents]

    def hash(self) -> str:
        """sha256 (16 hex) of nodes, edges and images: label matrices are keyed by it."""
        blob = json.dumps(self._payload(), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    # ---------------------------------------------------------------- images
    def attach_images(self, direct: dict[str, list[str]], per_node: int = 8,
                      seed: int = 0) -> None:
        """Give every node up to `per_node` images: round-robin over the image sources among
        the node itself and its descendants (itself first, the rest in a seeded order), so a
        node without images of its own is represented by its descendants' images."""
        sources = {n for n, imgs in direct.items() if imgs and n in self.nodes}
        out: dict[str, list[str]] = {}
        for name in self.order:
            below = sorted(sources & self.descendants(name))
            random.Random(f"{seed}:{name}").shuffle(below)
            srcs = ([name] if name in sources else []) + below
            if not srcs:
                continue
            picked: list[str] = []
            for k in range(max(len(direct[s]) for s in srcs)):
                for s in srcs:
                    if k < len(direct[s]):
                        picked.append(direct[s][k])
                        if len(picked) >= per_node:
                            break
                if len(picked) >= per_node:
                    break
            out[name] = picked
        self.images = out
        self.params["images"] = {"per_node": per_node, "seed": seed}

    def attach_world_images(self, world: Any = None, per_node: int = 8, per_concept: int = 4,
                            domains: Sequence[str] = ("colour", "sketch"), seed: int = 0,
                            progress: bool = False) -> int:
        """Images from the offline world: `per_concept` renders per domain of every concept
        whose synset is a node, rendered once into `<world root>/hub-images/`; returns the
        number rendered now (0 when cached). Seeds: HUB_SEED_BASE + k·2²¹ + code point."""
        from ..world.build import ensure_world
        from ..world.render import render_to_files
        world = world or ensure_world(progress=progress)
        base = Path(world.root) / "hub-images" / f"v{HUB_IMAGES_VERSION}"
        direct: dict[str, list[str]] = {}
        todo = {d: [] for d in domains}
        for c in world.concepts:
            node = self.canonical(c.synset)
            if node is None:
                continue
            paths = direct.setdefault(node, [])
            for k in range(per_concept):          # domains interleaved per draw index
                for d in domains:
                    p = base / d / f"{c.id}_{k:03d}.png"
                    paths.append(str(p))
                    if not p.exists():          # render_to_files writes atomically
                        todo[d].append((c, HUB_SEED_BASE + k * _K_STRIDE + c.codepoint, p))
        n = 0
        for d, items in todo.items():
            if items:
                (base / d).mkdir(parents=True, exist_ok=True)
                n += render_to_files(items, d, world.cfg.image_size, progress=progress,
                                     desc=f"hub images {d}")
        self.attach_images(direct, per_node=per_node, seed=seed)
        self.params["images"].update({"source": "world", "world": world.cfg.key(),
                                      "per_concept": per_concept, "domains": list(domains)})
        return n

    def attach_folder_images(self, root: str | Path, per_node: int = 8,
                             seed: int = 0) -> dict[str, int]:
        """Images from `root/<n######## | synset name>/**/<image>`; returns images per node
        attached directly. Folder names that are not synsets, or synsets outside the graph,
        are named in a warning and skipped."""
        root = Path(root)
        if not root.is_dir():
            raise GraphError(f"image folder {root} does not exist")
        direct: dict[str, list[str]] = {}
        unknown, outside = [], []
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            try:
                syn = resolve_synset(d.name)
            except GraphError:
                unknown.append(d.name)
                continue
            if syn.name() not in self.nodes:
                outside.append(d.name)
                continue
            files = sorted(str(f) for f in d.rglob("*")
                           if f.suffix.lower() in IMAGE_EXTS and f.is_file())
            if files:
                direct.setdefault(syn.name(), []).extend(files)
        if unknown:
            warnings.warn(f"{len(unknown)} folder(s) in {root} are not WordNet ids or synset "
                          f"names, skipped: {', '.join(unknown[:20])}", stacklevel=2)
        if outside:
            warnings.warn(f"{len(outside)} folder(s) in {root} name synsets outside the hub "
                          f"graph, skipped: {', '.join(outside[:20])}", stacklevel=2)
        self.attach_images(direct, per_node=per_node, seed=seed)
        self.params["images"].update({"source": "folder", "root": str(root.resolve())})
        return {k: len(v) for k, v in direct.items()}

    # ---------------------------------------------------------------- JSON
    def _payload(self) -> dict:
        return {"nodes": [asdict(self.nodes[n]) for n in self.order],
                "images": {n: self.images[n] for n in self.order if n in self.images}}

    def to_json(self) -> str:
        return json.dumps({"format": GRAPH_FORMAT, **self._payload(), "params": self.params},
                          ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> "SemanticGraph":
        try:
            d = json.loads(text)
            if d.get("format") != GRAPH_FORMAT:
                raise GraphError(f"not an anyclass graph (format {d.get('format')!r}, "
                                 f"expected {GRAPH_FORMAT!r})")
            nodes = [Node(**n) for n in d["nodes"]]
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise GraphError(f"malformed graph JSON ({type(e).__name__}: {e})") from None
        return cls(nodes, d.get("images", {}), d.get("params", {}))

    def save(self, path: str | Path) -> None:
        from ..features.cache import atomic_write_bytes
        atomic_write_bytes(Path(path), self.to_json().encode())

    @classmethod
    def load(cls, path: str | Path) -> "SemanticGraph":
        return cls.from_json(Path(path).read_text())


def _topological(nodes: list[Node]) -> list[Node]:
    """Kahn's algorithm with a stack (children follow their parents closely, which keeps a
    node-shard's descendants together); ties by name so the order is deterministic."""
    by = {n.name: n for n in nodes}
    indeg = {n.name: len(n.parents) for n in nodes}
    stack = sorted((n for n in by if indeg[n] == 0), reverse=True)
    out: list[Node] = []
    while stack:
        name = stack.pop()
        out.append(by[name])
        ready = []
        for c in by[name].children:
            indeg[c] -= 1
            if indeg[c] == 0:
                ready.append(c)
        stack.extend(sorted(ready, reverse=True))
    if len(out) != len(nodes):
        raise GraphError("graph has a cycle")
    return out


def build_graph(synsets: Iterable[str], descendant_depth: int = 1) -> SemanticGraph:
    """The SDAG over `synsets` (names or wnids): them, all their ancestors, their descendants
    to `descendant_depth` levels, and the ancestors of those (so the node set is closed
    upward). Unknown synsets raise GraphError naming all of them."""
    from ..world.wordnet import get_wordnet
    wn = get_wordnet()
    refs = [s for s in dict.fromkeys(synsets) if s]
    seeds, bad = [], []
    for r in refs:
        try:
            seeds.append(resolve_synset(r, wn))
        except GraphError:
            bad.append(r)
    if bad:
        raise GraphError(f"{len(bad)} name(s) are not WordNet noun synsets: "
                         f"{', '.join(map(repr, bad[:20]))}")
    keep: dict[str, Any] = {s.name(): s for s in seeds}
    frontier = list(seeds)
    for _ in range(max(0, int(descendant_depth))):
        nxt = []
        for s in frontier:
            for c in _children(s):
                if c.name() not in keep:
                    keep[c.name()] = c
                    nxt.append(c)
        frontier = nxt
    stack = list(keep.values())                 # upward closure of everything kept
    while stack:
        s = stack.pop()
        for p in _parents(s):
            if p.name() not in keep:
                keep[p.name()] = p
                stack.append(p)
    nodes = []
    for name, s in keep.items():
        parents = sorted({p.name() for p in _parents(s)})
        children = sorted({c.name() for c in _children(s) if c.name() in keep})
        nodes.append(Node(name, wnid_of(s), [lem.name() for lem in s.lemmas()],
                          s.definition(), parents, children))
    return SemanticGraph(nodes, params={"descendant_depth": int(descendant_depth),
                                        "seeds": sorted(keep_seed.name() for keep_seed in seeds)})
