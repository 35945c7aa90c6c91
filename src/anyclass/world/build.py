"""Build (once) and open the offline world: concepts → task images → split files → built-in
model → DONE marker, under `$ANYCLASS_HOME/world/<cfg.key()>/`.

Layout of `World.root`:
  concepts.json                          the world's concepts (fields of `Concept`)
  images/<domain>/<task>/<split>/<concept id>_<k>.png
  tasks/<task>/split_<domain>.json       CoOp format; relpaths relative to `World.image_root`
                                         (colour and sketch built with the world; rendition,
                                         v2 and adversarial per task on first use)
  model/                                 the built-in model (written by world.train)
  DONE                                   json: config, versions, counts, timings

Builds are deterministic (every image's seed derives from config seed, task, split, concept
and index; task seeds are ≥ 2**32, pretraining seeds below), idempotent (a built world opens
in milliseconds), resumable (each step leaves a marker, every file is written atomically) and
safe when several processes build at once (an flock on `<key>.lock`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..locks import build_lock
from ..paths import home
from .concepts import Concept, load_concepts
from .config import WORLD_VERSION, WorldConfig, get_config
from .render import DOMAINS, TASK_SEED_BASE, render_to_files
from .tasks import DIFFICULTY, TaskSpec, get_tasks, validate_tasks

SPLITS = ("train", "val", "test")
#: domains rendered when the world is built; the others are rendered per task on first use
EAGER_DOMAINS = ("colour", "sketch")


@dataclass(frozen=True)
class TaskInfo:
    """A task as built: class order = label order; `counts[split]` images per domain."""

    name: str
    description: str
    classnames: list[str]
    concept_ids: list[str]
    difficulty: int
    counts: dict[str, int]

    @property
    def difficulty_name(self) -> str:
        return DIFFICULTY[self.difficulty]

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


@dataclass
class World:
    """An offline world on disk. Split-file relpaths are relative to `image_root`."""

    root: Path
    cfg: WorldConfig
    tasks: dict[str, TaskInfo]
    concepts: list[Concept] = field(repr=False)
    info: dict = field(default_factory=dict, repr=False)   # the DONE marker's content

    @property
    def image_root(self) -> Path:
        return self.root / "images"

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def domains(self) -> tuple[str, ...]:
        return DOMAINS

    def split_file(self, task: str, domain: str = "colour", progress: bool = True) -> Path:
        """The task's CoOp split file in `domain`, rendering that domain first if needed."""
        self._check(task, domain)
        return ensure_task_domain(self, task, domain, progress)

    def read_split(self, task: str, domain: str = "colour") -> dict[str, list[list]]:
        """{"train"|"val"|"test": [[relpath, label, classname], ...]}."""
        return json.loads(self.split_file(task, domain).read_text())

    def _check(self, task: str, domain: str) -> None:
        from ..errors import SpecError
        if task not in self.tasks:
            raise SpecError(f"unknown world task {task!r} (known: {', '.join(self.tasks)})")
        if domain not in DOMAINS:
            raise SpecError(f"unknown world domain {domain!r} (known: {', '.join(DOMAINS)})")


# ---------------------------------------------------------------------------------------------

def world_root(cfg: WorldConfig) -> Path:
    return home() / "world" / cfg.key()


def image_seed(cfg: WorldConfig, task: str, split: str, concept_id: str, k: int,
               domain: str = "colour") -> int:
    """Seed of the k-th image of a concept in a task split: disjoint across splits and tasks
    (hash), and from pretraining (≥ TASK_SEED_BASE). Shared by colour, sketch and rendition,
    so their images of one split are paired (same draw), which domain-shift studies like;
    v2 re-samples with fresh seeds (a "v2" tag in the hash), as ImageNet-V2 re-collected."""
    tag = "v2|" if domain == "v2" else ""
    h = hashlib.sha256(f"{cfg.seed}|{tag}{task}|{split}|{concept_id}|{k}".encode()).digest()
    return TASK_SEED_BASE + int.from_bytes(h[:7], "big")


