"""Labelled feature sets for fitting: a split's features (valid rows), and Tip-Adapter's
cache keys averaged over seeded augmented passes."""
from __future__ import annotations

import numpy as np
import torch

from ..features.extract import extract_features
from ..methods import FeatureSet


#: train splits up to this size are extracted whole per augmented pass (one cache entry per
#: pass, shared by every shots/seed); larger ones only their few-shot sample (ImageNet-size
#: train splits would otherwise cost 10 full extractions).
AUG_FULL_SPLIT_MAX = 50_000


def featureset(feats, classnames: list[str] | None = None) -> FeatureSet:
    """Valid rows only (unreadable images were warned about and are not scored)."""
    valid = np.asarray(feats.valid, dtype=bool)
    return FeatureSet(torch.from_numpy(np.array(feats.features[valid], dtype=np.float32)),
                      torch.from_numpy(np.asarray(feats.labels)[valid].astype(np.int64)),
                      classnames=classnames)


def augmented_train(backbone, full, idx: list[int], passes: int, augment: str,
                     ext: dict) -> FeatureSet:
    """Tip-Adapter's cache keys: the sample's features over `passes` seeded augmented
    passes, averaged and re-normalised; the passes are kept as `views`. An image unreadable
    in any pass is dropped (it was warned about)."""
    # canonical row order (sorted paths): the augmentation of an image is seeded by its row,
    # so it must not depend on class order or listing order
    whole = len(full) <= AUG_FULL_SPLIT_MAX
    rows_of = np.asarray(idx if not whole else range(len(full)), dtype=np.int64)
    order = rows_of[np.argsort(np.asarray([full.paths[i] for i in rows_of], dtype=object),
                               kind="stable")]
    canon = full.subset(order.tolist())
    pos = np.empty(len(full), dtype=np.int64)
    pos[order] = np.arange(len(order))
    rows = pos[np.asarray(idx, dtype=np.int64)].tolist()
    per = [extract_features(backbone, canon, augment=augment, aug_pass=p, **ext).subset(rows)
           for p in range(passes)]
    valid = np.logical_and.reduce([np.asarray(x.valid, dtype=bool) for x in per])
    views = torch.stack([torch.from_numpy(np.array(x.features[valid], dtype=np.float32))
                         for x in per])                               # [P, N, D]
    mean = views.mean(0)
    feats = mean / mean.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    labels = torch.from_numpy(np.asarray(per[0].labels)[valid].astype(np.int64))
    return FeatureSet(feats, labels, views, list(full.classnames))
