"""The four evaluation protocols as grids of cells.

A grid (protocol, methods, datasets, seeds, shots, backbone, hparams, templates, source)
expands into cells, one result file each. Everything a cell could trip over that can be
checked without running it (method names and hyperparameters, dataset specs, whether a
method can score unseen classes, shots) is checked for the whole grid first, so a typo in
the twentieth cell does not surface after nineteen trainings.

    fewshot   fit on k shots of a dataset, test on it (CoOp)
    base2new  fit on the first half of the classes, test on base and on new (CoCoOp)
    xd        fit on the source task, test on it and on other tasks (cross-dataset)
    dg        fit on the source task, test on it in every shifted domain (domain
              generalisation: same classes, other image styles)
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import AnyclassError, SpecError

PROTOCOLS = ("fewshot", "base2new", "xd", "dg")
DEFAULT_SEEDS = (1, 2, 3)
DEFAULT_FEWSHOT_SHOTS = (1, 2, 4, 8, 16)
DEFAULT_TRANSFER_SHOTS = (16,)
DEFAULT_SOURCE = "world:source"
#: grid fields a YAML file may set (CLI flags override them)
GRID_KEYS = ("protocol", "methods", "datasets", "seeds", "shots", "backbone", "hparams",
             "templates", "source")


@dataclass
class Grid:
    protocol: str
    methods: list[str]
    datasets: list[str] = field(default_factory=list)   # fewshot/base2new tasks; xd/dg targets
    seeds: list[int] = field(default_factory=lambda: list(DEFAULT_SEEDS))
    shots: list[int] | None = None                       # None: the protocol's default
    backbone: str = "builtin"
    hparams: dict[str, dict] = field(default_factory=dict)  # method -> {name: value}
    templates: str = "single"
    source: str = DEFAULT_SOURCE                         # xd/dg training task


@dataclass(frozen=True)
class Cell:
    """One result: a fit (possibly shared, see `train_key`) and one evaluation."""
    protocol: str
    method: str
    dataset: str            # fewshot/base2new: the task; xd/dg: the target
    seed: int
    shots: int
    backbone: str = "builtin"
    hparams: tuple = ()     # sorted (name, value) pairs, hashable; `hparams_dict` to use
    templates: str = "single"
    source: str | None = None   # xd/dg only

    @property
    def hparams_dict(self) -> dict:
        return {k: json.loads(v) for k, v in self.hparams}

    def config(self) -> dict:
        """What determines the cell's result (its key hashes this)."""
        d = asdict(self)
        d["hparams"] = self.hparams_dict
        if self.source is None:
            d.pop("source")
        return d

    @property
    def key(self) -> str:
        return _hash(self.config())

    @property
    def train_key(self) -> str:
        """Cells with the same train_key share one training (xd/dg: every target)."""
        c = self.config()
        for k in ("protocol", "dataset"):
            c.pop(k)
        c["fit_on"] = self.source or self.dataset
        return _hash(c)

    @property
    def name(self) -> str:
        where = f"{self.source} -> {self.dataset}" if self.source else self.dataset
        extra = "".join(f" {k}={v}" for k, v in self.hparams)
        return f"{self.protocol} {self.method} {where} shots={self.shots} seed={self.seed}{extra}"

    def relpath(self) -> Path:
        """<protocol>/<method>/<dataset or source--target>/shots<S>-seed<N>[-<variant>].json;
        the variant (a hash of backbone, hparams, templates) only when they are not the
        defaults, so sweeps of other settings into one folder never overwrite each other."""
        where = _slug(self.dataset) if not self.source else \
            f"{_slug(self.source)}--{_slug(self.dataset)}"
        stem = f"shots{self.shots}-seed{self.seed}"
        if self.backbone != "builtin" or self.hparams or self.templates != "single":
            stem += "-" + _hash({"b": self.backbone, "h": self.hparams_dict,
                                 "t": self.templates})[:8]
        return Path(self.protocol) / _slug(self.method) / where / f"{stem}.json"

    def state_relpath(self) -> Path:
        """Where a shared training keeps its learned state (xd/dg)."""
        return (Path("states") / _slug(self.method) / _slug(self.source or self.dataset)
                / f"shots{self.shots}-seed{self.seed}-{self.train_key[:12]}.safetensors")


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _slug(s: str) -> str:
    """A file name for a spec: readable, and hashed when it had to be shortened."""
    out = re.sub(r"[^A-Za-z0-9_.@=-]+", "_", s.replace(":", "-")).strip("_")
    if len(out) > 80 or not out:
        out = out[:60] + "-" + hashlib.sha256(s.encode()).hexdigest()[:8]
    return out


