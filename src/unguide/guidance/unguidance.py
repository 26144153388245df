"""UnGuidance: per-prompt influence scores, the weight w, and the guided noise prediction.

Influence of a prompt c (METHOD.md section 3): from noise, run the *base* model with CFG for the first
steps of a DDIM trajectory, then at a DDPM time in [800, 820) measure
``d(c) = || eps_adapted(z, t, c) - eps_base(z, t, c) ||_2``, averaged over noise draws; the empty prompt
is scored the same way from the same noise. Binary rule: ``w = -1 if d(c) > d("") else 2``.

Gates (what d(c) is compared with):

* ``empty`` (the paper's): d(""). Once an adapter is trained to leave the empty prompt alone (the selective
  recipe's anchors include it), d("") is tiny and nearly every prompt would go to the adapter.
* ``calibrated``: a threshold stored in the run at the end of its erasure (:func:`calibrate_gate`), between the
  highest anchor score and the lowest score among the concept's own prompts (target and trained synonyms): at
  ``position`` p of the way on a log scale, ``top_anchor^(1-p) * low_concept^p`` (p = 0.5, their geometric mean,
  unless the run or the caller says otherwise). Anchors and concept prompts are the only prompts a run may look
  at; evaluation prompts never are. A lower p sends more borderline prompts to the adapter (more of the concept's
  unseen words caught, more neighbours erased with it); a higher p keeps more with the base model.
* a number: that threshold.

``keep`` is the weight of prompts under the threshold: ``paper`` (w = 2) or ``base`` (w = 1, the base model
alone: the image is exactly the base model's, and the adapter's evaluations are skipped for those prompts).
``erase_with`` is the weight of prompts over it: ``paper`` (w = -1, the adapter's effect doubled) or ``adapter``
(w = 0, the adapter alone; the base model's evaluations are skipped for those prompts).

Guided prediction: ``eps = w * eps_base_cfg + (1 - w) * eps_lora_cfg`` with one UNet in memory, the
adapter switched off for the base branch.

A third scorer, ``response``, evaluates no UNet at all: it scores a prompt by the adapter's own response to its
token states, the sum over adapted cross-attention layers and positions of |A h|^2 (A: the LoRA down-projection).
With the reference recipe's random A it sees every prompt alike; once A has learned (selective recipe) it tells
concept prompts from others about as well as the UNet scorer (docs/findings-toyworld.md). It needs its own
threshold, which the run's calibration stores beside the UNet scorer's.

The two UNet scorers share one code path (:func:`influence_scores`):

* ``reference``: 30 draws, 11 steps of the 50-step schedule (24 image-evals per draw and prompt);
* ``fast`` (default): reaches the same point of the trajectory with a coarse schedule (2 steps of a
  13-step schedule end at timestep 761, exactly where the reference's 11th of 50 steps ends), 6 draws,
  and scores the empty prompt once per adapter and setting instead of once per prompt: 36 image-evals
  per prompt, so 236 per image when each prompt gets one image (reference: 200 + 720).
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from typing import Literal, Optional, Sequence, get_args

import torch

from ..errors import UnguideError, check_number
from ..sampling.ddim import cfg_eps, ddim_loop, initial_noise, make_scheduler, unet_eps

LOG = logging.getLogger("unguide")  # the CLI shows INFO lines; a library caller can silence them


ScorerKind = Literal["fast", "reference", "response"]
SCORERS: tuple[str, ...] = get_args(ScorerKind)
GateKind = Literal["empty", "calibrated", "value", "none"]
Weighting = Literal["binary", "continuous"]
GuideMode = Literal["unguide", "base", "lora", "fixed"]


@dataclass(frozen=True)
class ScorerConfig:
    """Reference defaults: ``ScorerConfig.reference()``; the fast scorer is the default."""

    kind: ScorerKind = "fast"
    draws: int = 6  # 95.3% of decisions equal to the reference's on 107 prompts (sun adapter); 236 evals/image
    schedule_steps: int = 13  # DDIM schedule the scoring trajectory follows
    trajectory_steps: int = 2  # steps of that schedule run with the base model before scoring
    t_low: int = 800
    t_high: int = 820
    guidance: Optional[float] = None  # CFG scale of the scoring trajectory (None: the item's own)
    seed: int = 0
    batch_size: int = 64

    @staticmethod
    def reference(draws: int = 30) -> "ScorerConfig":
        return ScorerConfig(kind="reference", draws=draws, schedule_steps=50, trajectory_steps=11)

    @staticmethod
    def fast(**kw) -> "ScorerConfig":
        return ScorerConfig(**kw)

    def __post_init__(self):
        if self.kind not in SCORERS:
            raise UnguideError(f"unknown scorer {self.kind!r}: use {', '.join(SCORERS)}")

    def evals_per_prompt(self) -> int:
        """UNet image-evaluations spent on one prompt's score (2 per CFG step, 2 for the comparison)."""
        return 0 if self.kind == "response" else self.draws * (2 * self.trajectory_steps + 2)


