"""HubStore — the hub's registry of models, heads, graph and model labels in one SQLite file.

Why SQLite: one file a user can copy, transactions, and safe concurrent writers across
processes (WAL journal + busy_timeout; every write is one `BEGIN IMMEDIATE` transaction, so
writers queue on the database lock instead of failing on a read→write upgrade). Large arrays
(per-shard head×node score matrices, per-model label matrices) live as `.npy` files in a
sibling folder `<stem>.arrays/`, written atomically (temp file + os.replace) and referenced
by sha256 from the database, so a missing or corrupt file is detected and recomputed.

The schema is versioned in the `meta` table; a file of another version raises HubSchemaError
with one line saying what to do (older files are migrated by `HubStore(path, migrate=True)`
where a migration exists).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import time
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import AnyclassError
from ..paths import home

SCHEMA_VERSION = 1
KINDS = ("expert", "vlm")
#: statistics stored per head and node (axis 0 of every shard / label array), see label.py
METRICS = ("prob", "top1")


class HubError(AnyclassError):
    """A hub operation that cannot proceed (unknown model, missing graph, ...)."""


class HubSchemaError(HubError):
    """A hub file of another schema version, or not a hub file at all."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    spec TEXT NOT NULL UNIQUE,
    identity TEXT NOT NULL,
    weights_hash TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('expert', 'vlm')),
    num_params INTEGER NOT NULL DEFAULT 0,
    cost REAL NOT NULL DEFAULT 0,
    added_at REAL NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS heads (
    model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    name TEXT NOT NULL,
    synset TEXT,
    confidence REAL NOT NULL DEFAULT 0,
    how TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (model_id, idx));
CREATE TABLE IF NOT EXISTS graphs (
    hash TEXT PRIMARY KEY,
    n_nodes INTEGER NOT NULL,
    created_at REAL NOT NULL,
    blob BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS shards (
    model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    graph_hash TEXT NOT NULL,
    shard INTEGER NOT NULL,
    start INTEGER NOT NULL,
    stop INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'running', 'done')),
    owner TEXT, pid INTEGER, host TEXT, heartbeat REAL,
    file TEXT, sha256 TEXT, seconds REAL, n_images INTEGER,
    PRIMARY KEY (model_id, graph_hash, shard));
CREATE TABLE IF NOT EXISTS label_matrices (
    model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    graph_hash TEXT NOT NULL,
    kind TEXT NOT NULL,
    file TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    params TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    PRIMARY KEY (model_id, graph_hash, kind));