def task_image_seeds(cfg: WorldConfig) -> set[tuple[str, int]]:
    """(concept id, seed) of every task image of `cfg` in every domain: colour, sketch and
    rendition share seeds, v2 and the adversarial candidates have their own. What the pool
    and pretraining must never reuse."""
    from .adversarial import CANDIDATES_PER_IMAGE, candidate_seed
    per = _per_class(cfg)
    out: set[tuple[str, int]] = set()
    for name, spec in get_tasks(cfg).items():
        for cid in spec.concept_ids:
            for split in SPLITS:
                for k in range(per[split]):
                    out.add((cid, image_seed(cfg, name, split, cid, k)))
                    out.add((cid, image_seed(cfg, name, split, cid, k, "v2")))
                for k in range(per[split] * CANDIDATES_PER_IMAGE):
                    out.add((cid, candidate_seed(cfg, name, split, cid, k)))
    return out


def _per_class(cfg: WorldConfig) -> dict[str, int]:
    return {"train": cfg.train_per_class, "val": cfg.val_per_class, "test": cfg.test_per_class}


def _task_infos(cfg: WorldConfig, specs: dict[str, TaskSpec]) -> dict[str, TaskInfo]:
    per = _per_class(cfg)
    return {n: TaskInfo(n, t.description, t.classnames, t.concept_ids, t.difficulty,
                        {s: per[s] * len(t.classes) for s in SPLITS})
            for n, t in specs.items()}


def _split_entries(cfg: WorldConfig, spec: TaskSpec, domain: str
                   ) -> dict[str, list[tuple[str, int, str, str, int]]]:
    """split → [(relpath, label, classname, concept id, seed)], in label then index order."""
    per = _per_class(cfg)
    out: dict[str, list] = {}
    for split in SPLITS:
        rows = []
        for label, (cid, cname) in enumerate(zip(spec.concept_ids, spec.classnames)):
            for k in range(per[split]):
                rel = f"{domain}/{spec.name}/{split}/{cid}_{k:03d}.png"
                rows.append((rel, label, cname, cid,
                             image_seed(cfg, spec.name, split, cid, k, domain)))
        out[split] = rows
    return out


