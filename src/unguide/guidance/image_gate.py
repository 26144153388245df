"""The image gate: decide on what is drawn, not on the prompt's words.

A prompt gate (:mod:`unguide.guidance.unguidance`) reads the prompt; an attacker's words, or a concept's unseen words, can sit
under it and the base model then draws the concept. The image gate looks at the finished latent instead. Its detector
is the base model's own conditional denoiser used as a zero-shot classifier (diffusion classifier, Li et al. 2023,
arXiv 2303.16203): the latent x0 is re-noised at a few fixed timesteps, x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, and the
denoiser's error ||eps - eps_base(x_t, t, c)||^2 is measured for each candidate prompt c with the same (t, eps) draws,
so the comparison is low-variance. The score of an image is

    log min_c in concept e(c)  -  log min_c in anchors e(c)       (< 0: the concept's prompts explain it better)

over the concept's own prompts (target and trained synonyms) and the run's anchors (the prompts it was trained to
keep, the empty prompt among them). It needs no extra model and works the same on any diffusers UNet (a v-predicting
one's output is converted to noise first).

The threshold is calibrated at the end of erasure on the base model's own generations of the concept's prompts and of
the anchors (never on evaluation prompts) and stored in the run beside the prompt gate's:
``threshold = high_concept + position * (low_anchor - high_concept)``, with ``high_concept`` a high quantile of the
concept images' scores and ``low_anchor`` a low quantile of the anchor images' (quantiles, not extremes, so one
badly drawn calibration image does not move the gate).

What a flagged image becomes is the guide's business (:class:`unguide.guidance.unguidance.UnGuide`): it is redrawn from the same
noise with the erasure.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import UnguideError
from .config import CALIBRATION_SAMPLES
from ..sampling.ddim import model_output

LOG = logging.getLogger("unguide")  # the CLI shows INFO lines; a library caller can silence them


@dataclass(frozen=True)
class DetectorConfig:
    """The diffusion classifier's settings. Defaults: two mid-range timesteps, one noise draw each (2 UNet evals per
    candidate prompt and image), candidates = the concept's prompts and the run's first ``anchors`` anchors. (Four
    timesteps, (200, 400, 600, 800), separated fresh words better; not adopted until benchmarked: docs/findings.)"""

    timesteps: tuple = (400, 600)
    draws: int = 1  # noise draws per timestep
    anchors: int = 9  # anchor prompts used as candidates (the run's first ones; "" always among them)
    seed: int = 0
    batch_size: int = 64

    def __post_init__(self):
        if not self.timesteps or any(not 0 < int(t) < 1000 for t in self.timesteps):
            raise UnguideError(f"detector timesteps {self.timesteps} must lie in (0, 1000)")
        if self.draws < 1 or self.anchors < 1 or self.batch_size < 1:
            raise UnguideError("detector draws, anchors and batch_size must be >= 1")

    def evals_per_image(self, candidates: int) -> int:
        return len(self.timesteps) * self.draws * candidates


def candidate_prompts(concept_prompts: Sequence[str], anchors: Sequence[str], cfg: DetectorConfig) -> tuple[list, list]:
    """(concept candidates, anchor candidates): the anchors cut to ``cfg.anchors``, with "" always among them."""
    concept = list(dict.fromkeys(concept_prompts))
    kept = [a for a in dict.fromkeys(anchors) if a not in concept]
    chosen = kept[:cfg.anchors]
    if "" not in chosen:
        chosen = chosen[:cfg.anchors - 1] + [""] if cfg.anchors > 1 else [""]
    return concept, chosen


@torch.no_grad()
def detector_scores(bundle, adapter, latents: torch.Tensor, seeds: Sequence[int], concept: Sequence[str],
                    anchors: Sequence[str], cfg: DetectorConfig = DetectorConfig()) -> torch.Tensor:
    """The score of each finished latent (lower: more like the concept); the base model judges (adapter off).
    The (t, eps) draws of an image depend on its seed alone, so its score never depends on its batch-mates."""
    errors = detector_errors(bundle, adapter, latents, seeds, list(concept) + list(anchors), cfg)
    return score_from_errors(errors, len(concept))


def score_from_errors(errors: torch.Tensor, n_concept: int) -> torch.Tensor:
    """log (best concept prompt's error) - log (best anchor prompt's error), per image."""
    return errors[:, :n_concept].min(dim=1).values.log() - errors[:, n_concept:].min(dim=1).values.log()


@torch.no_grad()
def detector_errors(bundle, adapter, latents: torch.Tensor, seeds: Sequence[int], prompts: Sequence[str],
                    cfg: DetectorConfig = DetectorConfig()) -> torch.Tensor:
    """The base denoiser's mean error (n_images, n_prompts) on each latent re-noised at the detector's timesteps,
    for each candidate prompt: what every image gate's score is made of."""
    unet, prediction = bundle.unet, bundle.prediction
    prompts = list(prompts)
    states = bundle.encode_prompts(prompts).to(unet.dtype)
    n_img, n_c = latents.shape[0], len(prompts)
    ts = [int(t) for t in cfg.timesteps for _ in range(cfg.draws)]
    noises = torch.stack([torch.stack([torch.randn(tuple(latents.shape[1:]), generator=torch.Generator().manual_seed(
        int(s) * 7919 + cfg.seed * 104729 + 31 * k)) for k in range(len(ts))]) for s in seeds]).to(latents.device)
    x0 = latents.float()
    errors = torch.zeros(n_img, n_c, len(ts))
    rows = [(i, c, k) for i in range(n_img) for k in range(len(ts)) for c in range(n_c)]
    with adapter.base() if adapter is not None else nullcontext():
        for b in range(0, len(rows), cfg.batch_size):
            chunk = rows[b:b + cfg.batch_size]
            i_idx = torch.tensor([i for i, _, _ in chunk])
            c_idx = torch.tensor([c for _, c, _ in chunk])
            k_idx = torch.tensor([k for _, _, k in chunk])
            t = torch.tensor([ts[k] for k in k_idx.tolist()], device=latents.device)
            eps = noises[i_idx, k_idx]
            x_t = prediction.noised(x0[i_idx], eps, t).to(unet.dtype)
            out = model_output(unet, x_t, t, states[c_idx])
            pred = prediction.noise(out.float(), x_t.float(), t)
            err = (pred - eps).pow(2).flatten(1).mean(dim=1).cpu()
            errors[i_idx, c_idx, k_idx] = err
    return errors.mean(dim=2)


