"""Model labelling: every head of every hub model gets a score on every SDAG node.

Raw label (per model m, head h, node v with images I_v; softmax over the model's heads):
    prob[h, v] = (1/|I_v|) Σ_{x∈I_v} softmax(f_m(x))_h        mean probability of h on v
    top1[h, v] = (1/|I_v|) Σ_{x∈I_v} [argmax_j f_m(x)_j = h]   how often h wins on v
Mean probability is smooth (a head that is often second still scores) and comparable across
models only after calibration, which reuse does; the top-1 rate is the head's precision view.
Nodes without images get NaN in the raw matrix.

Propagation (both metrics; d↑ = UP_DISCOUNT, d↓ = DOWN_DISCOUNT), see `propagate`:
    up   (children before parents):  U[h, v] = max(raw[h, v], d↑ · max_{c∈children(v)} U[h, c])
    down (parents before children), only for heads whose own synset s_h is v or an ancestor:
                                     P[h, v] = max(U[h, v], d↓ · max_{p∈parents(v)} P[h, p])
Up: a head that recognises a child partially recognises the parent (a poodle head is some
evidence for "dog"), discounted because it misses the parent's other children. Down: a head
trained on an ancestor fires on its descendants (a dog head recognises poodles); it matters
for nodes without images. Heads never inherit downward from nodes they were not trained on,
so an "animal" node's high score for a dog head does not leak to cats.

Work is split into independent (model, node-shard) tasks, claimed atomically in the store, so
labelling resumes after a crash, several processes can label one model without computing a
shard twice, and with `ray_address` the shards run as Ray tasks (num_cpus=1) while the driver
writes every result into the store.
"""
from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .store import METRICS, HubError, HubStore, ShardInfo, owner_id

DEFAULT_SHARD_SIZE = 256
UP_DISCOUNT = 0.5
DOWN_DISCOUNT = 0.8
#: bump when the label formulas change (stored with every label matrix)
LABEL_VERSION = "1"

ExpertFactory = Callable[[str], Any]


def _default_factory(spec: str) -> Any:
    from .experts import create_expert
    return create_expert(spec)


# ---------------------------------------------------------------------------------- scoring

def _load_batchable(expert: Any, paths: Sequence[str]) -> tuple[list, np.ndarray]:
    """Preprocessed tensors of every readable image and the mask of readable ones (bad
    images are warned by name and skipped)."""
    from ..data.images import load_image
    tensors, ok = [], np.zeros(len(paths), bool)
    for i, p in enumerate(paths):
        try:
            tensors.append(expert.preprocess(load_image(p)))
            ok[i] = True
        except Exception as e:   # BadImageError, ImageTooLargeError, decoder errors
            warnings.warn(f"hub labelling skipped {p}: {str(e).splitlines()[0][:200]}",
                          stacklevel=3)
    return tensors, ok


def score_nodes(expert: Any, node_images: Sequence[Sequence[str]], batch_size: int = 128
                ) -> tuple[np.ndarray, int]:
    """[2, H, n] float32 (prob, top1) of `expert` on n nodes given their image lists; each
    distinct image is run once. Returns (array, images run)."""
    import torch
    uniq = list(dict.fromkeys(p for imgs in node_images for p in imgs))
    col = {p: j for j, p in enumerate(uniq)}
    H, n = len(expert.head_names), len(node_images)
    probs = np.zeros((len(uniq), H), np.float32)
    ok = np.zeros(len(uniq), bool)
    for s in range(0, len(uniq), batch_size):
        tensors, m = _load_batchable(expert, uniq[s:s + batch_size])
        ok[s:s + len(m)] = m
        if not tensors:
            continue
        with torch.inference_mode():
            logits = expert.predict_logits(torch.stack(tensors).to(expert.device))
        p = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        probs[np.flatnonzero(ok[s:s + len(m)]) + s] = p
    top1 = np.zeros_like(probs)
    top1[np.arange(len(uniq)), probs.argmax(1)] = 1.0
    top1[~ok] = 0.0
    # membership M[v, x] = 1/|valid I_v| for x ∈ I_v: node means are one matmul
    M = np.zeros((n, len(uniq)), np.float32)
    for v, imgs in enumerate(node_images):
        M[v, [col[p] for p in imgs]] = 1.0
    M *= ok[None, :]
    cnt = M.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        M = M / cnt
    out = np.stack([(M @ probs).T, (M @ top1).T]).astype(np.float32)   # [2, H, n]
    out[:, :, cnt[:, 0] == 0] = np.nan                                   # no images: unknown
    return out, int(ok.sum())