def _write_json(path: Path, obj: object) -> None:
    """Atomic JSON write: readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, ensure_ascii=False, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _locked(cfg: WorldConfig, progress: bool):
    return build_lock(home() / "world" / f"{cfg.key()}.lock", f"world {cfg.key()}", progress)


def _open(cfg: WorldConfig, root: Path) -> World | None:
    """The built world at `root`, or None when it is not (completely) built."""
    try:
        info = json.loads((root / "DONE").read_text())
        rows = json.loads((root / "concepts.json").read_text())
    except (OSError, ValueError):
        return None
    from .train import model_key
    if info.get("key") != cfg.key() or _model_key(root) != model_key(cfg):
        return None          # (a new model recipe: the build replaces the model only)
    concepts = [Concept(**{**r, "keywords": tuple(r["keywords"])}) for r in rows]
    return World(root, cfg, _task_infos(cfg, get_tasks(cfg)), concepts, info)


def _model_key(root: Path) -> str | None:
    try:
        return json.loads((root / "model.json").read_text()).get("key")
    except (OSError, ValueError):
        return None


def ensure_world(cfg: WorldConfig | None = None, progress: bool = True) -> World:
    """The world for `cfg` (default: $ANYCLASS_WORLD, else "full"), built on first use."""
    cfg = cfg or get_config()
    world = _open(cfg, world_root(cfg))
    if world is not None:
        return world
    return build_world(cfg, progress=progress)


def build_world(cfg: WorldConfig | None = None, progress: bool = True,
                force: bool = False) -> World:
    """Build the world for `cfg`, resuming whatever a previous run left; `force` rebuilds
    from scratch."""
    from tqdm.auto import tqdm

    cfg = cfg or get_config()
    root = world_root(cfg)
    with _locked(cfg, progress):
        if force and root.exists():
            shutil.rmtree(root)
        world = _open(cfg, root)
        if world is not None:           # another process finished it while we waited
            return world
        root.mkdir(parents=True, exist_ok=True)
        timings: dict[str, float] = {}
        steps = tqdm(total=4, desc=f"world {cfg.name}", unit="step", disable=not progress)

        # 1. concepts
        t0 = time.perf_counter()
        steps.set_postfix_str("concepts")
        concepts = load_concepts(cfg)
        specs = get_tasks(cfg)
        validate_tasks({c.id for c in concepts}, specs.values())
        if not (root / "concepts.json").exists():
            _write_json(root / "concepts.json", [asdict(c) for c in concepts])
        timings["concepts_s"] = round(time.perf_counter() - t0, 2)
        steps.update()

        # 2. task images and split files of the eager domains
        t0 = time.perf_counter()
        steps.set_postfix_str("images")
        by_id = {c.id: c for c in concepts}
        n_images = 0
        for domain in EAGER_DOMAINS:
            entries = {n: _split_entries(cfg, s, domain) for n, s in specs.items()}
            _check_seeds(entries)
            n_images += _render_splits(root, cfg, entries, domain, by_id, progress)
        timings["render_s"] = round(time.perf_counter() - t0, 2)
        timings["rendered_images"] = n_images
        steps.update()

        # 3. the built-in model (renders its own pretraining images, seeds < 2**32)
        t0 = time.perf_counter()
        steps.set_postfix_str("model")
        model_marker = root / "model.json"
        from .train import model_key
        if _model_key(root) != model_key(cfg):
            from .artefacts import install_model
            shipped = install_model(cfg, root / "model")
            if not shipped:
                from .train import train_builtin_model
                train_builtin_model(cfg, concepts, root / "model", progress=progress)
            _write_json(model_marker, {"path": "model", "key": model_key(cfg),
                                       "shipped": shipped})
        timings["model_s"] = round(time.perf_counter() - t0, 2)
        steps.update()

        # 4. DONE
        infos = _task_infos(cfg, specs)
        info = {
            "key": cfg.key(), "world_version": WORLD_VERSION, "config": asdict(cfg),
            "n_concepts": len(concepts),
            "n_synsets": sum(c.synset is not None for c in concepts),
            "tasks": {n: {"classes": t.num_classes, **t.counts} for n, t in infos.items()},
            "images_per_domain": sum(sum(t.counts.values()) for t in infos.values()),
            "model": json.loads(model_marker.read_text()),
            "timings": timings, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        _write_json(root / "DONE", info)
        steps.update()
        steps.close()
        return World(root, cfg, infos, concepts, info)


def _render_splits(root: Path, cfg: WorldConfig, entries: dict[str, dict[str, list]],
                   domain: str, by_id: dict, progress: bool) -> int:
    """Render the missing images of tasks whose split file in `domain` is missing, then
    write those split files (a split file exists only once all its images do)."""
    pending = [n for n in entries if not _split_path(root, n, domain).exists()]
    items = []
    for n in pending:
        for split, rows in entries[n].items():
            d = root / "images" / domain / n / split
            d.mkdir(parents=True, exist_ok=True)
            for stale in d.glob("*.tmp*"):          # left by a killed render
                stale.unlink(missing_ok=True)
            for rel, _, _, cid, seed in rows:
                path = root / "images" / rel
                if not path.exists():   # written atomically: exists ⇒ complete
                    items.append((by_id[cid], seed, path))
    n_images = render_to_files(items, domain, cfg.image_size, progress=progress,
                               desc=f"render {domain}")
    for n in pending:
        _write_json(_split_path(root, n, domain),
                    {s: [[r[0], r[1], r[2]] for r in rows] for s, rows in entries[n].items()})
    return n_images


def ensure_task_domain(world: World, task: str, domain: str, progress: bool = True) -> Path:
    """The split file of `task` in `domain`, rendered (and, for adversarial, filtered) on
    first use under the world's build lock; resumable like the world build."""
    path = _split_path(world.root, task, domain)
    if path.exists() and (domain != "adversarial" or _filter_current(world, task, progress)):
        return path
    with _locked(world.cfg, progress):
        if path.exists() and (domain != "adversarial" or _filter_current(world, task, progress)):
            return path
        spec = get_tasks(world.cfg)[task]
        by_id = {c.id: c for c in world.concepts}
        if domain == "adversarial":
            _build_adversarial(world, spec, progress)
        else:
            _render_splits(world.root, world.cfg, {task: _split_entries(world.cfg, spec, domain)},
                           domain, by_id, progress)
    return path