IMAGE_GATE_POSITION = 0.8  # chosen on fresh words (docs/findings-toyworld.md), never on benchmark prompts
# where the threshold sits for a prompt the calibrated prompt gate suspects (``calibrated+image``): past the anchors'
# calibration images by as much again, so a suspect image is flagged unless it clearly looks like an anchor; chosen on
# fresh words (scripts/gate_fresh.py, docs/findings-toyworld.md), never on benchmark prompts
SUSPECT_POSITION = 2.0
QUANTILE = 0.9  # calibration reads the concept images' 90th and the anchor images' 10th percentile
IMAGE_RULE = ("threshold = q90(concept images' scores) + position x (q10(anchor images' scores) - q90(concept images' "
              "scores)); scores from the base model's own generations of the concept's prompts and of the anchors")


def image_threshold(concept_scores: Sequence[float], anchor_scores: Sequence[float],
                    position: float = IMAGE_GATE_POSITION, ceiling: Optional[float] = None) -> float:
    """Where the threshold sits between the two groups of calibration scores; ``ceiling``: never above this score
    (None, the default: no cap; studied on both embedded models, not adopted: docs/findings-toyworld.md)."""
    high_concept = float(np.quantile(concept_scores, QUANTILE))
    low_anchor = float(np.quantile(anchor_scores, 1 - QUANTILE))
    placed = high_concept + position * (low_anchor - high_concept)
    return placed if ceiling is None else min(placed, ceiling)