def propagate(raw: np.ndarray, graph: Any, head_nodes: Sequence[str | None],
              up: float = UP_DISCOUNT, down: float = DOWN_DISCOUNT) -> np.ndarray:
    """Propagated [H, N] from raw [H, N] (NaN = no images → 0) along `graph` (formulas in the
    module docstring). `head_nodes[h]`: head h's synset, or None (no downward inheritance)."""
    N = len(graph.order)
    idx = graph.index
    children = [[idx[c] for c in graph.nodes[n].children] for n in graph.order]
    parents = [[idx[p] for p in graph.nodes[n].parents] for n in graph.order]
    U = np.nan_to_num(np.asarray(raw, np.float32), nan=0.0).T.copy()    # [N, H]: rows contiguous
    for v in range(N - 1, -1, -1):                                      # children first
        if children[v]:
            np.maximum(U[v], up * U[children[v]].max(0), out=U[v])
    allowed = np.zeros_like(U, dtype=bool)                               # v under head h's synset
    for h, s in enumerate(head_nodes):
        s = graph.canonical(s)
        if s is not None:
            allowed[idx[s], h] = True
            allowed[[idx[d] for d in graph.descendants(s)], h] = True
    P = U
    for v in range(N):                                                   # parents first
        if parents[v] and allowed[v].any():
            inherit = down * P[parents[v]].max(0)
            np.maximum(P[v], np.where(allowed[v], inherit, 0.0), out=P[v])
    return np.ascontiguousarray(P.T)


# ---------------------------------------------------------------------------------- driver

@dataclass
class LabelReport:
    """What a labelling run did, per model id: shards computed here, seconds, images."""
    computed: dict[int, int] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)
    images: dict[int, int] = field(default_factory=dict)
    assembled: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)


class _Heartbeat:
    """Refreshes this process's claims every `every` s from its own connection (sqlite
    connections are per thread), so other labellers don't take live shards over."""

    def __init__(self, store: HubStore, owner: str, every: float) -> None:
        self.path, self.owner, self.every = store.path, owner, every
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        s = HubStore(self.path)
        try:
            while not self._stop.wait(self.every):
                try:
                    s.heartbeat(self.owner)
                except Exception:  # a busy database must not kill the labeller
                    pass
        finally:
            s.close()

    def __enter__(self) -> "_Heartbeat":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join(timeout=5)


def _node_images(graph: Any, info: ShardInfo) -> list[list[str]]:
    return [list(graph.images.get(n, ())) for n in graph.order[info.start:info.stop]]


def assemble_model(store: HubStore, model_id: int, graph: Any, up: float = UP_DISCOUNT,
                   down: float = DOWN_DISCOUNT) -> bool:
    """Concatenate a fully labelled model's shards into its raw and propagated label
    matrices ([2, H, N], metrics in METRICS order); False if shards are missing/corrupt."""
    h = graph.hash()
    shards = store.shards(model_id, h)
    if not shards or any(s.status != "done" for s in shards):
        return False
    if store.verify_shards(model_id, h):
        return False
    raw = np.concatenate([store.read_array(s.file, s.sha256) for s in shards], axis=2)
    heads = store.heads(model_id)
    if raw.shape != (len(METRICS), len(heads), len(graph)):
        raise HubError(f"model {model_id}: shard arrays have shape {raw.shape}, expected "
                       f"{(len(METRICS), len(heads), len(graph))}: relabel it")
    syn = [x.synset for x in heads]
    prop = np.stack([propagate(raw[k], graph, syn, up, down) for k in range(len(METRICS))])
    params = {"version": LABEL_VERSION, "up": up, "down": down, "metrics": list(METRICS)}
    store.save_label_matrix(model_id, h, "raw", raw, params)
    store.save_label_matrix(model_id, h, "propagated", prop, params)
    return True