KEEP_WEIGHTS = {"paper": 2.0, "base": 1.0}
# "negative": the adapter alone (w = 0) with the concept's own target prompt as the negative prompt (it replaces the
# empty prompt in classifier-free guidance), a push away from the concept that does not depend on the prompt's words
ERASE_WEIGHTS = {"paper": -1.0, "adapter": 0.0, "negative": 0.0}
# gate choices beside a number: the prompt gates, and the image gate alone or behind the calibrated prompt gate
GATE_CHOICES = ("calibrated", "empty", "image", "calibrated+image")


@dataclass(frozen=True)
class Gate:
    """What a prompt's influence score is compared with: ``empty`` (d(""), the paper's), ``calibrated`` (the run's
    stored threshold), ``value`` (a given threshold) or ``none`` (no prompt gate: every prompt is kept, for the image
    gate to judge)."""

    kind: GateKind = "empty"
    threshold: Optional[float] = None
    guidance: Optional[float] = None  # the CFG scale the threshold was calibrated at (scores must use the same)
    position: Optional[float] = None  # calibrated: where the threshold sits between anchors (0) and concept (1)

    def __post_init__(self):
        if self.kind not in get_args(GateKind):
            raise UnguideError(f"unknown gate {self.kind!r}: use calibrated, empty or a number")
        if self.kind in ("calibrated", "value") and (self.threshold is None or not self.threshold > 0):
            raise UnguideError(f"the {self.kind} gate needs a positive threshold (got {self.threshold})")

    @staticmethod
    def parse(text: str, stored: Optional[dict] = None, scorer: str = "fast", position: Optional[float] = None) -> "Gate":
        """``calibrated``, ``empty`` or a number, as given on the command line; ``stored`` is the run's gate (for the
        response scorer, its own calibration stored under ``response``); ``position`` moves a calibrated threshold
        (None: the run's own)."""
        if position is not None and text != "calibrated":
            raise UnguideError(f"`gate_position` applies to the calibrated gate only (the gate is {text!r}): "
                               "use `gate` calibrated, or drop `gate_position`")
        if text == "empty":
            return Gate("empty")
        if text == "none":
            return Gate("none")
        if text == "calibrated":
            if scorer == "response":
                stored = (stored or {}).get("response")
            if not stored or stored.get("threshold") is None:
                raise UnguideError("this erasure run has no calibrated gate (it predates calibration or has no anchors): "
                                   "use `gate` empty or a number, or erase again into a new directory")
            if position is None:  # the run's own (runs calibrated before positions existed used 0.5)
                return Gate("calibrated", float(stored["threshold"]), stored.get("guidance"),
                            stored.get("position", GATE_POSITION))
            return Gate("calibrated", gate_threshold(max(stored["anchor_scores"].values()),
                                                     min(stored["concept_scores"].values()), position),
                        stored.get("guidance"), position)
        try:
            value = float(text)
        except ValueError:
            raise UnguideError(f"`gate` {text!r}: use {', '.join(GATE_CHOICES)} or a positive number") from None
        return Gate("value", value)


