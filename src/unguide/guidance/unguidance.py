"""UnGuidance for one erasure run: a weight w per prompt from the gates, then the mix of base and adapter.

:class:`UnGuide` is the guide a pipeline draws with: ``prepare`` decides each image's :class:`Decision` (the prompt
gate, :mod:`.prompt_gate`), ``noise_fn`` mixes base and adapter CFG predictions by w at every step (:mod:`.mixing`),
``review`` runs the image gate's sequence on the finished latents (:mod:`.review`). :func:`guide_for_run` builds it
from a stored run and a :class:`~unguide.guidance.config.GuidanceConfig`; what the config leaves unset comes from the
run's recipe defaults.

``keep`` is the weight of prompts under the prompt gate: ``paper`` (w = 2) or ``base`` (w = 1, the base model alone:
the image is exactly the base model's, and the adapter's evaluations are skipped for those prompts). ``erase_with`` is
the weight of prompts over it: ``paper`` (w = -1, the adapter's effect doubled) or ``adapter`` (w = 0, the adapter
alone; the base model's evaluations are skipped).
"""
from __future__ import annotations

from dataclasses import asdict, replace
from typing import Optional, Sequence

from .config import GuidanceConfig, ScorerConfig, WeightRule, check_mode
from .decision import Decision
from .image_gate import ImageGate
from .mixing import guided_noise_fn
from .prompt_gate import PromptGate, PromptScores
from .review import review


class UnGuide:
    """A generation guide: decides w per prompt, then mixes base and adapter CFG predictions.

    mode: ``unguide`` (scores -> w), ``base`` (w=1), ``lora`` (w=0), ``fixed`` (w given). ``stored``: the run's
    prompt-gate calibration (its d("") is reused when the scorer and guidance match)."""

    def __init__(self, adapter, mode: str = "unguide", scorer: ScorerConfig = ScorerConfig(),
                 rule: WeightRule = WeightRule(), fixed_w: Optional[float] = None, gate: PromptGate = PromptGate(),
                 stored: Optional[dict] = None, image_gate: Optional[ImageGate] = None,
                 negative_prompt: Optional[str] = None, substitute_prompt: Optional[str] = None,
                 concept: str = "concept"):
        check_mode(mode, fixed_w)
        if gate.kind == "calibrated" and gate.guidance is not None and scorer.kind != "response":
            scorer = replace(scorer, guidance=gate.guidance)  # scores comparable with the calibrated threshold
        self.adapter, self.mode, self.scorer, self.rule, self.fixed_w, self.gate = adapter, mode, scorer, rule, fixed_w, gate
        self.name = {"unguide": "unguide", "base": "base", "lora": "lora", "fixed": f"w={fixed_w}"}[mode]
        self.scores = PromptScores(adapter, scorer, stored)
        # the image gate: kept prompts' finished images are checked and, if they show the concept, redrawn
        self.image_gate, self.concept = image_gate, concept
        # erased rows use this prompt (the concept's target) as their negative prompt instead of "" (erase_with negative)
        self.negative_prompt = negative_prompt
        # the image gate's last resort: a redrawn image that still shows the concept is drawn again by the base model
        # from this prompt (the concept's reference, e.g. "a photo of the sky"), so the prompt's words no longer count
        self.substitute_prompt = substitute_prompt
        self.note: Optional[str] = None  # why the guide departs from what was asked, if it does

    # -- what the review sequence needs ------------------------------------------------------------------------
    @property
    def image_gates(self) -> dict[str, ImageGate]:
        return {self.concept: self.image_gate} if self.image_gate is not None and self.mode == "unguide" else {}

    @property
    def keep_w(self) -> float:
        return self.rule.w_keep

    def erased(self, decision: Decision) -> Decision:
        """A row's decision once it is erased: w_erase, and the concept as negative prompt if the guide has one."""
        negative = {"negative_prompt": self.negative_prompt} if self.negative_prompt is not None else {}
        return decision.but(w=self.rule.w_erase, **negative)

    def flagged(self, decision: Decision, hits: list[str], scores: dict[str, float]) -> Decision:
        suspected = self.concept in (decision.suspects or ())
        looked = decision.but(image_score=scores[self.concept], image_flagged=bool(hits),
                              image_threshold=self.image_gate.threshold_for(suspected))
        return self.erased(looked) if hits else looked

    def substitute_for(self, concept: str) -> Optional[str]:
        return self.substitute_prompt

    # -- the guide interface -----------------------------------------------------------------------------------
    def settings(self) -> dict:
        out = {"mode": self.mode, "fixed_w": self.fixed_w, "scorer": asdict(self.scorer), "rule": asdict(self.rule),
               "gate": asdict(self.gate)}
        if self.image_gate is not None:
            out["image_gate"] = {"threshold": self.image_gate.threshold, "concept": list(self.image_gate.concept),
                                 **({"suspect_threshold": self.image_gate.suspect_threshold}
                                    if self.gate.kind != "none" else {}),
                                 "anchors": list(self.image_gate.anchors), "detector": asdict(self.image_gate.detector)}
        if self.negative_prompt is not None:
            out["negative_prompt"] = self.negative_prompt
        if self.substitute_prompt is not None:
            out["substitute_prompt"] = self.substitute_prompt
        return out

    def decide(self, bundle, prompts: Sequence[str], guidance: float) -> list[Decision]:
        """The prompt gate's decision for each prompt at one guidance scale."""
        if self.mode != "unguide":
            w = {"base": 1.0, "lora": 0.0, "fixed": self.fixed_w}[self.mode]
            return [Decision(w) for _ in prompts]
        if self.gate.kind == "none":  # no prompt gate: every prompt is drawn as kept, the image gate judges
            return [Decision(self.rule.w_keep, gate="none") for _ in prompts]
        empty = None
        if self.gate.kind == "empty":
            threshold = empty = self.scores(bundle, [""], guidance)[0]  # the neutral prompt: once per guidance scale
        else:
            threshold = self.gate.threshold
        scores = self.scores(bundle, prompts, guidance)
        if self.image_gates:  # an image gate follows: a prompt over the gate is a suspect, its image decides
            return [Decision(self.rule.w_keep, self.gate.kind, s, threshold, empty,
                             suspects=(self.concept,) if s > threshold else None) for s in scores]
        out = [Decision(self.rule.weight(s, threshold), self.gate.kind, s, threshold, empty) for s in scores]
        binary = self.rule.rule == "binary"
        return [self.erased(d) if binary and d.w == self.rule.w_erase else d for d in out]

    def prepare(self, bundle, items) -> list[Decision]:
        decisions: list[Optional[Decision]] = [None] * len(items)
        by_scale: dict[float, list[int]] = {}
        for i, it in enumerate(items):
            by_scale.setdefault(float(it.guidance), []).append(i)
        for scale, idxs in by_scale.items():
            for i, d in zip(idxs, self.decide(bundle, [items[i].prompt for i in idxs], scale)):
                decisions[i] = d
        return decisions

    def noise_fn(self, bundle, cond, uncond, scale, decisions: Sequence[Decision]):
        return guided_noise_fn(bundle, self.adapter, cond, uncond, scale, decisions)

    def review(self, bundle, items, latents, decisions: list[Decision], redraw):
        return review(self, bundle, items, latents, decisions, redraw)


