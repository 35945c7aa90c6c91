"""The adversarial domain: hard natural images filtered to fool an independent model, as
ImageNet-A keeps the photos a ResNet-50 gets wrong.

For every (task, split, class) we render `CANDIDATES_PER_IMAGE` times the images the split
needs in the "adversarial" style (small, off-centre, cluttered, occluded, low-contrast
colour scenes; `render.py`), classify each with the world expert `ADVERSARIAL_FILTER`
(trained on colour renders of every task concept; never the built-in model) and keep, per
class, candidates the expert gets wrong — ImageNet-A's rule: any image the ResNet-50
misclassifies, not the most confidently misclassified ones — taken in seed order; where too
few fool it, the ones with the lowest probability of their own concept fill up. The
expert runs in float64 and its probabilities are rounded to 1e-6 before the comparison, so
the selection is the same on every machine and thread count.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

from .render import TASK_SEED_BASE, render_batch

CANDIDATES_PER_IMAGE = 3
#: bump when the selection rule or the candidates change (stored splits are then re-selected)
RULE = f"misclassified-first/{CANDIDATES_PER_IMAGE}"


def candidate_seed(cfg, task: str, split: str, concept_id: str, k: int) -> int:
    """Seed of the k-th adversarial candidate (a hash tagged "adversarial", ≥ 2**32)."""
    h = hashlib.sha256(f"{cfg.seed}|adversarial|{task}|{split}|{concept_id}|{k}".encode()).digest()
    return TASK_SEED_BASE + int.from_bytes(h[:7], "big")


@torch.no_grad()
def true_class_prob(world, images: np.ndarray, concept_ids: list[str],
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The filter expert's probability of each image's own concept ([N] float64, rounded)
    and whether its top-1 is that concept ([N] bool)."""
    from .experts import ADVERSARIAL_FILTER, _normalise, load_world_expert_net
    net, meta, _ = load_world_expert_net(ADVERSARIAL_FILTER, world)
    net = net.double()
    col = {cid: j for j, cid in enumerate(meta["concept_ids"])}
    missing = sorted({c for c in concept_ids if c not in col})
    if missing:
        raise RuntimeError(f"adversarial filter expert lacks concepts {missing[:5]}")
    idx = torch.tensor([col[c] for c in concept_ids])
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    out, top = [], []
    size = int(meta["arch"]["input_size"])
    for s in range(0, len(x), 512):
        xb = _normalise(x[s:s + 512]).double()
        if xb.shape[-1] != size:
            xb = F.interpolate(xb, size=(size, size), mode="bilinear", align_corners=False,
                               antialias=True)
        p = net(xb).softmax(-1)
        out.append(p.gather(1, idx[s:s + 512, None])[:, 0])
        p = torch.round(p * 1e6) / 1e6
        own = p.gather(1, idx[s:s + 512, None])
        top.append((p > own).sum(1) == 0)        # no other concept scores higher
    return np.round(torch.cat(out).numpy(), 6), torch.cat(top).numpy()


def select(world, spec, per_split: dict[str, int], progress: bool = False
           ) -> dict[str, list[tuple[str, int, np.ndarray, float, bool]]]:
    """split → [(concept id, seed, image, score, expert right)] of the kept images, class by
    class in label order, `per_split[split]` per class."""
    from .concepts import concept_map
    by_id = concept_map(world.concepts)
    out: dict[str, list] = {}
    for split, n in per_split.items():
        plan = [(cid, candidate_seed(world.cfg, spec.name, split, cid, k))
                for cid in spec.concept_ids for k in range(n * CANDIDATES_PER_IMAGE)]
        imgs = render_batch([(by_id[c], s) for c, s in plan], "adversarial",
                            world.cfg.image_size, progress=progress)
        score, right = true_class_prob(world, imgs, [c for c, _ in plan], progress)
        rows = []
        m = n * CANDIDATES_PER_IMAGE
        for j in range(len(spec.concept_ids)):
            block = range(j * m, (j + 1) * m)
            keep = sorted(block, key=lambda i: (bool(right[i]), score[i] if right[i] else 0.0,
                                                plan[i][1]))[:n]
            rows += [(plan[i][0], plan[i][1], imgs[i], float(score[i]), bool(right[i]))
                     for i in keep]
        out[split] = rows
    return out
