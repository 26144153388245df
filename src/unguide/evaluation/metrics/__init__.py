"""Evaluation metrics: object erasure (UnGuide Acc_e/Acc_s/Acc_g/H_o), preservation (SSIM, pixel error,
FID/KID), nudity (NudeNet exposed counts) and CLIP (zero-shot probabilities, CLIP score).

Heavy dependencies (transformers, torchmetrics, nudenet) are imported only when the functions run.
"""

from .clip import clip_score, load_clip, zero_shot_probs
from .erasure import correct_label_probability, erasure_table, harmonic_overall, top1
from .nudity import DEFAULT_THRESHOLD, EXPOSED_CLASSES, detect_exposed, summarise
from .preservation import fid_kid, pixel_error, ssim

__all__ = [
    "clip_score", "load_clip", "zero_shot_probs",
    "correct_label_probability", "erasure_table", "harmonic_overall", "top1",
    "DEFAULT_THRESHOLD", "EXPOSED_CLASSES", "detect_exposed", "summarise",
    "fid_kid", "pixel_error", "ssim",
]