def guide_for_run(adapter, run, config: Optional[GuidanceConfig] = None, **fields) -> UnGuide:
    """The guide for a stored erasure run (:class:`~unguide.erasure.runs.ErasureRun`: its calibration, its recipe's
    defaults, its concept) under ``config`` (or the same fields as keywords: ``guide_for_run(adapter, run,
    gate="empty")``); what the config leaves at None comes from the run."""
    config = (config or GuidanceConfig()).replace(**fields) if fields else (config or GuidanceConfig())
    spec, rule = config.resolved(run.defaults)
    calibration = run.calibration.prompt
    scorer_calibration = calibration.get("response", {}) if config.scorer.kind == "response" else calibration
    gate = PromptGate.from_spec(spec, scorer_calibration, config.gate_position)
    image_gate = ImageGate.from_stored(run.calibration.image, config.image_gate_position) if spec.image else None
    mode, fixed_w, note = config.mode, config.w, None
    if mode == "unguide" and config.gate is None and not spec.image and gate.kind == "calibrated" \
            and scorer_calibration.get("separated") is False:
        # the calibration could not tell the anchors from the concept's own prompts, so a threshold would misroute
        # some of either: every prompt gets the adapter alone (w = 0) instead of an untrustworthy per-prompt choice
        mode, fixed_w = "fixed", 0.0
        note = ("the run's calibrated gate does not separate its anchors from the concept's prompts (margin "
                f"{scorer_calibration.get('margin', float('nan')):.2f}): every prompt uses the adapter alone (w = 0)")
    concept = run.concept
    negative = concept.get("target") if (config.erase_with or run.defaults.erase_with) == "negative" else None
    guide = UnGuide(adapter, mode=mode, scorer=config.scorer, rule=rule, fixed_w=fixed_w, gate=gate,
                    stored=calibration, image_gate=image_gate, negative_prompt=negative,
                    substitute_prompt=concept.get("reference") if spec.image else None,
                    concept=concept.get("name") or "concept")
    guide.note = note
    return guide
