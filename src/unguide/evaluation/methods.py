"""Methods: what the benchmark, the attack and the demo compare. A method names the erasure run it needs (recipe,
adapter preset, run folder) and how it guides generation with that run; methods are registered where they are
defined, so adding one is one :func:`register_method` line (its recipe aside)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..erasure.training import RECIPE_SETTINGS, EraseConfig
from ..errors import UnguideError
from ..guidance.config import GuidanceConfig


@dataclass(frozen=True)
class GuideOverrides:
    """What a benchmark may change in a gated method's guide; None: the run's stored defaults."""

    keep: Optional[str] = None
    erase_with: Optional[str] = None
    gate_position: Optional[float] = None  # the calibrated prompt gate's
    image_gate: Optional[str] = None  # "calibrated+image" or "image", for methods that use the image gate
    image_position: Optional[float] = None


@dataclass(frozen=True)
class Method:
    """How a compared method erases and guides. ``recipe`` None: the base model, no run."""

    name: str
    recipe: Optional[str] = None
    preset: Optional[str] = None  # the adapter's layer preset; None: the concept's own
    run_dir: Optional[str] = None  # folder under runs/<concept>/; methods with one folder share one trained run
    guidance: GuidanceConfig = GuidanceConfig(mode="base")  # how it guides with its run (None fields: the run's own)
    tunable: bool = False  # the benchmark's keep / erase-with / gate-position overrides apply
    description: str = ""

    @property
    def erases(self) -> bool:
        return self.recipe is not None

    @property
    def image_gated(self) -> bool:
        return self.tunable and (self.guidance.gate is None or "image" in str(self.guidance.gate))

    @property
    def scores_prompts(self) -> bool:
        """Whether its guide scores every prompt (the report then shows scores and w)."""
        return self.guidance.mode == "unguide"

    def erase_config(self, spec, iterations: Optional[int] = None, lr: Optional[float] = None,
                     calibration_steps: Optional[int] = None, calibration_samples: Optional[int] = None,
                     schedule: Optional[str] = None, denoiser: str = "unet") -> EraseConfig:
        return EraseConfig.for_concept(self.recipe, spec, denoiser, preset=self.preset, iterations=iterations,
                                       lr=lr if self.recipe == "reference" else None,
                                       calibration_steps=calibration_steps, calibration_samples=calibration_samples,
                                       schedule=schedule)

    def guidance_config(self, overrides: GuideOverrides = GuideOverrides()) -> GuidanceConfig:
        """Its guidance with a benchmark's overrides applied (tunable methods only)."""
        if not self.tunable:
            return self.guidance
        own = self.guidance
        gate = overrides.image_gate if self.image_gated and overrides.image_gate is not None else own.gate
        return own.replace(gate=gate, keep=overrides.keep or own.keep, erase_with=overrides.erase_with or own.erase_with,
                           gate_position=overrides.gate_position if gate != "image" else None,
                           image_gate_position=overrides.image_position if self.image_gated else None)

    def guide(self, adapter, run, overrides: GuideOverrides = GuideOverrides()):
        return run.guide(adapter, self.guidance_config(overrides))


def schedule_suffix(method: str, schedule: Optional[str]) -> str:
    """``-SCHEDULE`` for a method whose runs are erased with a schedule other than its recipe's own (``benchmark
    --schedule``): its runs and images are kept apart from the default's, so both compare in one directory."""
    recipe = METHODS[method.removesuffix("+together")].recipe if method.removesuffix("+together") in METHODS else None
    if schedule is None or recipe is None:
        return ""
    return "" if schedule == RECIPE_SETTINGS[recipe].get("schedule", "fresh") else f"-{schedule}"


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UnguideError(f"unknown method {name!r}: choose from {', '.join(METHODS)}")
    return METHODS[name]


LORA, UNGUIDE = GuidanceConfig(mode="lora"), GuidanceConfig(mode="unguide")
register_method(Method("base", description="the model as trained"))
register_method(Method("lora", "reference", None, "object", LORA, description="the reference adapter alone"))
register_method(Method("unguide", "reference", None, "object", UNGUIDE,
                       description="the paper: reference adapter, UnGuidance with the d(\"\") gate"))
register_method(Method("full", "reference", "full", "full", LORA, description="full fine-tuning of the same layers"))
register_method(Method("selective", "selective", None, "selective", LORA, description="the selective adapter alone"))
# the calibrated prompt gate as it was measured before image gates: prompts over it get w = -1
register_method(Method("selective-unguide", "selective", None, "selective",
                       GuidanceConfig(gate="calibrated", erase_with="paper"), tunable=True,
                       description="selective adapter, calibrated prompt gate"))
# the default: the calibrated prompt gate marks suspects, the image gate decides on every image (issue 36)
register_method(Method("selective-image", "selective", None, "selective", GuidanceConfig(gate="calibrated+image"),
                       tunable=True, description="selective adapter, prompt gate in front of the image gate (the default)"))
