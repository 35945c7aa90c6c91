"""Quick probe of a built-in model recipe: zero-shot acc1 per task and domain on freshly
rendered test-like images (seeds ≥ 2**33, no world build needed), "a photo of a {}.".

    python benchmarks/recipe_probe.py MODEL_DIR [PER_CLASS]

Used to choose the world v2 recipe (docs/benchmarks.md, "Choosing the recipe"); the reported
numbers come from benchmarks/zeroshot_world.py on the real test splits. The adversarial
column here is unfiltered (the candidates before the world expert's filter).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from anyclass.world.concepts import concept_map
from anyclass.world.config import get_config
from anyclass.world.model import BuiltinModel
from anyclass.world.render import DOMAINS, render_batch
from anyclass.world.tasks import SOURCE_TASK, get_tasks
from anyclass.world.train import _normalise


def main() -> None:
    torch.set_num_threads(1)
    model = BuiltinModel.load(Path(sys.argv[1])).eval()
    per = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    cm, tasks = concept_map(), get_tasks(get_config("full"))
    res: dict[tuple[str, str], float] = {}
    for d in DOMAINS:
        for name, t in tasks.items():
            items = [(cm[cid], 2 ** 33 + 1000 * k + j)
                     for j, cid in enumerate(t.concept_ids) for k in range(per)]
            y = torch.arange(len(t.concept_ids)).repeat_interleave(per)
            x = torch.from_numpy(render_batch(items, d, 64)).permute(0, 3, 1, 2).float() / 255
            with torch.no_grad():
                f = F.normalize(model.visual(_normalise(x)), dim=-1)
                w = F.normalize(model.encode_texts([f"a photo of a {c}." for c in t.classnames]), dim=-1)
            res[(d, name)] = (f @ w.T).argmax(1).eq(y).float().mean().item()
        down = [a for (dd, n), a in res.items() if dd == d and n != SOURCE_TASK]
        print(f"{d:12s} mean over 21 tasks {100 * np.mean(down):5.1f}  "
              f"source {100 * res[(d, SOURCE_TASK)]:5.1f}", flush=True)
    for name in tasks:
        print(f"{name:14s}" + " ".join(f"{100 * res[(d, name)]:5.1f}" for d in DOMAINS))


if __name__ == "__main__":
    main()
