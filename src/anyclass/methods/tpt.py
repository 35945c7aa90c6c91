"""TPT (Shu et al., NeurIPS 2022): test-time prompt tuning by marginal entropy.

Per test image: V = 64 views (the image + 63 random resized crops/flips; AugMix on top for
fine-grained sets, `augmix=True`), keep the ρ = 10 % lowest-entropy views S, and take one
AdamW step (lr 5e-3, weight decay 0.01) on the text context v:

    v* = v − lr · AdamW(∇_v H(p̄)),   p̄ = 1/|S| Σ_{x'∈S} softmax(s · f(x') t(v)ᵀ)

then predict the image itself with t(v*); v is reset for the next image. Starts from the
hand-written "a photo of a" (4 learned words) or a CoOp/MaPLe prompt file (`init`). Only the
text side is tuned (from a MaPLe file, its visual prompts stay at the file's values), so the
64 view features are encoded once per image.
"""
from __future__ import annotations

from . import METHODS
from .tta import TestTimeMethod


@METHODS.register("tpt")
class TPT(TestTimeMethod):
    tunes_vision = False
    augments_fine_grained = True