# --------------------------------------------------------------------------- building

def _as_list(v: Any, what: str, conv: Callable = str) -> list:
    if v is None:
        return []
    items = v.split(",") if isinstance(v, str) else list(v) if isinstance(v, (list, tuple)) \
        else [v]
    out = []
    for x in items:
        if isinstance(x, str):
            x = x.strip()
            if not x:
                continue
        try:
            out.append(conv(x))
        except (TypeError, ValueError):
            raise SpecError(f"{what}: {x!r} is not a valid value") from None
    return out


def parse_hparam_flags(pairs: list[str] | None) -> dict[str, dict]:
    """`coop.epochs=5` -> {"coop": {"epochs": 5}}; values are JSON where they parse."""
    out: dict[str, dict] = {}
    for p in pairs or []:
        k, sep, v = p.partition("=")
        method, dot, name = k.partition(".")
        if not sep or not dot or not method or not name:
            raise SpecError(f"--hparam expects METHOD.NAME=VALUE, got {p!r}")
        try:
            val = json.loads(v)
        except json.JSONDecodeError:
            val = v
        out.setdefault(method.strip(), {})[name.strip()] = val
    return out


def load_grid_file(path: str | Path) -> dict:
    """The YAML grid file as a dict of GRID_KEYS (unknown keys are an error: a typo such as
    `seed:` for `seeds:` would otherwise silently run the defaults)."""
    import yaml
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise SpecError(f"{path}: cannot read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping of {', '.join(GRID_KEYS)}")
    unknown = sorted(set(data) - set(GRID_KEYS))
    if unknown:
        raise SpecError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(GRID_KEYS)})")
    hp = data.get("hparams") or {}
    if not isinstance(hp, dict) or not all(isinstance(v, dict) for v in hp.values()):
        raise SpecError(f"{path}: hparams must map method names to {{name: value}}")
    return data


def make_grid(file_values: dict | None = None, **flags: Any) -> Grid:
    """Grid from a YAML file's values with CLI flags (None = not given) on top; per-method
    hparams merge, a flag winning over the file for the same name."""
    vals = dict(file_values or {})
    hp = {m: dict(v) for m, v in (vals.pop("hparams", None) or {}).items()}
    for m, v in (flags.pop("hparams", None) or {}).items():
        hp.setdefault(m, {}).update(v)
    vals.update({k: v for k, v in flags.items() if v is not None})
    protocol = str(vals.get("protocol") or "").strip()
    if not protocol:
        raise SpecError("no protocol: pass --protocol (fewshot, base2new, xd or dg) or set "
                        "`protocol:` in the grid file")
    grid = Grid(protocol=protocol,
                methods=_as_list(vals.get("methods"), "methods"),
                datasets=_as_list(vals.get("datasets"), "datasets"),
                seeds=_as_list(vals.get("seeds", list(DEFAULT_SEEDS)), "seeds", int),
                shots=(_as_list(vals["shots"], "shots", int) if vals.get("shots") is not None
                       else None),
                backbone=str(vals.get("backbone") or "builtin"),
                hparams=hp,
                templates=str(vals.get("templates") or "single"),
                source=str(vals.get("source") or DEFAULT_SOURCE))
    return grid


# --------------------------------------------------------------------------- checks

def check_dataset_spec(spec: str) -> None:
    """A dataset spec that would fail to load fails here. World specs are checked against
    the configuration's task list and domains without building the world; other schemes
    are listed (never decoded), which is what their loading checks anyway."""
    from ..data.sources import load_dataset
    scheme, sep, arg = spec.partition(":")
    if scheme != "world" or not sep or not arg:
        load_dataset(spec, "test")
        return
    from ..world.config import get_config
    from ..world.render import DOMAINS
    from ..world.tasks import get_tasks
    task, _, domain = arg.partition("@")
    domain = {"": "colour", "color": "colour"}.get(domain, domain)
    if domain not in DOMAINS:
        raise SpecError(f"dataset {spec!r}: unknown domain {domain!r} "
                        f"(known: {', '.join(DOMAINS)})")
    known = get_tasks(get_config())
    if task not in known:
        raise SpecError(f"dataset {spec!r}: unknown world task {task!r} "
                        f"(known: {', '.join(known)})")


