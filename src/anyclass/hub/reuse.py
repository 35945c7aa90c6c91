"""Reuse: run only the selected models, put their heads on one scale, combine, fall back.

Each chosen head contributes z[n, c] = log p_m(h_c | x_n), the log-softmax over ALL heads of
its own model m; classes with no capable head take z[n, c] = log q(c | x_n), the fallback
vision-language model's softmax over the task's classes.

Uncalibrated, the prediction is argmax_c z[n, c]. That is not enough across models: an
expert shown an image of a concept it was never trained on still puts most of its mass on
some head, and a 10-way model's probabilities run higher than a 40-way model's. So by default
the heads are calibrated on the hub's own data — the SDAG node images of the task's classes
(the images model labelling used; never the task's test images):

    score[n, c] = a_c · z[n, c] + b_c + g · log q(c | x_n)
    (a, b, g) = argmin  CE(score on node images I_{v_c}, c) + (ρ/|I|)·(‖a − 1‖² + ‖b‖² + g²)

a_c, b_c put each head on a common scale; g is how much the vision-language model's opinion
counts for every class (0 when no fallback model is configured). ρ (`reg`) shrinks toward the
uncalibrated rule; classes whose node has no images keep a_c = 1, b_c = 0. On the offline
world this lifts the hub's mean acc1 on colour tasks well above the uncalibrated rule
(docs/benchmarks.md, "Expert hub"). Scores are log-scale, usable as logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import AnyclassError
from .select import Selection


def _log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


@dataclass
class Calibration:
    """score = a·z + b + g·log q (module docstring), fitted on node images."""
    a: np.ndarray            # [K]
    b: np.ndarray            # [K]
    g: float
    fitted: np.ndarray       # [K] bool: classes whose node images took part
    images: int              # node images used
    node_acc_before: float   # accuracy on the node images, uncalibrated
    node_acc_after: float

    def summary(self) -> dict:
        return {"images": self.images, "classes_fitted": int(self.fitted.sum()),
                "vlm_weight": round(self.g, 4),
                "node_acc1": [round(self.node_acc_before, 4), round(self.node_acc_after, 4)]}


def class_log_scores(selection: Selection, model_logits: dict[int, np.ndarray],
                     fallback_probs: np.ndarray | None) -> np.ndarray:
    """z [N, K]: the chosen head's log-probability, or log q for fallback classes."""
    K = len(selection.choices)
    fb = selection.fallback
    if fb and fallback_probs is None:
        names = ", ".join(selection.classes[c] for c in fb[:10])
        raise AnyclassError(f"no head in the hub covers {len(fb)} class(es) and no fallback "
                            f"model is configured: {names}")
    N = next(iter(model_logits.values())).shape[0] if model_logits else fallback_probs.shape[0]
    z = np.zeros((N, K), dtype=np.float64)
    logp = {m: _log_softmax(np.asarray(l, dtype=np.float64)) for m, l in model_logits.items()}
    for ch in selection.choices:
        if ch is not None:
            z[:, ch.cls] = logp[ch.model_id][:, ch.head]
    if fb:
        z[:, fb] = _log_q(fallback_probs)[:, fb]
    return np.maximum(z, np.log(1e-12))


def _log_q(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, None))


def combine(selection: Selection, model_logits: dict[int, np.ndarray],
            fallback_probs: np.ndarray | None,
            calibration: Calibration | None = None) -> np.ndarray:
    """[N, K] log-scores from the chosen heads' model logits and the fallback's probabilities
    (columns in task class order; needed for the fallback classes and for g)."""
    z = class_log_scores(selection, model_logits, fallback_probs)
    if calibration is not None:
        cal = calibration
        z = cal.a * z + cal.b
        if cal.g and fallback_probs is not None:
            z = z + cal.g * _log_q(fallback_probs)
    return z.astype(np.float32)


def fit_calibration(z: np.ndarray, y: np.ndarray, log_q: np.ndarray | None = None,
                    fitted: np.ndarray | None = None, reg: float = 1.0,
                    max_iter: int = 200) -> tuple[np.ndarray, np.ndarray, float]:
    """(a, b, g) of the module docstring from node-image scores z [n, K] with class labels y;
    L-BFGS on the penalised cross-entropy (float64). Classes outside `fitted` keep (1, 0)."""
    import torch
    K = z.shape[1]
    mask = torch.ones(K, dtype=torch.float64) if fitted is None else \
        torch.as_tensor(np.asarray(fitted), dtype=torch.float64)
    zt = torch.as_tensor(z, dtype=torch.float64)
    qt = None if log_q is None else torch.as_tensor(log_q, dtype=torch.float64)
    yt = torch.as_tensor(np.asarray(y), dtype=torch.long)
    da = torch.zeros(K, dtype=torch.float64, requires_grad=True)
    db = torch.zeros(K, dtype=torch.float64, requires_grad=True)
    g = torch.zeros(1, dtype=torch.float64, requires_grad=qt is not None)
    params = [da, db] + ([g] if qt is not None else [])
    opt = torch.optim.LBFGS(params, max_iter=max_iter, line_search_fn="strong_wolfe")

    def scores(zz, qq):
        s = (1 + mask * da) * zz + mask * db
        return s + g * qq if qq is not None else s

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(scores(zt, qt), yt) + reg / len(yt) * (
            (mask * da).pow(2).sum() + (mask * db).pow(2).sum() + g.pow(2).sum())
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return ((1 + mask * da).numpy().copy(), (mask * db).numpy().copy(), float(g))


