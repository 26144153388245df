"""The prompt gate: how strongly the adapter reacts to a prompt (its influence score), and the threshold it is
compared with.

Influence of a prompt c (`../shared/METHOD.md` section 3): from noise, run the *base* model with CFG for the first steps of a DDIM
trajectory, then at a DDPM time in [800, 820) measure ``d(c) = || eps_adapted(z, t, c) - eps_base(z, t, c) ||_2``
(outputs read as noise through the model's :class:`~unguide.models.prediction.Prediction`), averaged over noise draws;
the empty prompt is scored the same way from the same noise. Binary rule: ``w = -1 if d(c) > d("") else 2``.

What d(c) is compared with (:class:`PromptGate`):

* ``empty`` (the paper's): d(""). Once an adapter is trained to leave the empty prompt alone (the selective
  recipe's anchors include it), d("") is tiny and nearly every prompt would go to the adapter.
* ``calibrated``: a threshold stored in the run at the end of its erasure (:func:`calibrate_gate`), between the
  highest anchor score and the lowest score among the concept's own prompts (target and trained synonyms): at
  ``position`` p of the way on a log scale, ``top_anchor^(1-p) * low_concept^p`` (p = 0.5, their geometric mean,
  unless the run or the caller says otherwise). Anchors and concept prompts are the only prompts a run may look
  at; evaluation prompts never are. A lower p sends more borderline prompts to the adapter (more of the concept's
  unseen words caught, more neighbours erased with it); a higher p keeps more with the base model.
* ``value``: a given threshold; ``none``: no prompt gate (the image gate alone judges).

Scorers. The two UNet scorers share one code path (:func:`influence_scores`): ``reference`` (30 draws, 11 steps of the
50-step schedule, 24 image-evals per draw and prompt) and ``fast`` (default: 2 steps of a 13-step schedule end at
timestep 761, exactly where the reference's 11th of 50 steps ends; 6 draws; the empty prompt scored once per adapter
and setting: 36 image-evals per prompt, 236 per image when each prompt gets one image, against the reference's 920).
``response`` evaluates no UNet: the sum over adapted cross-attention layers and positions of |A h|^2 (A: the LoRA
down-projection). With the reference recipe's random A it sees every prompt alike; once A has learned (selective
recipe) it tells concept prompts from others about as well (docs/findings-toyworld.md). It has its own threshold,
stored beside the UNet scorer's.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch

from ..errors import UnguideError
from ..sampling.ddim import cfg_output, ddim_loop, initial_noise, make_sampler, model_output
from .config import GATE_POSITION, GateSpec, ScorerConfig, check_position

LOG = logging.getLogger("unguide")  # the CLI shows INFO lines; a library caller can silence them


@torch.no_grad()
def influence_scores(bundle, adapter, prompts: Sequence[str], cfg: ScorerConfig, guidance: float) -> torch.Tensor:
    """Mean adapter-vs-base distance d(c) for each prompt (same noise draws for every prompt); for the
    ``response`` scorer, the adapter's own response to the prompt's token states instead."""
    if cfg.kind == "response":
        return response_scores(bundle, adapter, prompts)
    unet, prediction = bundle.unet, bundle.prediction
    scale = cfg.guidance if cfg.guidance is not None else guidance
    shape = bundle.latent_shape()
    draw_seeds = [cfg.seed * 7919 + d for d in range(cfg.draws)]
    pairs = [(p, d) for p in range(len(prompts)) for d in range(cfg.draws)]
    dist = torch.zeros(len(prompts), cfg.draws)
    uncond_all = bundle.encode_prompts([""])
    for b in range(0, len(pairs), cfg.batch_size):
        chunk = pairs[b:b + cfg.batch_size]
        cond = bundle.encode_prompts([prompts[p] for p, _ in chunk]).to(unet.dtype)
        uncond = uncond_all.expand(len(chunk), -1, -1).to(unet.dtype)
        sampler = make_sampler(bundle, cfg.schedule_steps)
        x = initial_noise(shape, [draw_seeds[d] for _, d in chunk], device=bundle.device, dtype=unet.dtype)
        x = x * sampler.init_noise_sigma
        with adapter.base():
            x = ddim_loop(sampler, x, lambda x_, t_, i_: cfg_output(unet, x_, t_, cond, uncond, scale), stop=cfg.trajectory_steps)
        t = torch.tensor([int(torch.randint(cfg.t_low, cfg.t_high, (1,),
                                            generator=torch.Generator().manual_seed(draw_seeds[d] + 1)))
                          for _, d in chunk], device=x.device)
        with adapter.base():
            e_base = prediction.noise(model_output(unet, x, t, cond), x, t)
        e_adapted = prediction.noise(model_output(unet, x, t, cond), x, t)
        d_chunk = (e_adapted - e_base).float().flatten(1).norm(dim=1).cpu()
        for (p, d), value in zip(chunk, d_chunk):
            dist[p, d] = value
    return dist.mean(dim=1)


@torch.no_grad()
def response_scores(bundle, adapter, prompts: Sequence[str]) -> torch.Tensor:
    """Sum over the adapter's cross-attention key/value layers and token positions of |A h|^2: how strongly the
    adapter's input side reacts to a prompt, with no UNet evaluation."""
    projections = adapter.text_projections()
    states = bundle.encode_prompts(list(prompts)).float()
    return sum((states @ a.float().T).pow(2).sum(dim=(1, 2)) for a in projections).cpu()