@dataclass(frozen=True)
class WeightRule:
    """``binary`` (reference): w_erase if d(c) > d("") else w_keep.
    ``continuous``: w = w_keep + (w_erase - w_keep) * sigmoid(log(d(c) / d("")) / temperature), which equals the
    binary rule as temperature -> 0 and moves smoothly between the two for borderline prompts."""

    rule: Weighting = "binary"
    w_erase: float = -1.0
    w_keep: float = 2.0
    temperature: float = 0.1

    def __post_init__(self):
        if self.rule not in get_args(Weighting):
            raise UnguideError(f"unknown weighting rule {self.rule!r}: use binary or continuous")
        if self.temperature <= 0:
            raise UnguideError(f"the continuous rule's temperature must be > 0 (got {self.temperature})")

    def weight(self, score: float, threshold: float) -> float:
        if self.rule == "binary":
            return self.w_erase if score > threshold else self.w_keep
        z = math.log(max(score, 1e-12) / max(threshold, 1e-12)) / self.temperature
        return self.w_keep + (self.w_erase - self.w_keep) / (1 + math.exp(-max(min(z, 50), -50)))


@torch.no_grad()
def influence_scores(bundle, adapter, prompts: Sequence[str], cfg: ScorerConfig, guidance: float) -> torch.Tensor:
    """Mean adapter-vs-base distance d(c) for each prompt (same noise draws for every prompt); for the
    ``response`` scorer, the adapter's own response to the prompt's token states instead."""
    if cfg.kind == "response":
        return response_scores(bundle, adapter, prompts)
    unet = bundle.unet
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
        sched = make_scheduler(bundle, cfg.schedule_steps)
        x = initial_noise(shape, [draw_seeds[d] for _, d in chunk], device=bundle.device, dtype=unet.dtype)
        x = x * sched.init_noise_sigma
        with adapter.base():
            x = ddim_loop(sched, x, lambda x_, t_, i_: cfg_eps(unet, x_, t_, cond, uncond, scale), stop=cfg.trajectory_steps)
        t = torch.tensor([int(torch.randint(cfg.t_low, cfg.t_high, (1,),
                                            generator=torch.Generator().manual_seed(draw_seeds[d] + 1)))
                          for _, d in chunk], device=x.device)
        with adapter.base():
            e_base = unet_eps(unet, x, t, cond)
        e_adapted = unet_eps(unet, x, t, cond)
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
GATE_POSITION = 0.5  # the calibrated threshold's default place between anchors (0) and concept prompts (1)


def check_gate_position(position: float) -> float:
    if not 0.0 <= position <= 1.0:
        raise UnguideError(f"gate position {position:g} is outside [0, 1]: 0 puts the threshold at the highest anchor "
                           "score, 1 at the lowest concept-prompt score, 0.5 (the default) halfway on a log scale")
    return float(position)


def gate_threshold(top_anchor: float, low_concept: float, position: float = GATE_POSITION) -> float:
    """The threshold ``position`` of the way from the highest anchor score to the lowest concept-prompt score, on a
    log scale (scores are distances, so ratios are what compare)."""
    position = check_gate_position(position)
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


class EvalCounter:
    """Counts UNet image-evaluations (batch rows through the denoiser), for cost reports."""

    def __init__(self, unet):
        self.count = 0
        self._handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.count += int(sample.shape[0])

    def close(self) -> None:
        self._handle.remove()