def calibrate_image_gate(bundle, adapter, concept, anchors: Sequence[str], cfg: DetectorConfig = DetectorConfig(),
                         samples: int = CALIBRATION_SAMPLES, seed: int = 10_000, position: float = IMAGE_GATE_POSITION,
                         batch_size: int = 32, steps: int = 50, ceiling: Optional[float] = None,
                         progress: bool = True) -> dict:
    """Draw ``samples`` base images of each concept prompt and each anchor candidate (seeds from ``seed``, apart
    from the usual evaluation seeds), score them, and store the detector's candidates, scores and threshold (never
    above ``ceiling`` when one is given, stored with it so a changed ``position`` keeps it). Cost:
    (concept prompts + anchor candidates) x samples images, 13 x 8 = 104 for a toy preset."""
    from ..sampling.images import Item, sample_latents_batched

    concept_prompts = list(dict.fromkeys([concept.target, *concept.synonym_prompts(heldout=False)]))
    cand_concept, cand_anchors = candidate_prompts(concept_prompts, anchors, cfg)
    calib_anchors = cand_anchors  # the candidates themselves: a long anchor list (SD's everyday prompts) stays cheap
    prompts = cand_concept + calib_anchors
    size = bundle.image_size
    items = [Item(p, seed + j, bundle.default_guidance, size, size, prompt_index=i, sample_index=j)
             for i, p in enumerate(prompts) for j in range(samples)]
    if progress:
        LOG.info(f"calibrating the image gate on {len(items)} base images of {len(cand_concept)} concept prompts and "
                 f"{len(calib_anchors)} anchors ...")
    with adapter.base() if adapter is not None else nullcontext():
        latents = sample_latents_batched(bundle, items, steps, batch_size=batch_size, progress=progress,
                                         desc="calibrate image gate")
    scores = detector_scores(bundle, adapter, latents, [it.seed for it in items], cand_concept, cand_anchors, cfg).tolist()
    per_prompt: dict[str, list] = {}
    for it, s in zip(items, scores):
        per_prompt.setdefault(it.prompt, []).append(round(s, 5))
    concept_scores = [s for p in cand_concept for s in per_prompt[p]]
    anchor_scores = [s for p in calib_anchors for s in per_prompt[p]]
    return {"rule": IMAGE_RULE, "detector": asdict(cfg), "concept_candidates": cand_concept,
            "anchor_candidates": cand_anchors, "samples": samples, "seed": seed, "guidance": bundle.default_guidance,
            **({"steps": steps} if steps != 50 else {}),
            "position": position, **({"ceiling": ceiling} if ceiling is not None else {}), "scores": per_prompt,
            "threshold": image_threshold(concept_scores, anchor_scores, position, ceiling),
            "separated": max(concept_scores) < min(anchor_scores)}


def calibration_scores(stored: dict) -> tuple[list, list]:
    """A stored calibration's scores of the concept's images and of the anchors' (what every threshold is placed
    between)."""
    concept = [s for p in stored["concept_candidates"] for s in stored["scores"][p]]
    anchors = [s for p, v in stored["scores"].items() if p not in stored["concept_candidates"] for s in v]
    return concept, anchors


@dataclass(frozen=True)
class ImageGate:
    """The stored detector and its thresholds: ``threshold`` for every image, ``suspect_threshold`` (more lenient)
    for images of a prompt the prompt gate in front suspects."""

    concept: tuple
    anchors: tuple
    threshold: float
    detector: DetectorConfig = DetectorConfig()
    suspect_threshold: Optional[float] = None

    def threshold_for(self, suspected: bool) -> float:
        return self.suspect_threshold if suspected and self.suspect_threshold is not None else self.threshold

    @staticmethod
    def from_stored(stored: Optional[dict], position: Optional[float] = None) -> "ImageGate":
        if not stored or stored.get("threshold") is None:
            raise UnguideError("this erasure run has no calibrated image gate: rerun `unguide erase` with the same "
                               "settings and `out` (it adds the image gate's calibration to the finished run)")
        det = dict(stored["detector"])
        det["timesteps"] = tuple(det["timesteps"])
        threshold = float(stored["threshold"])
        concept, anchors = calibration_scores(stored)
        if position is not None:
            if not 0.0 <= position <= 1.0:
                raise UnguideError(f"image gate position {position:g} is outside [0, 1]: 0 puts the threshold at the "
                                   "concept's calibration images, 1 at the anchors' (the run's own: "
                                   f"{stored.get('position', IMAGE_GATE_POSITION):g})")
            threshold = image_threshold(concept, anchors, position, stored.get("ceiling"))
        return ImageGate(tuple(stored["concept_candidates"]), tuple(stored["anchor_candidates"]), threshold,
                         DetectorConfig(**det), max(threshold, image_threshold(concept, anchors, SUSPECT_POSITION)))

    def scores(self, bundle, adapter, latents: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        return detector_scores(bundle, adapter, latents, seeds, self.concept, self.anchors, self.detector)

    def evals_per_image(self) -> int:
        return self.detector.evals_per_image(len(self.concept) + len(self.anchors))


def group_scores(gates: dict, bundle, adapter, latents: torch.Tensor, seeds: Sequence[int]) -> dict:
    """Each gate's scores of the same latents (several concepts erased at once). Gates with the same detector share
    one pass over the union of their candidate prompts (anchors common to the concepts are evaluated once)."""
    out, by_detector = {}, {}
    for name, gate in gates.items():
        by_detector.setdefault(gate.detector, []).append(name)
    for detector, names in by_detector.items():
        prompts = list(dict.fromkeys(p for n in names for p in (*gates[n].concept, *gates[n].anchors)))
        errors = detector_errors(bundle, adapter, latents, seeds, prompts, detector)
        column = {p: i for i, p in enumerate(prompts)}
        for n in names:
            cols = [column[p] for p in (*gates[n].concept, *gates[n].anchors)]
            out[n] = score_from_errors(errors[:, cols], len(gates[n].concept))
    return out

