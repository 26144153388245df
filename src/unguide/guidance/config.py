"""How generation guides with an erasure run: the settings and their checks, each rule written once.

* :class:`GateSpec`: the one spelling of a gate. ``empty`` (the paper's d("") rule), ``calibrated`` (the run's stored
  threshold), a positive number (that threshold), ``image`` (no prompt gate: every prompt is drawn by the base model
  and its image checked) or ``calibrated+image`` (as ``image``, but a prompt over the calibrated gate is a suspect,
  its image checked under a more lenient threshold: the words raise the image gate's suspicion, never erase on their
  own). A recipe stores its default in the same spelling.
* :class:`ScorerConfig` (how a prompt's influence is scored), :class:`WeightRule` (score -> w), the weights of kept
  and erased prompts (:data:`KEEP_WEIGHTS`, :data:`ERASE_WEIGHTS`), :class:`GateDefaults` (what a recipe's runs use
  unless told otherwise) and :class:`GuidanceConfig` (what a caller asks for; None fields take the run's defaults).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, Optional, get_args

from ..errors import UnguideError, check_number

ScorerKind = Literal["fast", "reference", "response"]
SCORERS: tuple[str, ...] = get_args(ScorerKind)
PromptGateKind = Literal["empty", "calibrated", "value"]
Weighting = Literal["binary", "continuous"]
GuideMode = Literal["unguide", "base", "lora", "fixed"]

KEEP_WEIGHTS = {"paper": 2.0, "base": 1.0}
# "negative": the adapter alone (w = 0) with the concept's own target prompt as the negative prompt (it replaces the
# empty prompt in classifier-free guidance), a push away from the concept that does not depend on the prompt's words
ERASE_WEIGHTS = {"paper": -1.0, "adapter": 0.0, "negative": 0.0}
# gate choices beside a number: the prompt gates, and the image gate alone or behind the calibrated prompt gate
GATE_CHOICES = ("calibrated", "empty", "image", "calibrated+image")
CALIBRATION_SAMPLES = 8  # base images per prompt the image gate is calibrated on (EraseConfig.calibration_samples)
GATE_POSITION = 0.5  # the calibrated prompt threshold's default place between anchors (0) and concept prompts (1)


def check_position(name: str, position) -> float:
    """A gate position (prompt or image gate) lies in [0, 1]: 0 at the anchors' side, 1 at the concept's."""
    return check_number(f"`{name}`", position, low=0, high=1)


def check_mode(mode: str, w: Optional[float]) -> None:
    if mode not in get_args(GuideMode):
        raise UnguideError(f"unknown `mode` {mode!r}: use unguide, base or lora (or give `w`)")
    if mode == "fixed" and w is None:
        raise UnguideError("mode 'fixed' needs a weight: give `w`")


@dataclass(frozen=True)
class GateSpec:
    """A gate as parsed from its one spelling: the prompt gate (None: none) and whether the image gate follows it."""

    prompt: Optional[PromptGateKind]
    image: bool = False
    value: Optional[float] = None  # the threshold of a ``value`` gate

    @classmethod
    def parse(cls, gate: str | float) -> "GateSpec":
        if isinstance(gate, str) and gate in GATE_CHOICES:
            return {"empty": cls("empty"), "calibrated": cls("calibrated"), "image": cls(None, image=True),
                    "calibrated+image": cls("calibrated", image=True)}[gate]
        try:
            value = float(gate)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise UnguideError(f"`gate` {gate!r}: use {', '.join(GATE_CHOICES)} or a positive number")
        return cls("value", value=check_number("`gate`", value, above=0))

    def spelling(self) -> str | float:
        if self.prompt == "value":
            return self.value
        return {("empty", False): "empty", ("calibrated", False): "calibrated", (None, True): "image",
                ("calibrated", True): "calibrated+image"}[(self.prompt, self.image)]

    def check_positions(self, gate_position: Optional[float], image_gate_position: Optional[float]) -> None:
        """Each position moves a gate this spec uses."""
        if gate_position is not None and self.prompt != "calibrated":
            raise UnguideError(f"`gate_position` moves the calibrated prompt gate, which `gate` {self.spelling()!r} "
                               "does not use: use `gate` calibrated or calibrated+image, or drop `gate_position`")
        if image_gate_position is not None and not self.image:
            raise UnguideError("`image_gate_position` applies to the image gates only: use `gate` image or "
                               "calibrated+image")


@dataclass(frozen=True)
class GateDefaults:
    """How generation uses a recipe's runs unless told otherwise (stored with each run)."""

    gate: str | float = "empty"
    keep: str = "paper"
    erase_with: str = "paper"

    def __post_init__(self):
        GateSpec.parse(self.gate)
        _check_weights(self.keep, self.erase_with)