class UnGuide:
    """A generation guide: decides w per prompt, then mixes base and adapter CFG predictions.

    mode: ``unguide`` (scores -> w), ``base`` (w=1), ``lora`` (w=0), ``fixed`` (w given).
    ``stored_empty``: d("") already computed for this adapter (the run's calibration), used when the scorer and
    guidance match, so a one-prompt call does not rescore the empty prompt."""

    MODES = get_args(GuideMode)

    def __init__(self, adapter, mode: str = "unguide", scorer: ScorerConfig = ScorerConfig(),
                 rule: WeightRule = WeightRule(), fixed_w: Optional[float] = None, gate: Gate = Gate(),
                 stored_empty: Optional[dict] = None, image_gate=None, negative_prompt: Optional[str] = None,
                 substitute_prompt: Optional[str] = None):
        if mode not in self.MODES:
            raise UnguideError(f"unknown mode {mode!r}: use unguide, base, lora or a fixed `w`")
        if mode == "fixed" and fixed_w is None:
            raise UnguideError("mode 'fixed' needs a weight: give `w`")
        if gate.kind == "calibrated" and gate.guidance is not None and scorer.kind != "response":
            scorer = replace(scorer, guidance=gate.guidance)  # scores comparable with the calibrated threshold
        self.adapter, self.mode, self.scorer, self.rule, self.fixed_w, self.gate = adapter, mode, scorer, rule, fixed_w, gate
        self.name = {"unguide": "unguide", "base": "base", "lora": "lora", "fixed": f"w={fixed_w}"}[mode]
        self._scores: dict[tuple[str, float], float] = {}
        self._stored_empty = stored_empty
        # the image gate (unguide.guidance.image_gate.ImageGate): kept prompts' finished images are checked and, if they show
        # the concept, redrawn from the same noise with w_erase
        self.image_gate = image_gate
        # erased rows use this prompt (the concept's target) as their negative prompt instead of "" (erase_with negative)
        self.negative_prompt = negative_prompt
        # the image gate's last resort: a redrawn image that still shows the concept is drawn again by the base model
        # from this prompt (the concept's reference, e.g. "a photo of the sky"), so the prompt's words no longer count
        self.substitute_prompt = substitute_prompt
        self.note: Optional[str] = None  # why the guide departs from what was asked, if it does

    def settings(self) -> dict:
        out = {"mode": self.mode, "fixed_w": self.fixed_w, "scorer": asdict(self.scorer), "rule": asdict(self.rule),
               "gate": asdict(self.gate)}
        if self.image_gate is not None:
            out["image_gate"] = {"threshold": self.image_gate.threshold, "concept": list(self.image_gate.concept),
                                 "anchors": list(self.image_gate.anchors), "detector": asdict(self.image_gate.detector)}
        if self.negative_prompt is not None:
            out["negative_prompt"] = self.negative_prompt
        if self.substitute_prompt is not None:
            out["substitute_prompt"] = self.substitute_prompt
        return out

    def erased_info(self, info: dict) -> dict:
        """A row's info once it is erased: w_erase, and the concept as negative prompt if the guide has one."""
        info = {**info, "w": self.rule.w_erase}
        if self.negative_prompt is not None:
            info["negative_prompt"] = self.negative_prompt
        return info

    def scores(self, bundle, prompts: Sequence[str], guidance: float) -> list[float]:
        """d(c) for each prompt, computed once per (prompt, guidance) and cached."""
        keys = [(p, float(guidance)) for p in prompts]
        missing = list(dict.fromkeys(k for k in keys if k not in self._scores))
        stored, key = self._stored_empty, ("", float(guidance))
        if (stored and key in missing and stored.get("score_empty") is not None and self.scorer.guidance is None
                and stored.get("scorer") == asdict(self.scorer) and float(stored.get("guidance", -1)) == key[1]):
            self._scores[key] = float(stored["score_empty"])
            missing.remove(key)
        if missing:
            values = influence_scores(bundle, self.adapter, [p for p, _ in missing], self.scorer, guidance)
            self._scores.update(zip(missing, values.tolist()))
        return [self._scores[k] for k in keys]

    def decide(self, bundle, prompts: Sequence[str], guidance: float) -> list[dict]:
        if self.mode != "unguide":
            w = {"base": 1.0, "lora": 0.0, "fixed": self.fixed_w}[self.mode]
            return [{"w": float(w)} for _ in prompts]
        extra = {}
        if self.gate.kind == "none":  # no prompt gate: every prompt is drawn as kept, the image gate judges
            return [{"w": self.rule.w_keep, "gate": "none"} for _ in prompts]
        if self.gate.kind == "empty":
            threshold = self.scores(bundle, [""], guidance)[0]  # the neutral prompt: once per guidance scale
            extra = {"score_empty": threshold}
        else:
            threshold = self.gate.threshold
        infos = [{"w": self.rule.weight(s, threshold), "score": s, "threshold": threshold, "gate": self.gate.kind, **extra}
                 for s in self.scores(bundle, prompts, guidance)]
        return [self.erased_info(i) if i["w"] == self.rule.w_erase and self.rule.rule == "binary" else i for i in infos]

    def review(self, bundle, items, latents: torch.Tensor, infos: list[dict], redraw) -> tuple[torch.Tensor, list[dict]]:
        """The image gate: score the finished latents of the rows the prompt gate kept, and redraw (same noise,
        ``redraw(rows, infos)``) those that show the concept, with the erasure; then look again at what was redrawn,
        and draw the concept's reference prompt instead where the erasure still drew the concept (an attacker who
        beats the adapter, e.g. by inversion, meets the base model drawing the reference). Without an image gate:
        unchanged."""
        if self.image_gate is None or self.mode != "unguide":
            return latents, infos
        rows = [r for r, info in enumerate(infos) if info["w"] == self.rule.w_keep]
        if not rows:
            return latents, infos
        gate = self.image_gate
        scores = gate.scores(bundle, self.adapter, latents[rows], [items[r].seed for r in rows]).tolist()
        infos = list(infos)
        flagged = []
        for r, s in zip(rows, scores):
            infos[r] = {**infos[r], "image_score": s, "image_threshold": gate.threshold, "image_flagged": s < gate.threshold}
            if s < gate.threshold:
                flagged.append(r)
                infos[r] = self.erased_info(infos[r])
        if flagged:
            latents = latents.clone()
            latents[flagged] = redraw(flagged, [infos[r] for r in flagged])
            if self.substitute_prompt is not None:
                again = gate.scores(bundle, self.adapter, latents[flagged], [items[r].seed for r in flagged]).tolist()
                still = []
                for r, s in zip(flagged, again):
                    infos[r] = {**infos[r], "image_score_redrawn": s}
                    if s < gate.threshold:
                        still.append(r)
                        infos[r] = self.substituted_info(infos[r])
                if still:
                    latents[still] = redraw(still, [infos[r] for r in still])
        return latents, infos

    def substituted_info(self, info: dict) -> dict:
        """A row's info once its prompt is replaced by the substitute: the base model draws the reference prompt."""
        return {**info, "w": 1.0, "substitute_prompt": self.substitute_prompt, "negative_prompt": None}

    def prepare(self, bundle, items) -> list[dict]:
        infos: list[Optional[dict]] = [None] * len(items)
        by_scale: dict[float, list[int]] = {}
        for i, it in enumerate(items):
            by_scale.setdefault(float(it.guidance), []).append(i)
        for scale, idxs in by_scale.items():
            for i, info in zip(idxs, self.decide(bundle, [items[i].prompt for i in idxs], scale)):
                infos[i] = info
        return infos

    def noise_fn(self, bundle, cond, uncond, scale, infos: Sequence[dict]):
        return guided_noise_fn(bundle, self.adapter, cond, uncond, scale, infos)


