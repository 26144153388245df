"""Methods: what the benchmark, the attack and the demo compare. A method names the erasure run it needs (recipe,
adapter preset, run folder) and how it guides generation with that run; methods are registered where they are
defined, so adding one is one :func:`register_method` line (its recipe aside)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..erasure.training import EraseConfig
from ..errors import UnguideError
from ..guidance.unguidance import guide_for_run


@dataclass(frozen=True)
class GuideOverrides:
    """What a benchmark may change in a gated method's guide; None: the run's stored defaults."""

    keep: Optional[str] = None
    erase_with: Optional[str] = None
    gate_position: Optional[float] = None  # the calibrated prompt gate's
    image_gate: Optional[str] = None  # "image" or "calibrated+image", for methods that use the image gate
    image_position: Optional[float] = None


@dataclass(frozen=True)
class Method:
    """How a compared method erases and guides. ``recipe`` None: the base model, no run."""

    name: str
    recipe: Optional[str] = None
    preset: Optional[str] = None  # the adapter's layer preset; None: the concept's own
    run_dir: Optional[str] = None  # folder under runs/<concept>/; methods with one folder share one trained run
    mode: str = "base"  # guide_for_run's mode: lora (adapter alone), unguide (w per prompt)
    gate: Optional[str] = None  # None: the run's stored default gate
    erase_with: Optional[str] = None  # None: the run's stored weight for erased prompts
    tunable: bool = False  # the benchmark's keep / erase-with / gate-position overrides apply
    description: str = ""

    @property
    def erases(self) -> bool:
        return self.recipe is not None

    @property
    def image_gated(self) -> bool:
        return self.tunable and (self.gate is None or "image" in self.gate)

    @property
    def scores_prompts(self) -> bool:
        """Whether its guide scores every prompt (the report then shows scores and w)."""
        return self.mode == "unguide"

    def erase_config(self, spec, iterations: Optional[int] = None, lr: Optional[float] = None) -> EraseConfig:
        return EraseConfig.for_concept(self.recipe, spec, preset=self.preset, iterations=iterations,
                                       lr=lr if self.recipe == "reference" else None)

    def guide(self, adapter, meta: dict, overrides: GuideOverrides = GuideOverrides()):
        gate = overrides.image_gate if self.image_gated and overrides.image_gate is not None else self.gate
        position = overrides.gate_position if self.tunable and gate != "image" else None
        return guide_for_run(adapter, meta, mode=self.mode, gate=gate,
                             keep=overrides.keep if self.tunable else None,
                             erase_with=(overrides.erase_with or self.erase_with) if self.tunable else None,
                             gate_position=position, image_position=overrides.image_position if self.image_gated else None)


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UnguideError(f"unknown method {name!r}: choose from {', '.join(METHODS)}")
    return METHODS[name]


register_method(Method("base", description="the model as trained"))
register_method(Method("lora", "reference", None, "object", "lora", description="the reference adapter alone"))
register_method(Method("unguide", "reference", None, "object", "unguide",
                       description="the paper: reference adapter, UnGuidance with the d(\"\") gate"))
register_method(Method("full", "reference", "full", "full", "lora", description="full fine-tuning of the same layers"))
register_method(Method("selective", "selective", None, "selective", "lora", description="the selective adapter alone"))
# the calibrated prompt gate as it was measured before image gates: prompts over it get w = -1
register_method(Method("selective-unguide", "selective", None, "selective", "unguide", "calibrated", "paper",
                       tunable=True, description="selective adapter, calibrated prompt gate"))
register_method(Method("selective-image", "selective", None, "selective", "unguide", "image", tunable=True,
                       description="selective adapter, image gate (the default)"))