def _filter_sha256(world: World, progress: bool) -> str:
    from ..hashing import file_sha256
    from .experts import ADVERSARIAL_FILTER, WEIGHTS_FILE, ensure_expert
    return file_sha256(ensure_expert(world, ADVERSARIAL_FILTER, progress) / WEIGHTS_FILE)


def _filter_current(world: World, task: str, progress: bool) -> bool:
    """An adversarial split is valid only for the filter expert that chose it (a new hub
    recipe or retrained filter re-selects the images)."""
    try:
        rec = json.loads((world.root / "tasks" / task / "adversarial_filter.json").read_text())
    except (OSError, ValueError):
        return False
    from .adversarial import RULE
    return rec.get("rule") == RULE and rec.get("expert_sha256") == _filter_sha256(world, progress)


def _build_adversarial(world: World, spec: TaskSpec, progress: bool) -> None:
    import numpy as np
    from PIL import Image

    from .adversarial import RULE, select
    from .experts import ADVERSARIAL_FILTER
    chosen = select(world, spec, _per_class(world.cfg), progress)
    label = {cid: j for j, cid in enumerate(spec.concept_ids)}
    splits: dict[str, list] = {}
    scores, right = [], []
    for split, rows in chosen.items():
        d = world.root / "images" / "adversarial" / spec.name / split
        d.mkdir(parents=True, exist_ok=True)
        count: dict[str, int] = {}
        out = []
        for cid, _seed, img, score, ok in rows:
            k = count[cid] = count.get(cid, -1) + 1
            rel = f"adversarial/{spec.name}/{split}/{cid}_{k:03d}.png"
            path = world.root / "images" / rel
            tmp = path.with_name(f".{path.name}.tmp")
            Image.fromarray(np.ascontiguousarray(img)).save(tmp, format="PNG", compress_level=2)
            os.replace(tmp, path)
            out.append([rel, label[cid], spec.classnames[label[cid]]])
            scores.append(score)
            right.append(ok)
        splits[split] = out
    _write_json(world.root / "tasks" / spec.name / "adversarial_filter.json",
                {"expert": ADVERSARIAL_FILTER, "expert_sha256": _filter_sha256(world, progress),
                 "rule": RULE,
                 "mean_true_prob": float(np.mean(scores)),
                 "fooled_share": 1.0 - float(np.mean(right))})
    _write_json(_split_path(world.root, spec.name, "adversarial"), splits)


def _split_path(root: Path, task: str, domain: str) -> Path:
    return root / "tasks" / task / f"split_{domain}.json"


def _check_seeds(entries: dict[str, dict[str, list]]) -> None:
    """No (concept, seed) pair may appear twice across tasks and splits (no leakage)."""
    seen: set[tuple[str, int]] = set()
    for splits in entries.values():
        for rows in splits.values():
            for r in rows:
                key = (r[3], r[4])
                if key in seen:
                    raise RuntimeError(f"duplicate image seed for {r[3]}")
                seen.add(key)


def describe_tasks(world: World) -> list[str]:
    """One line per task for `anyclass world tasks`: name, classes, train/val/test images."""
    w = max(len(n) for n in world.tasks)
    lines = [f"{'task':<{w}}  classes  train/val/test  difficulty"]
    for n, t in world.tasks.items():
        c = t.counts
        counts = f"{c['train']}/{c['val']}/{c['test']}"
        lines.append(f"{n:<{w}}  {t.num_classes:>7}  {counts:<14}  {t.difficulty_name}")
    return lines