def _check_weights(keep: Optional[str], erase_with: Optional[str]) -> None:
    if keep not in (None, *KEEP_WEIGHTS):
        raise UnguideError(f"unknown `keep` {keep!r}: use base (w = 1) or paper (w = 2)")
    if erase_with not in (None, *ERASE_WEIGHTS):
        raise UnguideError(f"unknown `erase_with` {erase_with!r}: use {', '.join(ERASE_WEIGHTS)}")


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


@dataclass(frozen=True)
class GuidanceConfig:
    """How generation uses an attached erasure run, checked where it is made (names, finite numbers, ranges, which
    settings go together). Every field left at None takes the run's :class:`GateDefaults` (its recipe's): the paper's
    d("") gate with w in {-1, 2} for reference runs, the image gate for selective ones.

    * ``mode``: ``unguide`` (a weight w per prompt from the gates), ``base`` (w = 1), ``lora`` (w = 0), ``fixed``
      (every prompt gets ``w``; giving ``w`` implies it);
    * ``gate``: a gate's spelling (:class:`GateSpec`);
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
        if self.w is not None:
            object.__setattr__(self, "w", check_number("`w`", self.w))
            if self.mode not in ("unguide", "fixed"):
                raise UnguideError("give either `mode` or `w`, not both")
            object.__setattr__(self, "mode", "fixed")
        check_mode(self.mode, self.w)
        if self.gate is not None:
            object.__setattr__(self, "gate", GateSpec.parse(self.gate).spelling())
        _check_weights(self.keep, self.erase_with)
        for name in ("gate_position", "image_gate_position"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, check_position(name, getattr(self, name)))
        if self.gate is not None:  # with the run's default gate, checked when the guide is made (resolved)
            GateSpec.parse(self.gate).check_positions(self.gate_position, self.image_gate_position)

    def replace(self, **changes) -> "GuidanceConfig":
        return replace(self, **changes)

    @property
    def is_default(self) -> bool:
        return self == GuidanceConfig()

    def resolved(self, defaults: GateDefaults) -> tuple[GateSpec, WeightRule]:
        """The gate and weights this config asks for, what it leaves at None taken from a run's ``defaults``."""
        spec = GateSpec.parse(self.gate if self.gate is not None else defaults.gate)
        spec.check_positions(self.gate_position, self.image_gate_position)
        rule = replace(self.rule, w_keep=KEEP_WEIGHTS[self.keep or defaults.keep],
                       w_erase=ERASE_WEIGHTS[self.erase_with or defaults.erase_with])
        return spec, rule


def decision_settings(scorer: Optional[str], weighting: Optional[str]) -> dict:
    """The scorer and weighting rule named on the command line (None: the fast scorer, binary rule)."""
    named = {"reference": ScorerConfig.reference(), "response": ScorerConfig(kind="response")}
    return {"scorer": named.get(scorer or "fast", ScorerConfig()),
            "rule": WeightRule(rule=weighting or "binary")}


@dataclass(frozen=True)
class Calibration:
    """What a run's gates were calibrated to at the end of its erasure (apart from its recipe's defaults):
    ``prompt``, the prompt gate's record (:func:`~unguide.guidance.prompt_gate.calibrate_gate`: scores, d(""),
    threshold, and the response scorer's own under ``response``); ``image``, the image gate's
    (:func:`~unguide.guidance.image_gate.calibrate_image_gate`), None for runs without anchors."""

    prompt: dict
    image: Optional[dict] = None
