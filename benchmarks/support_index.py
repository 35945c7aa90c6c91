"""SuS retrieval: pool index build and query times, exact vs FAISS, retrieval precision.

    ANYCLASS_HOME=/tmp/ac-exp ANYCLASS_WORLD=full python benchmarks/support_index.py \
        [--skip-world] [--skip-synthetic] [--n 200000] [--dim 512] [--queries 1000]

World part (built-in backbone, the world's pool of unlabelled colour renders):
  * pool render time (first run only), index build time (embedding, uncached then cached),
  * query time of every task's classes at once, exact search, de-duplicated top-M,
  * retrieval precision per task: the share of retrieved images rendered from the class's
    own concept (the pool's concept of each file is known to the benchmark, never to
    retrieval), for M = 4, 8, 16. With P renders per concept in the pool, M > P caps it at P/M.
Synthetic part: N x D random unit vectors, Q queries, top-k; exact chunked matmul vs FAISS
IndexFlatIP (same results required) vs IVF-Flat (recall@k against exact reported).
Writes runs/support_index.json and prints a markdown summary.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "runs" / "support_index.json"


def world_part(ms: tuple[int, ...] = (4, 8, 16)) -> dict:
    from anyclass.backbones.factory import create_backbone
    from anyclass.support import build_index, load_pool
    from anyclass.support.retrieve import class_queries, class_sentences, retrieve_dedup
    from anyclass.world.build import ensure_world
    from anyclass.world.pool import _plan, PER_CONCEPT, pool_dir

    world = ensure_world()
    res: dict = {"world": world.cfg.key()}
    fresh = not (pool_dir(world) / "DONE.json").exists()
    t = time.perf_counter()
    pool = load_pool("world:pool", progress=False)
    res["pool_images"] = len(pool)
    res["pool_per_concept"] = PER_CONCEPT.get(world.cfg.name, 8)
    res["pool_render_s" if fresh else "pool_open_s"] = round(time.perf_counter() - t, 2)
    bb = create_backbone("builtin", "cpu")
    t = time.perf_counter()
    index = build_index(bb, pool, progress=False)
    first = time.perf_counter() - t
    t = time.perf_counter()
    index = build_index(bb, pool, progress=False)
    res["index_cached_s"] = round(time.perf_counter() - t, 3)
    res["index_first_s"] = round(first, 2)   # embedding, unless an earlier run cached it
    res["index_dim"] = int(index.features.shape[1])
    concept_of = {str(pool_dir(world) / name): c.id for c, _, name in
                  _plan(world, res["pool_per_concept"])}
    row_concept = np.array([concept_of[p] for p in pool.paths])
    all_names, all_ids, per_task = [], [], {}
    from anyclass.world.tasks import SOURCE_TASK
    for name, t_ in world.tasks.items():
        if name == SOURCE_TASK:
            continue                      # the 21 downstream tasks, as in the tables
        per_task[name] = (t_.classnames, t_.concept_ids)
        all_names += t_.classnames
        all_ids += t_.concept_ids
    uniq = list(dict.fromkeys(all_names))
    t = time.perf_counter()
    q_all = class_queries(bb, class_sentences(uniq, "photo", None))
    res["text_queries"] = len(uniq)
    res["text_encode_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    index.search(q_all, 64, "exact")
    res["search_all_classes_top64_exact_s"] = round(time.perf_counter() - t, 4)
    prec: dict = {}
    for M in ms:
        rows_prec, query_s = {}, 0.0
        for name, (cnames, cids) in per_task.items():
            q = q_all[[uniq.index(c) for c in cnames]]
            t = time.perf_counter()
            rows, _ = retrieve_dedup(index, q, M, "exact")
            query_s += time.perf_counter() - t
            hits = sum(int((row_concept[r] == cid).sum()) for r, cid in zip(rows, cids))
            got = sum(len(r) for r in rows)
            rows_prec[name] = round(hits / max(got, 1), 4)
        prec[M] = {"mean": round(float(np.mean(list(rows_prec.values()))), 4),
                   "ceiling": round(min(1.0, res["pool_per_concept"] / M), 4),
                   "retrieve_all_tasks_s": round(query_s, 3), "per_task": rows_prec}
    res["precision"] = prec
    return res


def _clustered(n: int, dim: int, nq: int, rng, spread: float = 0.8
               ) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors in n // 100 clusters (real embeddings cluster; uniform random vectors
    in 512-d have no near neighbours at all, the worst case for IVF); queries are
    perturbed cluster centres, like a text query near a concept's images."""
    c = rng.standard_normal((max(1, n // 100), dim), dtype=np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = c[rng.integers(0, len(c), n)] + rng.standard_normal((n, dim), dtype=np.float32) \
        * np.float32(spread / np.sqrt(dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = c[rng.integers(0, len(c), nq)] + rng.standard_normal((nq, dim), dtype=np.float32) \
        * np.float32(spread / np.sqrt(dim))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return x, q


def _best_of(fn, reps: int = 3) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def synthetic_part(n: int, dim: int, nq: int, k: int, nprobes: list[int],
                   spread: float = 0.8) -> dict:
    import torch
    from anyclass.support.index import PoolIndex
    from anyclass.support.pools import Pool
    x, q = _clustered(n, dim, nq, np.random.default_rng(0), spread)
    pool = Pool("synthetic", [str(i) for i in range(n)])
    valid = np.ones(n, bool)
    res: dict = {"n": n, "dim": dim, "queries": nq, "k": k, "data": f"n/100 clusters, noise norm {spread}",
                 "threads": torch.get_num_threads()}
    exact = PoolIndex(pool, x, valid, f"synthetic-{n}-{dim}")
    t, (s0, i0) = _best_of(lambda: exact.search(q, k, "exact"))
    res["exact_query_s"] = round(t, 3)
    flat = PoolIndex(pool, x, valid, f"synthetic-{n}-{dim}", faiss_threshold=0)
    t, _ = _best_of(lambda: flat._faiss_index("faiss-flat"), 1)
    res["faiss_flat_build_s"] = round(t, 3)
    t, (s1, i1) = _best_of(lambda: flat.search(q, k, "faiss"))
    res["faiss_flat_query_s"] = round(t, 3)
    res["faiss_flat_same_topk"] = bool(np.array_equal(i0, i1))
    res["faiss_flat_topk_rows_equal_frac"] = round(float((i0 == i1).mean()), 6)
    res["faiss_flat_same_sets"] = all(set(a) == set(b) for a, b in zip(i0, i1))
    res["faiss_flat_max_score_diff"] = float(np.abs(s0 - s1).max())
    del flat
    ivf = PoolIndex(pool, x, valid, f"synthetic-{n}-{dim}-bench", faiss_threshold=0,
                    ivf_threshold=0)
    nlist = max(1, int(4 * np.sqrt(n)))
    ivf._ivf_path(nlist).unlink(missing_ok=True)
    t, _ = _best_of(lambda: ivf._faiss_index("faiss-ivf"), 1)
    res["faiss_ivf_build_s"] = round(t, 3)
    res["faiss_ivf_nlist"] = nlist
    res["faiss_ivf"] = {}
    for npb in nprobes:
        ivf._faiss.nprobe = min(npb, nlist)
        t, (s2, i2) = _best_of(lambda: ivf._faiss_search(q, k, "faiss-ivf"))
        rec = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(i0, i2)]))
        res["faiss_ivf"][npb] = {"query_s": round(t, 3), "recall_at_k": round(rec, 4)}
    ivf._ivf_path(nlist).unlink(missing_ok=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-world", action="store_true")
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--spread", type=float, default=0.8, help="cluster noise norm")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    res = {"machine": machine()}
    if not a.skip_world:
        res["world"] = world_part()
    if not a.skip_synthetic:
        res["synthetic"] = synthetic_part(a.n, a.dim, a.queries, a.k, a.nprobe,
                                          a.spread)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
