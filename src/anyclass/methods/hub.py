"""`hub`: Model Label Learning reuse — select heads from the expert hub for the task's class
names (CHCO, hub/select.py), run only the chosen models, combine (hub/reuse.py).

Image-level: it runs its own models on images, so `anyclass eval` dispatches it to
eval/image_level.py instead of feeding it backbone features.
"""
from __future__ import annotations

from . import METHODS
from .base import FeatureMethod


@METHODS.register("hub")
class HubMethod(FeatureMethod):
    needs_train = False
    image_level = True

    def __init__(self, hub: str | None = None, max_models: int | None = 8,
                 solver: str = "auto", lam: float = 1.0, mu: float = 0.0,
                 min_utility: float = 0.02, top_k: int = 20,
                 fallback: str | None = "builtin", overrides: str | None = None,
                 semantic: float = 0.3, calibrate: bool = True,
                 calibration_reg: float = 1.0) -> None:
        self.hub = hub                    # hub file; None = the offline world's hub
        self.max_models = max_models      # B: at most this many models run per task
        self.solver = solver              # auto | milp | greedy
        self.lam = lam                    # λ: penalty for firing on the task's other classes
        self.mu = mu                      # μ: cost weight (per million parameters)
        self.min_utility = min_utility    # below this a class goes to the fallback
        self.top_k = top_k                # candidate heads per class
        self.fallback = fallback          # vision-language backbone spec, or None
        self.overrides = overrides        # class name -> synset override file
        self.semantic = semantic          # ν: prior for a head named for the class's synset
        self.calibrate = calibrate        # fit a, b, g on the task's node images (hub/reuse.py)
        self.calibration_reg = calibration_reg   # ρ: shrinkage toward the uncalibrated rule