CALIBRATION_RULE = ("threshold = highest anchor score^(1-p) x lowest score of the concept's target and trained "
                    "synonyms^p (p: the gate position; 0.5, their geometric mean, by default), scores d(c) from the "
                    "fast scorer at the model's default guidance")
def gate_threshold(top_anchor: float, low_concept: float, position: float = GATE_POSITION) -> float:
    """The threshold ``position`` of the way from the highest anchor score to the lowest concept-prompt score, on a
    log scale (scores are distances, so ratios are what compare)."""
    position = check_position("gate_position", position)
    top_anchor, low_concept = max(top_anchor, 1e-12), max(low_concept, 1e-12)
    if position == 0.5:  # the original rule, computed as it always was (runs calibrated before positions match bit for bit)
        return math.sqrt(top_anchor * low_concept)
    return math.exp((1 - position) * math.log(top_anchor) + position * math.log(low_concept))


def calibrate_gate(bundle, adapter, concept, anchors: Sequence[str], scorer: ScorerConfig = ScorerConfig(),
                   progress: bool = True, position: float = GATE_POSITION) -> dict:
    """Score the anchors, the empty prompt and the concept's own prompts once; store the gate's threshold (rule:
    ``CALIBRATION_RULE``) and d("") so that generation never rescores them."""
    guidance = bundle.default_guidance
    concept_prompts = list(dict.fromkeys([concept.target, *concept.synonym_prompts(heldout=False)]))
    anchor_prompts = list(dict.fromkeys([a for a in anchors if a not in concept_prompts]))
    prompts = list(dict.fromkeys(concept_prompts + anchor_prompts + [""]))
    if progress:
        LOG.info(f"calibrating the gate on {len(anchor_prompts)} anchors and {len(concept_prompts)} concept prompts ...")
    scores = influence_scores(bundle, adapter, prompts, scorer, guidance).tolist()
    gate = {"rule": CALIBRATION_RULE, "scorer": asdict(scorer), "guidance": guidance,
            **_calibration(dict(zip(prompts, scores)), concept_prompts, anchor_prompts, position)}
    if hasattr(adapter, "has_text_projections") and adapter.has_text_projections():
        response = response_scores(bundle, adapter, prompts).tolist()
        gate["response"] = _calibration(dict(zip(prompts, response)), concept_prompts, anchor_prompts, position)
    return gate


