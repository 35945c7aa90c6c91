"""Classification metrics with CLIP_benchmark's keys: acc1, acc5, mean_per_class_recall."""
from __future__ import annotations

import torch


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose label is among the k highest logits (k capped at K)."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return (top == labels[:, None]).any(dim=1).float().mean().item()


def mean_per_class_recall(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Balanced accuracy: mean over classes present in `labels` of per-class recall."""
    K = logits.shape[1]
    pred = logits.argmax(dim=1)
    n = torch.bincount(labels, minlength=K).float()
    hit = torch.bincount(labels[pred == labels], minlength=K).float()
    present = n > 0
    return (hit[present] / n[present]).mean().item()


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    labels = labels.long()
    return {"acc1": topk_accuracy(logits, labels, 1), "acc5": topk_accuracy(logits, labels, 5),
            "mean_per_class_recall": mean_per_class_recall(logits, labels)}
