"""Class queries and de-duplicated top-M retrieval.

Queries. "photo": the text embedding of "A photo of a {}." (SuS's photo strategy).
"cupl": the class's description sentences, each embedded and normalised, averaged and
re-normalised: one query per class, the class vector of a CuPL zero-shot classifier. (One
query per sentence would let a single odd sentence pull in off-class images; the mean ranks
images by how typical they are of all the sentences at once.)

De-duplication. Each class retrieves its top C candidates (C = expand x M to start). All
(class, image, cosine) candidate pairs are taken in descending cosine order; a pair is kept
when its image is still free and its class holds fewer than M. So an image goes to the
class whose query scores it highest among the classes that still need images, and a class
whose best images were claimed refills from its next candidates. A class left short widens
its candidate list (x4) and the assignment is redone, until every class is full or the
candidates cover the whole pool. Ties break by class then row, so results are deterministic.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..errors import AnyclassError

PHOTO_TEMPLATE = "A photo of a {}."


def class_sentences(classnames: Sequence[str], prompts: str,
                    descriptions: dict[str, list[str]] | None) -> list[list[str]]:
    """The prompt sentences of each class for a prompt strategy."""
    if prompts == "photo":
        return [[PHOTO_TEMPLATE.format(c)] for c in classnames]
    if prompts == "cupl":
        if not descriptions:
            raise AnyclassError("prompt strategy 'cupl' needs class descriptions "
                                "(--descriptions FILE, JSON {class: [sentences]})")
        missing = [c for c in classnames if not descriptions.get(c)]
        if missing:
            raise AnyclassError("no description sentences for class(es): "
                                + ", ".join(repr(m) for m in missing[:5]))
        return [list(descriptions[c]) for c in classnames]
    raise AnyclassError(f"unknown prompt strategy {prompts!r} (photo or cupl)")


@torch.no_grad()
def class_queries(backbone, sentences: list[list[str]], batch_size: int = 256) -> np.ndarray:
    """q_k = normalise(mean_s normalise(enc(s))) over class k's sentences -> [K, D]."""
    texts = [s for ss in sentences for s in ss]
    owner = torch.tensor([k for k, ss in enumerate(sentences) for _ in ss])
    emb = torch.cat([backbone.encode_texts(texts[i:i + batch_size]).float().cpu()
                     for i in range(0, len(texts), batch_size)])
    emb = torch.nn.functional.normalize(emb, dim=-1)
    sums = torch.zeros(len(sentences), emb.shape[1]).index_add_(0, owner, emb)
    return torch.nn.functional.normalize(sums, dim=-1).numpy()


def greedy_assign(scores: np.ndarray, ids: np.ndarray, per_class: int
                  ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Assign candidate rows to classes (see module docstring).

    scores, ids: [K, C] candidate cosines and pool rows per class (ids < 0: no candidate).
    Returns per class the kept rows and their cosines, best first.
    """
    K, C = ids.shape
    cls = np.repeat(np.arange(K), C)
    s, r = scores.reshape(-1), ids.reshape(-1)
    ok = (r >= 0) & np.isfinite(s)
    cls, s, r = cls[ok], s[ok], r[ok]
    order = np.lexsort((r, cls, -s))            # cosine desc, then class, then row
    taken: set[int] = set()
    rows: list[list[int]] = [[] for _ in range(K)]
    sc: list[list[float]] = [[] for _ in range(K)]
    open_ = K
    for j in order.tolist():                    # sequential by nature; stops when all full
        k, row = int(cls[j]), int(r[j])
        if row in taken or len(rows[k]) >= per_class:
            continue
        taken.add(row)
        rows[k].append(row)
        sc[k].append(float(s[j]))
        if len(rows[k]) == per_class:
            open_ -= 1
            if open_ == 0:
                break
    return ([np.asarray(x, np.int64) for x in rows], [np.asarray(x, np.float32) for x in sc])


def retrieve_dedup(index, queries: np.ndarray, per_class: int, method: str = "auto",
                   expand: int = 4) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Top `per_class` pool rows per query, no row in two classes (module docstring)."""
    n = index.n_valid
    K = len(queries)
    c = min(n, max(per_class * expand, per_class + K))
    while True:
        scores, ids = index.search(queries, c, method)
        rows, sc = greedy_assign(scores, ids, per_class)
        short = any(len(x) < per_class for x in rows)
        if not short or c >= n:
            return rows, sc
        c = min(n, c * 4)