def label_models(store: HubStore, model_ids: Sequence[int] | None = None,
                 shard_size: int = DEFAULT_SHARD_SIZE, ray_address: str | None = None,
                 progress: bool = True, *, expert_factory: ExpertFactory | None = None,
                 batch_size: int = 128, stale_after: float = 300.0, heartbeat: float = 30.0,
                 up: float = UP_DISCOUNT, down: float = DOWN_DISCOUNT, wait: bool = True,
                 poll: float = 0.5, force: bool = False, torch_threads: int | None = None
                 ) -> LabelReport:
    """Label the hub's expert models on the current graph (all of them by default).

    Resumable: finished shards are kept; a killed run's claims are taken over (dead pid on
    this host at once, otherwise after `stale_after` s without heartbeat). Several processes
    may run this on the same models: each shard is computed once. `wait`: when the only
    shards left are held by another live labeller, wait for them and assemble (so the call
    returns with every requested model labelled). `force`: relabel labelled models.
    `torch_threads`: torch's intra-op threads while labelling in-process (restored after);
    1 is much faster for small experts on a busy CPU (Ray tasks always use 1)."""
    factory = expert_factory or _default_factory
    graph = store.load_graph()
    gh = graph.hash()
    models = [m for m in store.models("expert") if model_ids is None or m.id in set(model_ids)]
    if model_ids is not None:
        unknown = sorted(set(model_ids) - {m.id for m in models})
        if unknown:
            raise HubError(f"no expert model(s) {unknown} in hub {store.path}")
    missing_syn = {x.synset for m in models for x in store.heads(m.id)
                   if x.synset and graph.canonical(x.synset) is None}
    if missing_syn:
        warnings.warn(f"{len(missing_syn)} head synset(s) are not in the hub graph (refresh it "
                      f"with refresh_graph / `anyclass hub init`): "
                      f"{', '.join(sorted(missing_syn)[:10])}", stacklevel=2)
    report = LabelReport()
    todo = []
    for m in models:
        if not force and store.label_matrix(m.id, graph_hash=gh) is not None:
            report.skipped.append(m.id)
            continue
        if force:
            for s in store.shards(m.id, gh):
                store.reset_shard(m.id, gh, s.shard)
        store.plan_shards(m.id, gh, len(graph), shard_size)
        store.verify_shards(m.id, gh)
        todo.append(m)
    owner = owner_id()
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm
        total = sum(len(store.shards(m.id, gh)) for m in todo)
        done = sum(s.status == "done" for m in todo for s in store.shards(m.id, gh))
        bar = tqdm(total=total, initial=done, desc="hub label", unit="shard")
    import torch
    threads_before = torch.get_num_threads()
    if torch_threads:
        torch.set_num_threads(int(torch_threads))
    try:
        with _Heartbeat(store, owner, heartbeat):
            if ray_address:
                _run_ray(store, graph, todo, factory, ray_address, owner, batch_size,
                         stale_after, report, bar)
            else:
                _run_local(store, graph, todo, factory, owner, batch_size, stale_after,
                           report, bar)
            for m in todo:
                while True:
                    if assemble_model(store, m.id, graph, up, down):
                        report.assembled.append(m.id)
                        break
                    if not wait:
                        break
                    # shards held by another labeller (or reset as corrupt): help or wait
                    if ray_address:
                        _run_ray(store, graph, [m], factory, ray_address, owner, batch_size,
                                 stale_after, report, bar)
                    else:
                        _run_local(store, graph, [m], factory, owner, batch_size,
                                   stale_after, report, bar)
                    if any(s.status != "done" for s in store.shards(m.id, gh)):
                        time.sleep(poll)
    except BaseException:
        store.release_shards(owner)
        raise
    finally:
        torch.set_num_threads(threads_before)
        if bar is not None:
            bar.close()
    return report


def _check_expert(expert: Any, m: Any) -> None:
    if (expert.identity, expert.weights_hash) != (m.identity, m.weights_hash):
        raise HubError(f"model {m.spec!r} now loads other weights than when it was added "
                       f"({expert.weights_hash[:12]} vs {m.weights_hash[:12]}): re-add it")


def _record(store: HubStore, info: ShardInfo, arr: np.ndarray, n_img: int, secs: float,
            owner: str, report: LabelReport, bar: Any) -> None:
    if store.complete_shard(info, arr, owner, secs, n_img):
        mid = info.model_id
        report.computed[mid] = report.computed.get(mid, 0) + 1
        report.seconds[mid] = report.seconds.get(mid, 0.0) + secs
        report.images[mid] = report.images.get(mid, 0) + n_img
        if bar is not None:
            bar.update()


