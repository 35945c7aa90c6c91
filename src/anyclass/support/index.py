"""A pool's image-embedding index and top-k search over it.

Embedding reuses features/extract.py on the pool wrapped as a dataset with dummy labels: one
code path for batching, bad-file warnings, resume after interruption, checksums and the
cache key (backbone identity + weights hash, preprocess, file list with sizes and mtimes).
So a pool is embedded once per backbone and every later task only runs text queries.

Search is exact by default: one matmul per chunk of pool rows, a running top-k merged across
chunks (memory ~ queries x chunk; the cached features stay memory-mapped). FAISS (when
installed) answers for pools of at least `faiss_threshold` readable rows: IndexFlatIP
(exact, the same top-k as the matmul) below `ivf_threshold`, IVF-Flat (approximate,
`nprobe` of 4*sqrt(N) lists visited, trained once and cached on disk) from it. Measured on
2 CPU cores (docs/benchmarks.md) a flat FAISS index is no faster than the matmul (both are
one BLAS product) and needs the whole pool in RAM, so "auto" only turns to FAISS where IVF
pays: from 1M images.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import AnyclassError
from .pools import Pool

log = logging.getLogger("anyclass.support")

#: pools at least this large go to FAISS when it is installed ("auto")
FAISS_THRESHOLD = 1_000_000
#: FAISS pools at least this large use an IVF index (approximate) instead of a flat one
IVF_THRESHOLD = 1_000_000
EXACT_CHUNK = 65_536


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def exact_topk(queries: np.ndarray | torch.Tensor, feats: np.ndarray,
               valid: np.ndarray | None, k: int, chunk: int = EXACT_CHUNK
               ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner products of each query against the rows of `feats` (invalid rows never
    returned). Returns (scores [Q,k'], row ids [Q,k']) sorted best first, k' = min(k, valid)."""
    q = torch.as_tensor(np.asarray(queries, dtype=np.float32))
    n = len(feats)
    n_valid = n if valid is None else int(np.count_nonzero(valid))
    k = min(int(k), n_valid)
    best_s = torch.full((len(q), 0), -math.inf)
    best_i = torch.zeros((len(q), 0), dtype=torch.long)
    if k <= 0:
        return best_s.numpy(), best_i.numpy()
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        f = torch.from_numpy(np.array(feats[lo:hi], dtype=np.float32))  # copy: memmap is read-only
        s = q @ f.T                                                   # [Q, c] cosines
        if valid is not None:
            s[:, ~torch.from_numpy(np.asarray(valid[lo:hi], dtype=bool))] = -math.inf
        ts, ti = s.topk(min(k, hi - lo), dim=1)
        best_s = torch.cat([best_s, ts], 1)
        best_i = torch.cat([best_i, ti + lo], 1)
        if best_s.shape[1] > k:
            best_s, j = best_s.topk(k, dim=1)
            best_i = best_i.gather(1, j)
    return best_s.numpy(), best_i.numpy()


@dataclass
class PoolIndex:
    """Embeddings of a pool (row i <-> pool.paths[i]) and the search over them."""

    pool: Pool
    features: np.ndarray           # [N, D] float32, unit rows (zero where invalid)
    valid: np.ndarray              # bool [N]: the file could be decoded
    key: str                       # the feature-cache key (what produced the embeddings)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    faiss_threshold: int = FAISS_THRESHOLD
    ivf_threshold: int = IVF_THRESHOLD
    nprobe: int = 64
    _faiss: object = field(default=None, repr=False)
    _faiss_rows: np.ndarray | None = field(default=None, repr=False)
    _faiss_how: str = field(default="", repr=False)

    def __len__(self) -> int:
        return len(self.features)

    @property
    def n_valid(self) -> int:
        return int(np.count_nonzero(self.valid))

    def method_for(self, method: str = "auto") -> str:
        """"exact", "faiss-flat" or "faiss-ivf" for `method` in auto|exact|faiss."""
        if method not in ("auto", "exact", "faiss"):
            raise AnyclassError(f"unknown search method {method!r} (auto, exact or faiss)")
        if method == "exact" or (method == "auto" and (self.n_valid < self.faiss_threshold
                                                       or not faiss_available())):
            return "exact"
        if not faiss_available():
            raise AnyclassError("search method 'faiss' needs the faiss package "
                                "(pip install faiss-cpu)")
        return "faiss-ivf" if self.n_valid >= self.ivf_threshold else "faiss-flat"

    def search(self, queries: np.ndarray | torch.Tensor, k: int, method: str = "auto"
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k pool rows per query: (cosines [Q,k'], row ids [Q,k']), best first."""
        how = self.method_for(method)
        if how == "exact":
            return exact_topk(queries, self.features, self.valid, k)
        return self._faiss_search(np.asarray(queries, dtype=np.float32), k, how)

    # ------------------------------------------------------------------ faiss
    def _faiss_index(self, how: str):
        if self._faiss is not None and self._faiss_how == how:
            return self._faiss
        import faiss
        rows = np.flatnonzero(self.valid)
        x = np.ascontiguousarray(self.features[rows], dtype=np.float32)
        d = x.shape[1]
        if how == "faiss-flat":
            index = faiss.IndexFlatIP(d)
        else:
            nlist = max(1, int(4 * math.sqrt(len(x))))
            path = self._ivf_path(nlist)
            if path.exists():
                index = faiss.read_index(str(path))
            else:
                index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist,
                                           faiss.METRIC_INNER_PRODUCT)
                rng = np.random.default_rng(0)
                # k-means on a sample: FAISS wants >= 39 points per list
                train = x[rng.choice(len(x), min(len(x), 64 * nlist), replace=False)]
                index.train(train)
                index.add(x)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                faiss.write_index(index, str(tmp))
                os.replace(tmp, path)
            index.nprobe = min(self.nprobe, nlist)
            self._faiss, self._faiss_rows, self._faiss_how = index, rows, how
            return index
        index.add(x)
        self._faiss, self._faiss_rows, self._faiss_how = index, rows, how
        return index

    def _ivf_path(self, nlist: int):
        from ..paths import home
        d = home() / "support" / "index"
        d.mkdir(parents=True, exist_ok=True)
        return d / f"{self.key}-ivf{nlist}.faiss"

    def _faiss_search(self, q: np.ndarray, k: int, how: str) -> tuple[np.ndarray, np.ndarray]:
        index = self._faiss_index(how)
        k = min(int(k), self.n_valid)
        if k <= 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        s, i = index.search(np.ascontiguousarray(q), k)
        ok = i >= 0  # IVF may find fewer than k
        rows = np.where(ok, self._faiss_rows[np.where(ok, i, 0)], -1)
        return np.where(ok, s, -np.inf).astype(np.float32), rows.astype(np.int64)


def build_index(backbone, pool: Pool, batch_size: int = 256, num_workers: int | None = None,
                progress: bool = True, **search_opts) -> PoolIndex:
    """Embed the pool with the backbone (cached; see module docstring)."""
    from ..features.extract import extract_features
    feats = extract_features(backbone, pool.as_dataset(), batch_size=batch_size,
                             num_workers=num_workers, progress=progress)
    return PoolIndex(pool, feats.features, feats.valid, feats.key, feats.skipped,
                     **search_opts)