"""

#: from-version -> function(conn) bringing a file one version up (none needed yet)
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {}


@dataclass
class ModelInfo:
    id: int
    spec: str
    identity: str
    weights_hash: str
    kind: str
    num_params: int
    cost: float
    added_at: float
    meta: dict = field(default_factory=dict)


@dataclass
class HeadInfo:
    model_id: int
    index: int
    name: str
    synset: str | None
    confidence: float
    how: str


@dataclass
class ShardInfo:
    model_id: int
    graph_hash: str
    shard: int
    start: int
    stop: int
    status: str
    owner: str | None = None
    file: str | None = None
    sha256: str | None = None


@dataclass
class HubLabels:
    """Every labelled head's scores on every graph node, for selection.

    `scores[r, v]` is head `heads[r]` = (model_id, head_index) on node `nodes[v]`; float32.
    `model_cost[model_id]` is the cost of running the model (the `cost` column: millions of
    parameters unless given otherwise)."""
    nodes: list[str]
    heads: list[tuple[int, int]]
    scores: np.ndarray
    model_cost: dict[int, float]
    head_synsets: list[str | None] = field(default_factory=list)
    head_names: list[str] = field(default_factory=list)
    graph_hash: str = ""
    metric: str = "prob"
    propagated: bool = True


def default_path() -> Path:
    return home() / "hub" / "hub.sqlite"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class HubStore:
    """The hub database. `path=None`: $ANYCLASS_HOME/hub/hub.sqlite (created on first use).

    Safe to use from several processes at once; a store object reopens its connection after
    a fork (connections must not cross processes)."""

    def __init__(self, path: str | Path | None = None, migrate: bool = False,
                 create: bool = True, timeout: float = 60.0) -> None:
        self.path = Path(path).expanduser() if path else default_path()
        self.arrays_dir = self.path.with_name(self.path.stem + ".arrays")
        self.timeout = float(timeout)
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._verified: dict[str, tuple[int, int]] = {}
        if not self.path.exists() and not create:
            raise HubError(f"no hub at {self.path}: create it with `anyclass hub init`")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open(migrate)

    # ------------------------------------------------------------------ connection
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), timeout=self.timeout, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            self._conn = self._connect()
            self._pid = os.getpid()
        return self._conn

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None

    def __enter__(self) -> "HubStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: takes the write lock up front, waits up to
        `timeout` for other writers); rolled back on any exception."""
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            yield c
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")

    def _open(self, migrate: bool) -> None:
        try:
            c = self.conn
            mode = c.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                warnings.warn(f"hub {self.path}: WAL journal not available ({mode}); "
                              "concurrent writers will wait longer", stacklevel=3)
            with self.transaction() as t:
                tables = {r[0] for r in t.execute(
                    "SELECT name FROM sqlite_master WHERE type='table'")}
                if "meta" not in tables:
                    if tables - {"sqlite_sequence"}:
                        raise HubSchemaError(
                            f"{self.path} is an SQLite file but not an anyclass hub (no meta "
                            "table): pass another path or `anyclass hub init` a new one")
                    for stmt in _SCHEMA.split(";"):
                        if stmt.strip():
                            t.execute(stmt)
                    t.execute("INSERT INTO meta VALUES ('schema_version', ?)",
                              (str(SCHEMA_VERSION),))
                    t.execute("INSERT INTO meta VALUES ('created_at', ?)", (str(time.time()),))
                    return
                row = t.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.DatabaseError as e:
            self._conn = None
            raise HubSchemaError(f"{self.path} is not an anyclass hub ({e}): pass another "
                                 "path or `anyclass hub init` a new one") from None
        version = int(row[0]) if row else 0
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise HubSchemaError(
                f"hub {self.path} has schema version {version}, newer than this anyclass "
                f"reads ({SCHEMA_VERSION}): upgrade anyclass or use another hub file")
        path_ok = all(v in MIGRATIONS for v in range(version, SCHEMA_VERSION))
        if not migrate or not path_ok:
            how = ("run `anyclass hub migrate` (back the file up first)" if path_ok else
                   "no automatic migration exists: create a new hub with `anyclass hub init` "
                   "and add the models again")
            raise HubSchemaError(f"hub {self.path} has schema version {version}, this "
                                 f"anyclass reads version {SCHEMA_VERSION}: {how}")
        self.migrate_from(version)

    def migrate_from(self, version: int) -> None:
        """Apply MIGRATIONS[version], [version+1], ... in one transaction."""
        with self.transaction() as t:
            for v in range(version, SCHEMA_VERSION):
                MIGRATIONS[v](t)
            t.execute("UPDATE meta SET value=? WHERE key='schema_version'",
                      (str(SCHEMA_VERSION),))

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as t:
            t.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # ------------------------------------------------------------------ models
    def add_model(self, spec: str, identity: str, weights_hash: str, kind: str = "expert",
                  head_names: Sequence[str] = (), head_synsets: Sequence[str | None] = (),
                  confidences: Sequence[float] | None = None, hows: Sequence[str] | None = None,
                  num_params: int = 0, cost: float | None = None,
                  meta: dict | None = None, replace: bool = False) -> int:
        """Register a model and its heads in one transaction; returns its id. Adding a spec
        that exists returns the existing id when identity and weights match; with other
        weights it raises unless `replace` (which drops the old heads and labels)."""
        if kind not in KINDS:
            raise HubError(f"model kind {kind!r} is not one of {', '.join(KINDS)}")
        head_names = list(head_names)
        syn = list(head_synsets) if head_synsets else [None] * len(head_names)
        if len(syn) != len(head_names):
            raise HubError(f"{spec}: {len(head_names)} head names but {len(syn)} synsets")
        conf = list(confidences) if confidences is not None else \
            [1.0 if s else 0.0 for s in syn]
        how = list(hows) if hows is not None else ["model" if s else "none" for s in syn]
        cost = float(num_params) / 1e6 if cost is None else float(cost)
        with self.transaction() as t:
            row = t.execute("SELECT id, identity, weights_hash FROM models WHERE spec=?",
                            (spec,)).fetchone()
            if row is not None:
                if (row[1], row[2]) == (identity, weights_hash) and not replace:
                    return int(row[0])
                if not replace:
                    raise HubError(f"model {spec!r} is already in the hub with other weights "
                                   f"({row[2][:12]} vs {weights_hash[:12]}): pass replace")
                t.execute("DELETE FROM models WHERE id=?", (row[0],))
            cur = t.execute(
                "INSERT INTO models (spec, identity, weights_hash, kind, num_params, cost, "
                "added_at, meta) VALUES (?,?,?,?,?,?,?,?)",
                (spec, identity, weights_hash, kind, int(num_params), cost, time.time(),
                 json.dumps(meta or {})))
            mid = int(cur.lastrowid)
            t.executemany("INSERT INTO heads VALUES (?,?,?,?,?,?)",
                          [(mid, i, n, s, float(c), h)
                           for i, (n, s, c, h) in enumerate(zip(head_names, syn, conf, how))])
        return mid

    def add_expert(self, spec: str, expert: Any = None, map_names: bool = True,
                   overrides: Any = None, cost: float | None = None, replace: bool = False
                   ) -> int:
        """Register an expert classifier by spec (built with create_expert unless given);
        heads without a synset from the model are mapped from their names (mapping.py)."""
        if expert is None:
            from .experts import create_expert
            expert = create_expert(spec)
        names = list(expert.head_names)
        syn = list(expert.head_synsets) if expert.head_synsets else [None] * len(names)
        from .graph import canonical_synset
        invalid = [s for s in syn if s is not None and canonical_synset(s) is None]
        if invalid:
            warnings.warn(f"{spec}: {len(invalid)} head synset(s) unknown to WordNet, mapped "
                          f"from the head names instead: {', '.join(invalid[:10])}",
                          stacklevel=2)
        syn = [canonical_synset(s) if s is not None else None for s in syn]
        conf = [1.0 if s else 0.0 for s in syn]
        how = ["model" if s else "none" for s in syn]
        todo = [i for i, s in enumerate(syn) if s is None]
        if map_names and todo:
            from .mapping import map_classnames
            for i, m in zip(todo, map_classnames([names[i] for i in todo], context=True,
                                                 overrides=overrides)):
                syn[i], conf[i], how[i] = m.synset, m.confidence, m.how
        unmapped = [n for n, s in zip(names, syn) if s is None]
        if unmapped:
            warnings.warn(f"{spec}: {len(unmapped)} of {len(names)} head name(s) map to no "
                          f"WordNet synset: {', '.join(unmapped[:10])}; labelling still scores "
                          f"them on the graph's images, but they get no semantic prior (give an "
                          f"override file to map them)", stacklevel=2)
        return self.add_model(spec, expert.identity, expert.weights_hash, "expert", names, syn,
                              conf, how, num_params=int(expert.num_params), cost=cost,
                              replace=replace)

    def remove_model(self, ref: int | str) -> None:
        m = self.model(ref)
        with self.transaction() as t:
            t.execute("DELETE FROM models WHERE id=?", (m.id,))

    def models(self, kind: str | None = None) -> list[ModelInfo]:
        q = "SELECT id, spec, identity, weights_hash, kind, num_params, cost, added_at, meta " \
            "FROM models" + (" WHERE kind=?" if kind else "") + " ORDER BY id"
        return [ModelInfo(*r[:8], json.loads(r[8]))
                for r in self.conn.execute(q, (kind,) if kind else ())]

    def model(self, ref: int | str) -> ModelInfo:
        """A model by id (int or digits) or spec."""
        for m in self.models():
            if (isinstance(ref, int) or str(ref).isdigit()) and m.id == int(ref):
                return m
            if m.spec == ref:
                return m
        raise HubError(f"no model {ref!r} in hub {self.path} (see `anyclass hub list`)")

    def update_model_meta(self, model_id: int, **items: Any) -> None:
        with self.transaction() as t:
            row = t.execute("SELECT meta FROM models WHERE id=?", (model_id,)).fetchone()
            if row is None:
                raise HubError(f"no model {model_id} in hub {self.path}")
            meta = {**json.loads(row[0]), **items}
            t.execute("UPDATE models SET meta=? WHERE id=?", (json.dumps(meta), model_id))

    def heads(self, model_id: int) -> list[HeadInfo]:
        return [HeadInfo(*r) for r in self.conn.execute(
            "SELECT model_id, idx, name, synset, confidence, how FROM heads WHERE model_id=? "
            "ORDER BY idx", (model_id,))]

    def set_head_synset(self, model_id: int, index: int, synset: str | None,
                        confidence: float = 1.0, how: str = "manual") -> None:
        with self.transaction() as t:
            t.execute("UPDATE heads SET synset=?, confidence=?, how=? WHERE model_id=? AND idx=?",
                      (synset, confidence, how, model_id, index))

    def head_synsets(self) -> list[str]:
        """Every distinct head synset in the hub (the graph's seed set)."""
        return [r[0] for r in self.conn.execute(
            "SELECT DISTINCT synset FROM heads WHERE synset IS NOT NULL ORDER BY synset")]

    # ------------------------------------------------------------------ graph
    def save_graph(self, graph: Any, current: bool = True) -> str:
        """Store a SemanticGraph (zlib JSON), make it the current one; returns its hash."""
        h = graph.hash()
        blob = zlib.compress(graph.to_json().encode(), 6)
        with self.transaction() as t:
            t.execute("INSERT OR IGNORE INTO graphs VALUES (?,?,?,?)",
                      (h, len(graph), time.time(), blob))
            if current:
                t.execute("INSERT OR REPLACE INTO meta VALUES ('current_graph', ?)", (h,))
        return h

    def graph_hash(self) -> str | None:
        return self.get_meta("current_graph")

    def load_graph(self, graph_hash: str | None = None) -> Any:
        from .graph import SemanticGraph
        h = graph_hash or self.graph_hash()
        if h is None:
            raise HubError(f"hub {self.path} has no graph yet: build one with `anyclass hub "
                           "init` (or HubStore.save_graph)")
        row = self.conn.execute("SELECT blob FROM graphs WHERE hash=?", (h,)).fetchone()
        if row is None:
            raise HubError(f"hub {self.path} has no graph {h}")
        return SemanticGraph.from_json(zlib.decompress(row[0]).decode())

    # ------------------------------------------------------------------ arrays
    def _abs(self, rel: str) -> Path:
        return self.arrays_dir / rel

    def write_array(self, rel: str, arr: np.ndarray) -> str:
        """Atomically write `arr` as `<arrays>/<rel>` (.npy); returns its sha256."""
        path = self._abs(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
        try:
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            digest = sha256_file(tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return digest

    def read_array(self, rel: str, sha256: str, mmap: bool = False) -> np.ndarray | None:
        """The array at `rel` if it exists and matches `sha256`, else None (callers recompute).
        A verified file is not hashed again in this process while size and mtime hold."""
        path = self._abs(rel)
        try:
            st = path.stat()
        except OSError:
            return None
        sig = (st.st_size, st.st_mtime_ns)
        key = f"{rel}|{sha256}"
        if self._verified.get(key) != sig:
            if sha256_file(path) != sha256:
                return None
            self._verified[key] = sig
        try:
            return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (ValueError, OSError):
            return None

    # ------------------------------------------------------------------ label shards
    def plan_shards(self, model_id: int, graph_hash: str, n_nodes: int,
                    shard_size: int) -> list[ShardInfo]:
        """Create the (model, graph) shard rows once; later calls return the existing plan
        (its shard size wins, so finished shards stay valid)."""
        with self.transaction() as t:
            n = t.execute("SELECT COUNT(*) FROM shards WHERE model_id=? AND graph_hash=?",
                          (model_id, graph_hash)).fetchone()[0]
            if n == 0:
                size = max(1, int(shard_size))
                t.executemany(
                    "INSERT INTO shards (model_id, graph_hash, shard, start, stop) "
                    "VALUES (?,?,?,?,?)",
                    [(model_id, graph_hash, i, s, min(s + size, n_nodes))
                     for i, s in enumerate(range(0, max(n_nodes, 1), size))])
        return self.shards(model_id, graph_hash)

    def shards(self, model_id: int, graph_hash: str) -> list[ShardInfo]:
        return [ShardInfo(*r) for r in self.conn.execute(
            "SELECT model_id, graph_hash, shard, start, stop, status, owner, file, sha256 "
            "FROM shards WHERE model_id=? AND graph_hash=? ORDER BY shard",
            (model_id, graph_hash))]

    def claim_shard(self, model_id: int, graph_hash: str, owner: str | None = None,
                    stale_after: float = 300.0) -> ShardInfo | None:
        """Atomically take one pending shard, or a running one whose owner is dead (same host,
        pid gone) or silent for `stale_after` s; None when nothing is left to claim."""
        owner = owner or owner_id()
        host, now = socket.gethostname(), time.time()
        with self.transaction() as t:
            rows = t.execute(
                "SELECT shard, status, pid, host, heartbeat FROM shards WHERE model_id=? AND "
                "graph_hash=? AND status!='done' ORDER BY shard", (model_id, graph_hash)
            ).fetchall()
            for shard, status, pid, h, beat in rows:
                if status == "running":
                    dead = h == host and pid is not None and not _pid_alive(int(pid))
                    if not dead and (beat or 0) > now - stale_after:
                        continue
                t.execute("UPDATE shards SET status='running', owner=?, pid=?, host=?, "
                          "heartbeat=? WHERE model_id=? AND graph_hash=? AND shard=?",
                          (owner, os.getpid(), host, now, model_id, graph_hash, shard))
                r = t.execute("SELECT model_id, graph_hash, shard, start, stop, status, owner, "
                              "file, sha256 FROM shards WHERE model_id=? AND graph_hash=? AND "
                              "shard=?", (model_id, graph_hash, shard)).fetchone()
                return ShardInfo(*r)
        return None

    def heartbeat(self, owner: str | None = None) -> None:
        with self.transaction() as t:
            t.execute("UPDATE shards SET heartbeat=? WHERE owner=? AND status='running'",
                      (time.time(), owner or owner_id()))

    def release_shards(self, owner: str | None = None) -> None:
        """Give back every shard `owner` still holds (e.g. on KeyboardInterrupt)."""
        with self.transaction() as t:
            t.execute("UPDATE shards SET status='pending', owner=NULL, pid=NULL, heartbeat=NULL "
                      "WHERE owner=? AND status='running'", (owner or owner_id(),))

    def shard_file(self, model_id: int, graph_hash: str, shard: int) -> str:
        """A fresh file name per attempt: a taken-over claim's late write can never clobber
        the file the winner recorded."""
        return f"shards/m{model_id}-{graph_hash}/s{shard:05d}-{os.urandom(4).hex()}.npy"

    def complete_shard(self, info: ShardInfo, arr: np.ndarray, owner: str | None = None,
                       seconds: float = 0.0, n_images: int = 0) -> bool:
        """Write the shard's array, then mark it done — only if `owner` still holds it (a
        taken-over claim's late result is dropped). Returns whether it was recorded."""
        owner = owner or owner_id()
        rel = self.shard_file(info.model_id, info.graph_hash, info.shard)
        digest = self.write_array(rel, arr.astype(np.float32))
        with self.transaction() as t:
            cur = t.execute(
                "UPDATE shards SET status='done', file=?, sha256=?, seconds=?, n_images=?, "
                "heartbeat=? WHERE model_id=? AND graph_hash=? AND shard=? AND owner=? AND "
                "status='running'", (rel, digest, float(seconds), int(n_images), time.time(),
                                     info.model_id, info.graph_hash, info.shard, owner))
            ok = cur.rowcount == 1
        if not ok:
            self._abs(rel).unlink(missing_ok=True)
        return ok

    def reset_shard(self, model_id: int, graph_hash: str, shard: int) -> None:
        with self.transaction() as t:
            row = t.execute("SELECT file FROM shards WHERE model_id=? AND graph_hash=? AND "
                            "shard=?", (model_id, graph_hash, shard)).fetchone()
            if row and row[0]:
                self._abs(row[0]).unlink(missing_ok=True)
            t.execute("UPDATE shards SET status='pending', owner=NULL, pid=NULL, heartbeat=NULL, "
                      "file=NULL, sha256=NULL WHERE model_id=? AND graph_hash=? AND shard=?",
                      (model_id, graph_hash, shard))

    def verify_shards(self, model_id: int, graph_hash: str) -> list[int]:
        """Reset done shards whose file is missing or corrupt (warning naming them); returns
        their numbers."""
        bad = []
        for s in self.shards(model_id, graph_hash):
            if s.status == "done" and (s.file is None or
                                       self.read_array(s.file, s.sha256 or "", True) is None):
                bad.append(s.shard)
                self.reset_shard(model_id, graph_hash, s.shard)
        if bad:
            warnings.warn(f"hub {self.path}: model {model_id} shard(s) {bad} had a missing or "
                          "corrupt array file; they will be recomputed", stacklevel=2)
        return bad

    def shard_stats(self, model_id: int, graph_hash: str) -> dict[str, float]:
        r = self.conn.execute(
            "SELECT COUNT(*), SUM(status='done'), SUM(seconds), SUM(n_images) FROM shards "
            "WHERE model_id=? AND graph_hash=?", (model_id, graph_hash)).fetchone()
        return {"shards": r[0] or 0, "done": r[1] or 0, "seconds": r[2] or 0.0,
                "images": r[3] or 0}

    # ------------------------------------------------------------------ label matrices
    def label_file(self, model_id: int, graph_hash: str, kind: str) -> str:
        return f"labels/m{model_id}-{graph_hash}-{kind}.npy"

    def save_label_matrix(self, model_id: int, graph_hash: str, kind: str, arr: np.ndarray,
                          params: dict | None = None) -> None:
        rel = self.label_file(model_id, graph_hash, kind)
        digest = self.write_array(rel, arr.astype(np.float32))
        with self.transaction() as t:
            t.execute("INSERT OR REPLACE INTO label_matrices VALUES (?,?,?,?,?,?,?)",
                      (model_id, graph_hash, kind, rel, digest, json.dumps(params or {}),
                       time.time()))

    def label_matrix(self, model_id: int, propagated: bool = True, metric: str = "prob",
                     graph_hash: str | None = None) -> np.ndarray | None:
        """[n_heads, n_nodes] float32 of one model on the (current) graph, or None when it is
        not labelled (or its file went missing/corrupt: relabel). Raw matrices hold NaN on
        nodes without images; propagated ones never do."""
        arr = self._label_array(model_id, "propagated" if propagated else "raw", graph_hash)
        if arr is None:
            return None
        return np.asarray(arr[METRICS.index(metric)], dtype=np.float32)

    def _label_array(self, model_id: int, kind: str, graph_hash: str | None
                     ) -> np.ndarray | None:
        h = graph_hash or self.graph_hash()
        row = self.conn.execute("SELECT file, sha256 FROM label_matrices WHERE model_id=? AND "
                                "graph_hash=? AND kind=?", (model_id, h, kind)).fetchone()
        if row is None:
            return None
        return self.read_array(row[0], row[1], mmap=True)

    def labelled_models(self, graph_hash: str | None = None) -> list[int]:
        h = graph_hash or self.graph_hash()
        return [r[0] for r in self.conn.execute(
            "SELECT DISTINCT l.model_id FROM label_matrices l JOIN models m ON m.id=l.model_id "
            "WHERE l.graph_hash=? ORDER BY l.model_id", (h,))]

    def labels(self, propagated: bool = True, metric: str = "prob",
               model_ids: Sequence[int] | None = None, kind: str | None = "expert"
               ) -> HubLabels:
        """All labelled heads' scores on the current graph (one vectorised concatenation of
        the per-model matrices). Models not labelled yet are left out with a warning."""
        if metric not in METRICS:
            raise HubError(f"unknown label metric {metric!r} (known: {', '.join(METRICS)})")
        h = self.graph_hash()
        graph = self.load_graph(h)
        models = [m for m in self.models(kind) if model_ids is None or m.id in set(model_ids)]
        blocks, heads, syns, names, missing = [], [], [], [], []
        for m in models:
            arr = self._label_array(m.id, "propagated" if propagated else "raw", h)
            if arr is None:
                missing.append(m.spec)
                continue
            hs = self.heads(m.id)
            blocks.append(arr[METRICS.index(metric)])
            heads.extend((m.id, x.index) for x in hs)
            syns.extend(x.synset for x in hs)
            names.extend(x.name for x in hs)
        if missing:
            warnings.warn(f"{len(missing)} model(s) not labelled on the current graph, left "
                          f"out: {', '.join(missing[:10])} (run `anyclass hub label`)",
                          stacklevel=2)
        scores = (np.concatenate(blocks, axis=0).astype(np.float32, copy=False) if blocks
                  else np.zeros((0, len(graph)), np.float32))
        cost = {m.id: float(m.cost) for m in models if m.spec not in set(missing)}
        return HubLabels(list(graph.order), heads, scores, cost, syns, names, h, metric,
                         propagated)