def _run_local(store, graph, models, factory, owner, batch_size, stale_after, report, bar):
    gh = graph.hash()
    for m in models:
        expert = None
        while (info := store.claim_shard(m.id, gh, owner, stale_after)) is not None:
            if expert is None:
                expert = factory(m.spec)
                _check_expert(expert, m)
            t0 = time.perf_counter()
            arr, n_img = score_nodes(expert, _node_images(graph, info), batch_size)
            _record(store, info, arr, n_img, time.perf_counter() - t0, owner, report, bar)


# ---------------------------------------------------------------------------------- Ray

_WORKER_EXPERTS: dict[tuple[Any, str], Any] = {}


def _shard_task(factory: ExpertFactory, spec: str, node_images: list[list[str]],
                batch_size: int) -> tuple[np.ndarray, int, float, str, str]:
    """Runs on a Ray worker: the expert is built once per worker process and reused."""
    import torch
    torch.set_num_threads(1)
    key = (factory, spec)
    if key not in _WORKER_EXPERTS:
        _WORKER_EXPERTS[key] = factory(spec)
    expert = _WORKER_EXPERTS[key]
    t0 = time.perf_counter()
    arr, n = score_nodes(expert, node_images, batch_size)
    return arr, n, time.perf_counter() - t0, expert.identity, expert.weights_hash


def ray_connect(address: str) -> bool:
    """Connect to Ray: "local" starts a local cluster, anything else ("auto", "ray://host:
    10001", "host:6379") connects to one. Returns whether this call started Ray."""
    try:
        import ray
    except ImportError:
        raise HubError("--ray needs the ray package: pip install 'anyclass[ray]'") from None
    if ray.is_initialized():
        return False
    kw: dict[str, Any] = {"log_to_driver": False}
    if address == "local":
        ray.init(include_dashboard=False, **kw)
    else:
        try:
            ray.init(address=address, **kw)
        except Exception as e:
            raise HubError(f"cannot connect to the Ray cluster at {address!r}: "
                           f"{str(e).splitlines()[0]}") from None
    return True


def _run_ray(store, graph, models, factory, address, owner, batch_size, stale_after, report,
             bar):
    import ray
    started = ray_connect(address)
    try:
        task = ray.remote(num_cpus=1)(_shard_task)
        gh = graph.hash()
        slots = max(1, int(ray.cluster_resources().get("CPU", 1)))
        by_id = {m.id: m for m in models}
        queue = [m.id for m in models]
        inflight: dict[Any, ShardInfo] = {}
        factory_ref = ray.put(factory)
        while queue or inflight:
            while queue and len(inflight) < slots:
                info = store.claim_shard(queue[0], gh, owner, stale_after)
                if info is None:
                    queue.pop(0)
                    continue
                ref = task.remote(factory_ref, by_id[info.model_id].spec,
                                  _node_images(graph, info), batch_size)
                inflight[ref] = info
            if not inflight:
                break
            done, _ = ray.wait(list(inflight), num_returns=1)
            info = inflight.pop(done[0])
            arr, n_img, secs, ident, wh = ray.get(done[0])
            m = by_id[info.model_id]
            if (ident, wh) != (m.identity, m.weights_hash):
                raise HubError(f"model {m.spec!r} loads other weights on the Ray workers "
                               f"({wh[:12]} vs {m.weights_hash[:12]}): re-add it")
            _record(store, info, arr, n_img, secs, owner, report, bar)
    finally:
        if started:
            ray.shutdown()


# ---------------------------------------------------------------------------------- graph

def refresh_graph(store: HubStore, images: str | None = "world", extra_synsets: Sequence[str]
                  = (), descendant_depth: int = 1, per_node: int = 8, world: Any = None,
                  progress: bool = False) -> Any:
    """(Re)build the hub's graph from its head synsets (+ `extra_synsets`; with world images,
    + every world concept's synset so world tasks map onto nodes), attach images ("world" or
    a folder path) and make it current. Unchanged graphs keep their hash, so labels stay."""
    from .graph import build_graph
    seeds = list(store.head_synsets()) + list(extra_synsets)
    if images == "world":
        from ..world.build import ensure_world
        world = world or ensure_world(progress=progress)
        seeds += [c.synset for c in world.concepts if c.synset]
    if not seeds:
        raise HubError(f"hub {store.path} has no head synsets yet: add models first")
    graph = build_graph(sorted(set(seeds)), descendant_depth=descendant_depth)
    if images == "world":
        graph.attach_world_images(world, per_node=per_node, progress=progress)
    elif images:
        graph.attach_folder_images(images, per_node=per_node)
    store.save_graph(graph)
    return graph