def _calibration(scores: dict, concept_prompts: list, anchor_prompts: list, position: float = GATE_POSITION) -> dict:
    """One scorer's calibration: the scores, d(""), and the threshold between anchors and concept prompts."""
    out = {"score_empty": scores[""], "concept_scores": {p: scores[p] for p in concept_prompts},
           "anchor_scores": {p: scores[p] for p in anchor_prompts}, "threshold": None, "separated": None}
    if anchor_prompts:
        top_anchor, low_concept = max(out["anchor_scores"].values()), min(out["concept_scores"].values())
        out["threshold"] = gate_threshold(top_anchor, low_concept, position)
        out["position"] = position
        out["separated"] = low_concept > top_anchor
        out["margin"] = low_concept / max(top_anchor, 1e-12)  # > 1: every anchor below every concept prompt
    return out


@dataclass(frozen=True)
class PromptGate:
    """What a prompt's influence score is compared with: ``empty`` (d(""), the paper's), ``calibrated`` (the run's
    stored threshold), ``value`` (a given threshold) or ``none`` (no prompt gate: every prompt is kept, for the image
    gate to judge)."""

    kind: str = "empty"
    threshold: Optional[float] = None
    guidance: Optional[float] = None  # the CFG scale the threshold was calibrated at (scores must use the same)
    position: Optional[float] = None  # calibrated: where the threshold sits between anchors (0) and concept (1)

    def __post_init__(self):
        if self.kind not in ("empty", "calibrated", "value", "none"):
            raise UnguideError(f"unknown prompt gate {self.kind!r}: use calibrated, empty or a number")
        if self.kind in ("calibrated", "value") and (self.threshold is None or not self.threshold > 0):
            raise UnguideError(f"the {self.kind} gate needs a positive threshold (got {self.threshold})")

    @staticmethod
    def from_spec(spec: GateSpec, calibration: Optional[dict], position: Optional[float] = None) -> "PromptGate":
        """The prompt gate of ``spec`` over a run's stored calibration (for the response scorer, its own);
        ``position`` moves a calibrated threshold (None: the run's own)."""
        if spec.prompt is None:
            return PromptGate("none")
        if spec.prompt != "calibrated":
            return PromptGate(spec.prompt, spec.value)
        if not calibration or calibration.get("threshold") is None:
            raise UnguideError("this erasure run has no calibrated gate (it predates calibration or has no anchors): "
                               "use `gate` empty or a number, or erase again into a new directory")
        if position is None:  # the run's own (runs calibrated before positions existed used 0.5)
            return PromptGate("calibrated", float(calibration["threshold"]), calibration.get("guidance"),
                              calibration.get("position", GATE_POSITION))
        return PromptGate("calibrated", gate_threshold(max(calibration["anchor_scores"].values()),
                                                       min(calibration["concept_scores"].values()), position),
                          calibration.get("guidance"), position)


class PromptScores:
    """d(c) per (prompt, guidance) for one adapter, computed once and cached; d("") taken from the run's calibration
    when its scorer and guidance match, so a one-prompt call does not rescore the empty prompt."""

    def __init__(self, adapter, scorer: ScorerConfig, stored: Optional[dict] = None):
        self.adapter, self.scorer, self._stored = adapter, scorer, stored
        self._scores: dict[tuple[str, float], float] = {}

    def __call__(self, bundle, prompts: Sequence[str], guidance: float) -> list[float]:
        keys = [(p, float(guidance)) for p in prompts]
        missing = list(dict.fromkeys(k for k in keys if k not in self._scores))
        stored, key = self._stored, ("", float(guidance))
        if (stored and key in missing and stored.get("score_empty") is not None and self.scorer.guidance is None
                and stored.get("scorer") == asdict(self.scorer) and float(stored.get("guidance", -1)) == key[1]):
            self._scores[key] = float(stored["score_empty"])
            missing.remove(key)
        if missing:
            values = influence_scores(bundle, self.adapter, [p for p, _ in missing], self.scorer, guidance)
            self._scores.update(zip(missing, values.tolist()))
        return [self._scores[k] for k in keys]