def guided_noise_fn(bundle, adapter, cond, uncond, scale, infos: Sequence[dict], switch=None):
    """eps = w * eps_base_cfg + (1 - w) * eps_lora_cfg, evaluating each branch only for the rows that need it:
    rows with w = 1 never touch the adapter (their prediction is exactly the base model's), rows with w = 0
    never touch the base model. Rows may carry a negative prompt (erased rows guided away from the concept) or a
    substitute prompt (the image gate's last resort). ``switch``: see :func:`mix_by_weight`."""
    unet = bundle.unet
    w = torch.tensor([info["w"] for info in infos], dtype=cond.dtype, device=cond.device)
    negative = [r for r, info in enumerate(infos) if info.get("negative_prompt") is not None]
    if negative:  # erased rows guided away from the concept's own prompt instead of from ""
        uncond = uncond.clone()
        uncond[negative] = bundle.encode_prompts([infos[r]["negative_prompt"] for r in negative]).to(uncond.dtype)
    substitute = [r for r, info in enumerate(infos) if info.get("substitute_prompt") is not None]
    if substitute:  # the image gate's last resort: these rows draw the concept's reference prompt
        cond = cond.clone()
        cond[substitute] = bundle.encode_prompts([infos[r]["substitute_prompt"] for r in substitute]).to(cond.dtype)
    scale = torch.as_tensor(scale, dtype=cond.dtype, device=cond.device)

    def branch(x, t, rows):
        if len(rows) == len(w):
            return cfg_eps(unet, x, t, cond, uncond, scale)
        s = scale[rows] if scale.ndim == 1 else scale
        return cfg_eps(unet, x[rows], t, cond[rows], uncond[rows], s)

    return lambda x, t, i: mix_by_weight(w, adapter, lambda rows: branch(x, t, rows), x, switch)