def node_image_set(graph: Any, class_nodes: Sequence[str | None],
                   classnames: Sequence[str]):
    """The hub's images of the task's class nodes as a labelled dataset (label = task class)
    and the mask of classes that have images. Classes sharing a node each get its images: the
    fit then learns that those heads can't tell them apart, and still learns g from them."""
    from ..data.base import LabeledImages
    paths, labels = [], []
    has = np.zeros(len(class_nodes), dtype=bool)
    for c, n in enumerate(class_nodes):
        imgs = graph.images.get(n, []) if n else []
        paths += imgs
        labels += [c] * len(imgs)
        has[c] = bool(imgs)
    return LabeledImages("hub-nodes", paths, labels, list(classnames), "", {}), has


def calibrate(selection: Selection, specs: dict[int, str], graph: Any,
              class_nodes: Sequence[str | None], backbone=None, reg: float = 1.0,
              expert_factory: Callable[[str], object] | None = None,
              progress: bool = False) -> Calibration | None:
    """Fit the head calibration on the node images of the task's classes (None when fewer
    than two classes have images: nothing to calibrate against)."""
    nodes_ds, has = node_image_set(graph, class_nodes, selection.classes)
    if has.sum() < 2:
        return None
    logits, ok = run_selected(selection, specs, nodes_ds, expert_factory, progress)
    q = None
    if backbone is not None:
        q, ok_q = fallback_probabilities(backbone, nodes_ds, selection.classes,
                                         progress=progress)
        ok &= ok_q
    if selection.fallback and q is None:
        return None
    y = np.asarray(nodes_ds.labels)[ok]
    z = class_log_scores(selection, logits, q)[ok]
    lq = None if q is None else _log_q(q)[ok]
    a, b, g = fit_calibration(z, y, lq, has, reg)
    after = a * z + b + (g * lq if lq is not None else 0.0)
    return Calibration(a, b, g, has, int(ok.sum()), float((z.argmax(1) == y).mean()),
                       float((after.argmax(1) == y).mean()))


def hub_scores(selection: Selection, specs: dict[int, str], dataset, graph: Any = None,
               class_nodes: Sequence[str | None] | None = None, backbone=None,
               calibrated: bool = True, reg: float = 1.0,
               expert_factory: Callable[[str], object] | None = None,
               progress: bool = False) -> tuple[np.ndarray, np.ndarray, Calibration | None]:
    """Everything reuse does for one task: run the selected models (and the fallback model
    when some class needs it or calibration weighs it in), calibrate on node images, combine.
    Returns log-scores [N, K], the valid-row mask and the calibration (None = uncalibrated)."""
    logits, valid = run_selected(selection, specs, dataset, expert_factory, progress)
    cal = None
    if calibrated and graph is not None and class_nodes is not None:
        cal = calibrate(selection, specs, graph, class_nodes, backbone, reg, expert_factory,
                        progress)
    q = None
    if backbone is not None and (selection.fallback or (cal is not None and cal.g)):
        q, ok = fallback_probabilities(backbone, dataset, selection.classes,
                                       progress=progress)
        valid &= ok
    return combine(selection, logits, q, cal), valid, cal


def run_selected(selection: Selection, specs: dict[int, str], dataset,
                 expert_factory: Callable[[str], object] | None = None,
                 progress: bool = False) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Logits of every selected model on `dataset` (cached on disk), and the rows valid in
    all of them (unreadable images are warned about and dropped)."""
    from .experts import create_expert, expert_logits
    factory = expert_factory or create_expert
    out: dict[int, np.ndarray] = {}
    valid = np.ones(len(dataset), dtype=bool)
    for m in selection.models:                       # only the chosen models run
        logits, ok = expert_logits(factory(specs[m]), dataset, progress=progress,
                                   with_valid=True)
        out[m] = np.asarray(logits)
        valid &= np.asarray(ok, dtype=bool)
    return out, valid


def fallback_probabilities(backbone, dataset, classnames: Sequence[str],
                           templates: str = "single", progress: bool = False
                           ) -> tuple[np.ndarray, np.ndarray]:
    """The vision-language fallback: zero-shot softmax over the task's classes."""
    import torch

    from ..data.templates import get_templates
    from ..features.extract import extract_features
    from ..methods.classifier import build_text_classifier
    feats = extract_features(backbone, dataset, progress=progress)
    W = build_text_classifier(backbone, list(classnames), get_templates(templates), None)
    f = torch.from_numpy(np.array(feats.features, dtype=np.float32)).to(W.device)
    logits = float(backbone.logit_scale) * (f @ W.float())
    return torch.softmax(logits, dim=1).cpu().numpy(), np.asarray(feats.valid, dtype=bool)