def world_downstream_targets() -> list[str]:
    """xd's default targets: every world task other than the source task."""
    from ..world.config import get_config
    from ..world.tasks import downstream_tasks, get_tasks
    return [f"world:{t}" for t in downstream_tasks(get_tasks(get_config()))]


def shifted_domain_targets(source: str) -> list[str]:
    """dg's default targets: the source task in every shifted domain of the world."""
    from ..world.render import SHIFTED_DOMAINS
    scheme, _, arg = source.partition(":")
    task, _, domain = arg.partition("@")
    if scheme != "world" or domain not in ("", "colour", "color"):
        raise SpecError(f"dg source {source!r} is not a colour-domain world task, so its "
                        f"shifted domains are unknown: pass the targets with --datasets")
    return [f"world:{task}@{d}" for d in SHIFTED_DOMAINS]


@dataclass(frozen=True)
class MethodRules:
    """The fitting layer's cheap questions about a method (injectable for tests)."""
    check: Callable[[str, dict | None], None]
    transfers: Callable[[str], bool]
    needs_train: Callable[[str], bool]


def fitting_rules() -> MethodRules:
    from . import fitting
    return MethodRules(fitting.check_method, fitting.method_transfers,
                       fitting.method_needs_train)


def expand(grid: Grid, rules: MethodRules | None = None,
           check_spec: Callable[[str], None] = check_dataset_spec) -> list[Cell]:
    """Every cell of the grid, after checking the whole grid (AnyclassError, one line).

    Methods that need no training get one shots=0 cell per (dataset, seed) whatever the
    shots list: their result does not depend on shots."""
    rules = rules or fitting_rules()
    if grid.protocol not in PROTOCOLS:
        raise SpecError(f"unknown protocol {grid.protocol!r} (known: {', '.join(PROTOCOLS)})")
    if not grid.methods:
        raise SpecError("empty grid: no methods (pass --methods)")
    if not grid.seeds:
        raise SpecError("empty grid: no seeds")
    if len(set(grid.methods)) != len(grid.methods):
        raise SpecError("a method is listed twice in methods")
    extra = sorted(set(grid.hparams) - set(grid.methods))
    if extra:
        raise SpecError(f"hparams given for method {extra[0]!r}, which is not in the sweep's "
                        f"methods ({', '.join(grid.methods)})")
    shots = grid.shots if grid.shots is not None else list(
        DEFAULT_FEWSHOT_SHOTS if grid.protocol == "fewshot" else DEFAULT_TRANSFER_SHOTS)
    if not shots:
        raise SpecError("empty grid: no shots")
    bad = [s for s in shots if s < 0]
    if bad:
        raise SpecError(f"shots must be >= 0 (got {bad[0]})")

    source = None
    if grid.protocol in ("xd", "dg"):
        source = grid.source
        check_spec(source)
        targets = grid.datasets or (world_downstream_targets() if grid.protocol == "xd"
                                    else shifted_domain_targets(source))
        datasets = [source] + [t for t in targets if t != source]
    else:
        if not grid.datasets:
            raise SpecError(f"empty grid: no datasets (pass --datasets for protocol "
                            f"{grid.protocol})")
        datasets = list(grid.datasets)
    if len(set(datasets)) != len(datasets):
        raise SpecError("a dataset is listed twice in datasets")
    for d in datasets:
        if d != source:
            check_spec(d)

    for m in grid.methods:
        rules.check(m, grid.hparams.get(m))
        if grid.protocol in ("base2new", "xd") and not rules.transfers(m):
            what = "base2new" if grid.protocol == "base2new" else "cross-dataset (xd)"
            raise AnyclassError(f"method {m!r} cannot score classes it was not trained on, "
                                f"so it has no {what} result")
        if rules.needs_train(m) and 0 in shots:
            raise AnyclassError(f"method {m!r} needs labelled shots, but shots include 0")

    cells = []
    for m in grid.methods:
        hp = tuple(sorted((k, json.dumps(v, sort_keys=True))
                          for k, v in (grid.hparams.get(m) or {}).items()))
        m_shots = sorted(set(shots)) if rules.needs_train(m) else [0]
        for s in m_shots:
            for seed in grid.seeds:
                for d in datasets:   # a training's targets next to each other (xd/dg share)
                    cells.append(Cell(grid.protocol, m, d, int(seed), int(s), grid.backbone,
                                      hp, grid.templates, source))
    return cells
