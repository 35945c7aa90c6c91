"""What the web app does, without the web: each handler takes what a page sends (file paths,
text) and returns plain data, calling the same library functions as the CLI, so a message or
a prediction in the page is the one `anyclass classify` / `hub select` / `report` gives.

Free of gradio, so tests and other front ends call it directly. Bad input raises
AnyclassError with the CLI's one-line message; the page shows it in its status box.

Concurrency: a server handles several users at once. Per-request state lives in locals and
in a fresh folder per request; what a Service shares between requests (the backbone, the hub's
label matrix) is loaded once under a lock and only read afterwards.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import AnyclassError, SpecError

#: methods the Classify tab offers (the registry names of the feature-level ones)
METHODS = ("zeroshot", "hub", "tip-adapter", "sus-x")
TEMPLATES = ("single", "ensemble7", "openai80")
#: Tip-Adapter's training-free values (its paper's defaults), used when the support folder
#: has no val split to search α, β on
TIP_FIXED = {"alpha": 1.0, "beta": 5.5}


@dataclass
class ClassifyResult:
    """rows: as `anyclass classify --json` prints them (image paths as given); skipped: one
    line per unreadable upload, the CLI's warning text ("skipped PATH: reason")."""
    rows: list[dict]
    skipped: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)


def readable(paths: Sequence[str]) -> tuple[list[str], list[str]]:
    """(decodable paths, "skipped PATH: reason" for the others). Same decoder and limits as
    feature extraction (data/images.load_image), so the page names exactly the files the CLI
    would skip, with the CLI's words; done up front because warnings raised inside a request
    cannot be captured per request (warnings.catch_warnings is process-global)."""
    from ..data.images import load_image
    good, skipped = [], []
    for p in paths:
        try:
            load_image(p)
        except AnyclassError as e:          # BadImageError, ImageTooLargeError: "PATH: why"
            skipped.append(f"skipped {e}")
        else:
            good.append(p)
    return good, skipped


def _norm(name: str) -> str:
    return " ".join(str(name).replace("_", " ").split()).casefold()


def _dataset_spec(text: str) -> str:
    """A dataset spec as typed (`folder:DIR`, `world:TASK`, ...), a bare path = folder:."""
    text = text.strip()
    return text if re.match(r"^[a-z][a-z0-9_-]*:", text) else f"folder:{text}"


def _top_rows(paths: Sequence[str], probs, classnames: Sequence[str], top_k: int) -> list[dict]:
    """The rows of eval/classify.classify, from probabilities [N, K]."""
    k = min(top_k, len(classnames))
    top = probs.topk(k, dim=1)
    return [{"image": p, "top": [{"class": classnames[j], "score": round(float(s), 4)}
                                 for s, j in zip(sv.tolist(), iv.tolist())]}
            for p, sv, iv in zip(paths, top.values, top.indices)]