def mix_by_weight(w: torch.Tensor, adapter, predict, like: torch.Tensor, switch=None) -> torch.Tensor:
    """``w * predict(rows)`` with the adapter off plus ``(1 - w) * predict(rows)`` with it on, each branch evaluated
    only for the rows that need it: rows with w = 1 never touch the adapter (their prediction is the base model's, bit
    for bit), rows with w = 0 never touch the base model. ``adapter`` None: there is only the base model (w = 1).
    ``switch(rows)``: for a group of adapters, [(rows, context)] pairs, each context turning on the adapters those
    rows are erased with (None: one adapter, on for all)."""
    from contextlib import nullcontext

    out = torch.zeros_like(like)
    base_rows, lora_rows = torch.nonzero(w != 0).flatten(), torch.nonzero(w != 1).flatten()
    if len(base_rows):
        with adapter.base() if adapter is not None else nullcontext():
            e = predict(base_rows)
        wb = w[base_rows].view(-1, 1, 1, 1).to(e.dtype)
        out[base_rows] = torch.where(wb == 1, e, wb * e)
    if len(lora_rows):
        for rows, context in (switch(lora_rows) if switch is not None else [(lora_rows, nullcontext())]):
            with context:
                e = predict(rows)
            out[rows] = out[rows] + (1 - w[rows]).view(-1, 1, 1, 1).to(e.dtype) * e
    return out


@dataclass(frozen=True)
class GuidanceConfig:
    """How generation uses an attached erasure run, checked where it is made (names, finite numbers, ranges, which
    settings go together). Every field left at None takes what the run's recipe stored (``erase.RECIPE_GATES``): the
    paper's d("") gate with w in {-1, 2} for reference runs, the image gate for selective ones.

    * ``mode``: ``unguide`` (a weight w per prompt from the gates), ``base`` (w = 1), ``lora`` (w = 0), ``fixed``
      (every prompt gets ``w``; giving ``w`` implies it);
    * ``gate``: ``calibrated``, ``empty``, a positive threshold, ``image`` (no prompt gate: every prompt is drawn by
      the base model and its image checked) or ``calibrated+image`` (prompts over the calibrated gate erased at once,
      the rest checked on the image);
    * ``keep`` / ``erase_with``: the weight of prompts under / over the gate (:data:`KEEP_WEIGHTS`,
      :data:`ERASE_WEIGHTS`);
    * ``gate_position`` / ``image_gate_position``: move the calibrated prompt gate's / the image gate's threshold
      (0..1; None: the run's own)."""

    mode: GuideMode = "unguide"
    w: Optional[float] = None
    gate: Optional[str | float] = None
    keep: Optional[str] = None
    erase_with: Optional[str] = None
    gate_position: Optional[float] = None
    image_gate_position: Optional[float] = None
    scorer: ScorerConfig = ScorerConfig()
    rule: WeightRule = WeightRule()

    def __post_init__(self):
        if self.mode not in get_args(GuideMode):
            raise UnguideError(f"unknown `mode` {self.mode!r}: use unguide, base or lora (or give `w`)")
        if self.w is not None:
            object.__setattr__(self, "w", check_number("`w`", self.w))
            if self.mode not in ("unguide", "fixed"):
                raise UnguideError("give either `mode` or `w`, not both")
            object.__setattr__(self, "mode", "fixed")
        elif self.mode == "fixed":
            raise UnguideError("mode 'fixed' needs a weight: give `w`")
        if self.gate is not None and str(self.gate) not in GATE_CHOICES:
            value = check_number("`gate`", self.gate, above=0) if not isinstance(self.gate, str) else _gate_value(self.gate)
            object.__setattr__(self, "gate", value)
        if self.keep not in (None, *KEEP_WEIGHTS):
            raise UnguideError(f"unknown `keep` {self.keep!r}: use base (w = 1) or paper (w = 2)")
        if self.erase_with not in (None, *ERASE_WEIGHTS):
            raise UnguideError(f"unknown `erase_with` {self.erase_with!r}: use {', '.join(ERASE_WEIGHTS)}")
        for name in ("gate_position", "image_gate_position"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, check_number(f"`{name}`", getattr(self, name), low=0, high=1))
        image = self.gate in ("image", "calibrated+image")
        if self.image_gate_position is not None and not image:
            raise UnguideError("`image_gate_position` applies to the image gates only: use `gate` image or "
                               "calibrated+image")
        if self.gate_position is not None and self.gate not in (None, "calibrated", "calibrated+image"):
            raise UnguideError(f"`gate_position` moves the calibrated prompt gate, which `gate` {self.gate!r} does not "
                               "use: use `gate` calibrated or calibrated+image, or drop `gate_position`")

    def replace(self, **changes) -> "GuidanceConfig":
        return replace(self, **changes)

    @property
    def is_default(self) -> bool:
        return self == GuidanceConfig()


def _gate_value(text: str) -> float:
    try:
        return check_number("`gate`", text, above=0)
    except UnguideError:
        raise UnguideError(f"`gate` {text!r}: use {', '.join(GATE_CHOICES)} or a positive number") from None


def guide_for_run(adapter, meta: dict, config: Optional[GuidanceConfig] = None, **fields) -> UnGuide:
    """The guide for an erasure run (``meta``: its erasure.json) under ``config`` (or the same fields as keywords:
    ``guide_for_run(adapter, meta, gate="empty")``); what the config leaves at None comes from the run."""
    from .image_gate import ImageGate

    config = (config or GuidanceConfig()).replace(**fields) if fields else (config or GuidanceConfig())
    stored = meta.get("gate") or {}
    asked = config.gate is not None  # a gate named by the caller is obeyed as given
    gate = config.gate if asked else stored.get("default", "empty")
    image = str(gate) in ("image", "calibrated+image")
    if image:
        gate = "none" if gate == "image" else "calibrated"
    keep = config.keep or stored.get("keep", "paper")
    erase_with = config.erase_with or stored.get("erase_with", "paper")
    rule = replace(config.rule, w_keep=KEEP_WEIGHTS[keep], w_erase=ERASE_WEIGHTS[erase_with])
    if gate == "none" and config.gate_position is not None:
        raise UnguideError("`gate_position` moves the calibrated prompt gate, which the image gate does not use: "
                           "use `gate` calibrated+image, or drop `gate_position`")
    if config.image_gate_position is not None and not image:
        raise UnguideError("`image_gate_position` applies to the image gates only: use `gate` image or calibrated+image")
    scorer = config.scorer
    parsed = Gate.parse(str(gate), stored, scorer.kind, config.gate_position)
    image_gate = ImageGate.from_stored(stored.get("image"), config.image_gate_position) if image else None
    calibration = stored.get("response", {}) if scorer.kind == "response" else stored
    mode, fixed_w, note = config.mode, config.w, None
    if mode == "unguide" and not asked and not image and parsed.kind == "calibrated" \
            and calibration.get("separated") is False:
        # the calibration could not tell the anchors from the concept's own prompts, so a threshold would misroute
        # some of either: every prompt gets the adapter alone (w = 0) instead of an untrustworthy per-prompt choice
        mode, fixed_w = "fixed", 0.0
        note = ("the run's calibrated gate does not separate its anchors from the concept's prompts (margin "
                f"{calibration.get('margin', float('nan')):.2f}): every prompt uses the adapter alone (w = 0)")
    concept = meta.get("concept") or {}
    negative = concept.get("target") if erase_with == "negative" else None
    substitute = concept.get("reference") if image else None
    guide = UnGuide(adapter, mode=mode, scorer=scorer, rule=rule, fixed_w=fixed_w, gate=parsed, stored_empty=stored,
                    image_gate=image_gate, negative_prompt=negative, substitute_prompt=substitute)
    guide.note = note
    return guide


def decision_settings(scorer: Optional[str], weighting: Optional[str]) -> dict:
    """The scorer and weighting rule named on the command line (None: the fast scorer, binary rule)."""
    named = {"reference": ScorerConfig.reference(), "response": ScorerConfig(kind="response")}
    return {"scorer": named.get(scorer or "fast", ScorerConfig()),
            "rule": WeightRule(rule=weighting or "binary")}