class Service:
    """One server's state: the backbone spec (loaded on first use, then shared), the hub, the
    results folder and a scratch folder for per-request files (JSON downloads, plots)."""

    def __init__(self, backbone: str = "builtin", device: str | None = None,
                 hub: str | None = None, runs: str | Path = "runs") -> None:
        self.backbone_spec = backbone
        self.device = device
        self.hub = hub
        self.runs = Path(runs).expanduser().resolve()
        self.scratch = Path(tempfile.mkdtemp(prefix="anyclass-serve-"))
        self._lock = threading.Lock()
        self._backbone = None
        self._hub_path: Path | None = None
        self._labels: tuple[Any, Any] | None = None        # (key, HubLabels)

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)

    def request_dir(self) -> Path:
        """A fresh folder for one request's files (two users never share one)."""
        return Path(tempfile.mkdtemp(dir=self.scratch))

    # ------------------------------------------------------------------ shared, read-only
    def backbone(self):
        """The backbone, built on first use and then shared (loading it per request would
        cost seconds; its forward passes do not mutate it)."""
        if self._backbone is None:
            with self._lock:
                if self._backbone is None:
                    from ..backbones.factory import create_backbone
                    self._backbone = create_backbone(self.backbone_spec, self.device)
        return self._backbone

    def _store(self):
        """A HubStore opened in the calling thread (sqlite connections stay in the thread
        that made them). The offline world's hub is initialised once, on first use."""
        from ..hub.service import open_hub
        from ..hub.store import HubStore
        if self.hub is not None:
            return open_hub(self.hub)
        if self._hub_path is None:
            with self._lock:
                if self._hub_path is None:
                    s = open_hub(None, progress=False)
                    self._hub_path = s.path
                    s.close()
        return HubStore(self._hub_path, create=False)

    def _hub_labels(self, store):
        """The hub's label matrix, read once per (graph, labelled models)."""
        key = (str(store.path), store.graph_hash(), tuple(store.labelled_models()))
        cached = self._labels
        if cached is None or cached[0] != key:
            cached = (key, store.labels())
            self._labels = cached          # one tuple swap: readers see old or new, whole
        return cached[1]

    # ------------------------------------------------------------------ Classify
    def task_classes(self, task: str) -> list[str]:
        """A world task's class names (from the task table: no world build needed)."""
        from ..world.config import get_config
        from ..world.tasks import get_tasks
        tasks = get_tasks(get_config())
        if task not in tasks:
            raise SpecError(f"unknown world task {task!r} (known: {', '.join(tasks)})")
        return tasks[task].classnames

    @staticmethod
    def task_names() -> list[str]:
        from ..world.config import get_config
        from ..world.tasks import get_tasks
        return list(get_tasks(get_config()))

    def classify(self, paths: Sequence[str], classes: str, method: str = "zeroshot",
                 templates: str = "single", top_k: int = 5, support: str | None = None,
                 pool: str | None = None) -> ClassifyResult:
        """Top-k per image, as `anyclass classify --classes CLASSES IMAGES...` (zeroshot,
        hub); tip-adapter over a labelled support folder, sus-x over a support set retrieved
        from `pool`. Cheap checks first: a bad class list never costs a model load."""
        from ..data.classnames import parse_classes
        from ..eval.classify import expand_inputs
        names = parse_classes(classes or "")
        files = expand_inputs(list(paths))
        if not files:
            raise AnyclassError("no images given")
        if method not in METHODS:
            raise AnyclassError(f"unknown method {method!r} (known: {', '.join(METHODS)})")
        if method == "tip-adapter" and not (support or "").strip():
            raise AnyclassError("tip-adapter needs a support folder: one sub-folder of "
                                "images per class (or a dataset spec such as world:TASK)")
        if method == "sus-x" and not (pool or "").strip():
            raise AnyclassError("retrieval needs a pool: --pool folder:DIR | list:FILE | "
                                "wds:SHARDS | world:pool")
        good, skipped = readable(files)
        if not good:
            return ClassifyResult([], skipped)
        backbone = self.backbone()
        if method in ("zeroshot", "hub"):
            from ..eval.classify import classify
            rows = classify(good, names, backbone, templates, int(top_k), method=method,
                            hub=self.hub)
            return ClassifyResult(rows, skipped)
        fit = self._fit_tip if method == "tip-adapter" else self._fit_susx
        return self._adapted(good, names, backbone, templates, int(top_k), skipped,
                             lambda W: fit(backbone, names, W, (support or pool).strip()))

    def _adapted(self, paths: list[str], names: list[str], backbone, templates: str,
                 top_k: int, skipped: list[str], fit: Callable) -> ClassifyResult:
        """Feature-level methods: the images' features, the text classifier, fit, predict."""
        import numpy as np
        import torch
        from ..data.base import LabeledImages
        from ..data.templates import get_templates
        from ..features.extract import extract_features
        from ..methods.classifier import build_text_classifier
        ds = LabeledImages("classify", list(paths), [-1] * len(paths), list(names))
        feats = extract_features(backbone, ds, cache=False, progress=False)
        W = build_text_classifier(backbone, names, get_templates(templates))
        method, info = fit(W)
        valid = np.asarray(feats.valid, dtype=bool)
        x = torch.from_numpy(np.array(feats.features, dtype=np.float32)[valid])
        with torch.no_grad():
            probs = method.predict_logits(x.to(W.device)).softmax(dim=-1).cpu()
        kept = [p for p, v in zip(paths, valid.tolist()) if v]
        return ClassifyResult(_top_rows(kept, probs, names, top_k), skipped,
                              {"chosen": getattr(method, "chosen_", None), **info})

    def _fit_tip(self, backbone, names: list[str], W, support: str):
        """Tip-Adapter's cache over a labelled support folder, as `anyclass eval` builds it
        (keys averaged over the method's augmented passes); α, β searched on the folder's
        val split when it has one, else Tip-Adapter's defaults (TIP_FIXED)."""
        from ..data.sources import load_dataset
        from ..eval.featuresets import augmented_train, featureset
        from ..features.extract import extract_features
        from ..methods import create_method
        spec = _dataset_spec(support)
        try:
            train, split_layout = load_dataset(spec, "train"), True
        except SpecError:
            train, split_layout = load_dataset(spec, "test"), False   # a plain class folder
        val = None
        if split_layout:
            try:
                val = load_dataset(spec, "val")
            except SpecError:
                val = None
        found = list(train.classnames)
        train = self._align(train, names)
        if not len(train):
            raise AnyclassError(f"tip-adapter: {spec} has no images of these classes (its "
                                f"classes: {', '.join(found[:10])}"
                                f"{', ...' if len(found) > 10 else ''})")
        val = self._align(val, names) if val is not None and len(val) else None
        method = create_method("tip-adapter", logit_scale=float(backbone.logit_scale),
                               **({} if val is not None and len(val) else TIP_FIXED))
        ext = dict(progress=False)
        passes = int(method.get_params().get("augment_passes") or 0)
        rows = list(range(len(train)))
        fs = (augmented_train(backbone, train, rows, passes, "flip_crop", ext) if passes > 0
              else featureset(extract_features(backbone, train, **ext), names))
        vs = (featureset(extract_features(backbone, val, **ext), names)
              if val is not None and len(val) else None)
        method.fit(W, train=fs, val=vs)
        return method, {"support": spec, "support_images": len(fs),
                        "val_images": 0 if vs is None else len(vs)}

    @staticmethod
    def _align(ds, names: list[str]):
        """The support images of the typed classes, relabelled in their order (folder names
        match class names case- and space-insensitively; underscores read as spaces)."""
        from ..data.base import LabeledImages
        where = {_norm(n): k for k, n in enumerate(names)}
        to = [where.get(_norm(c), -1) for c in ds.classnames]
        keep = [i for i, y in enumerate(ds.labels) if 0 <= y < len(to) and to[y] >= 0]
        return LabeledImages(ds.name, [ds.paths[i] for i in keep],
                             [to[ds.labels[i]] for i in keep], list(names), ds.domain,
                             dict(ds.meta))

    def _fit_susx(self, backbone, names: list[str], W, pool: str):
        """SuS-X: a support set retrieved from `pool` for the class names (as `anyclass eval
        --method sus-x` builds it, cached on disk), TIP-X searched on held-out support."""
        from ..eval.featuresets import featureset
        from ..features.extract import extract_features
        from ..methods import create_method
        from ..support import build_support
        sus = build_support(backbone, names, pool=pool, progress=False)
        if list(sus.dataset.classnames) != list(names):
            raise AnyclassError(f"support set {sus.root} has classes in another order or "
                                f"other classes than the task")
        fs = featureset(extract_features(backbone, sus.dataset, progress=False), list(names))
        method = create_method("sus-x", logit_scale=float(backbone.logit_scale))
        method.fit(W, train=fs)
        return method, {"support": str(sus.root), "pool": pool, "support_images": len(fs)}

    def write_json(self, rows: list[dict]) -> Path:
        """The rows as a downloadable file, in this request's own folder."""
        path = self.request_dir() / "anyclass-classify.json"
        path.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
        return path

    # ------------------------------------------------------------------ Hub
    def hub_lookup(self, name: str, top: int = 10) -> dict:
        """A class name's WordNet synset (how it was mapped, with what confidence, the
        runners-up) and the hub heads that score highest on that synset's graph node."""
        from ..hub.graph import canonical_synset, resolve_synset
        from ..hub.mapping import map_classnames
        name = " ".join(str(name).split())
        if not name:
            raise AnyclassError("type a class name")
        m = map_classnames([name], context=False, warn=False)[0]
        node = canonical_synset(m.synset) if m.synset else None
        out: dict = {"name": name, "synset": node, "how": m.how,
                     "confidence": round(float(m.confidence), 3),
                     "definition": resolve_synset(node).definition() if node else None,
                     "alternatives": [(s, round(float(c), 3)) for s, c in m.alternatives],
                     "in_graph": False, "heads": []}
        if node is None:
            return out
        store = self._store()
        try:
            labels = self._hub_labels(store)
            specs = {x.id: x.spec for x in store.models()}
        finally:
            store.close()
        if node not in labels.nodes:
            return out
        import numpy as np
        col = np.asarray(labels.scores[:, labels.nodes.index(node)], dtype=np.float64)
        col = np.nan_to_num(col, nan=-np.inf)
        out["in_graph"] = True
        for r in np.argsort(-col, kind="stable")[:top]:
            if not np.isfinite(col[r]):
                break
            mid, head = labels.heads[r]
            syn = labels.head_synsets[r] if labels.head_synsets else None
            out["heads"].append({"model": specs.get(mid, str(mid)), "head": int(head),
                                 "head_name": labels.head_names[r] if labels.head_names
                                 else "", "head_synset": syn, "own_concept": syn == node,
                                 "score": round(float(col[r]), 4)})
        return out

    def hub_select(self, classes: str, max_models: int = 8) -> dict:
        """The head chosen per class and the models that would run, as `anyclass hub select
        --classes CLASSES` prints them."""
        from ..data.classnames import parse_classes
        from ..hub.select import select_heads
        from ..hub.service import class_nodes
        names = parse_classes(classes)
        store = self._store()
        try:
            nodes, _ = class_nodes(names, None, None)
            sel = select_heads(self._hub_labels(store), nodes, max_models=max_models,
                               classnames=names)
            specs = {m.id: m.spec for m in store.models()}
            heads = {mid: store.heads(mid) for mid in sel.models}
        finally:
            store.close()
        rows = []
        for c, (name, node) in enumerate(zip(names, nodes)):
            ch = sel.choices[c]
            rows.append({"class": name, "synset": node,
                         "model": specs[ch.model_id] if ch else "fallback (backbone)",
                         "head": ch.head if ch else None,
                         "head_name": heads[ch.model_id][ch.head].name if ch else None,
                         "score": round(ch.score, 3) if ch else None})
        return {"rows": rows, "models": [specs[m] for m in sel.models],
                "fallback": [names[c] for c in sel.fallback], "solver": sel.solver,
                "objective": round(sel.objective, 4)}

    # ------------------------------------------------------------------ Results
    def result_folders(self) -> list[str]:
        """The results folder and its sub-folders (two levels) that hold JSON files, as
        paths relative to it ("." first)."""
        if not self.runs.is_dir():
            return []
        out = []
        for d in [self.runs, *sorted(p for p in self.runs.glob("*") if p.is_dir()),
                  *sorted(p for p in self.runs.glob("*/*") if p.is_dir())]:
            if d.name.startswith(".") or not any(d.rglob("*.json")):
                continue
            out.append("." if d == self.runs else str(d.relative_to(self.runs)))
        return out

    def results(self, folder: str = ".", metric: str = "acc1") -> tuple[str, list[Path]]:
        """`anyclass report <runs>/<folder>`'s text and the plots its --out writes. Only
        folders inside the results folder are read: the page is not a file browser."""
        from ..eval.report import load_results, protocol_tables, results_table, write_report
        base = (self.runs / (folder or ".")).resolve()
        if base != self.runs and self.runs not in base.parents:
            raise AnyclassError(f"{folder}: not inside the results folder {self.runs}")
        results = load_results([base]) if base.is_dir() else []
        if not results:
            raise AnyclassError(f"no result files found in {base}")
        single = [r for r in results if not r.get("protocol")]
        tables = protocol_tables(results, metric)
        text = "\n\n".join(([results_table(single, metric)] if single else [])
                           + [f"## {t.title}\n\n{t.to_markdown()}" for t in tables.values()])
        plots = [p for p in write_report(results, self.request_dir(), metric)
                 if p.suffix == ".png"]
        return text, plots
