"""Erasure recipes: the settings of one erasure (:class:`EraseConfig`, the reference protocol's defaults) and the named
recipes that change them (``reference``: the paper's; ``selective``: learnable A plus anchors), each with the
generation defaults its runs carry (:class:`~unguide.guidance.config.GateDefaults`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, get_args

from .schedule import SCHEDULES, Schedule
from .adapters import A_INITS, LAYER_PRESETS, AdapterConfig, AInit, LayerPreset
from .concepts import ConceptSpec
from ..errors import UnguideError
from ..guidance.config import CALIBRATION_SAMPLES, GATE_POSITION, GateDefaults, check_position

# Recipes, registered by name: what each changes from the reference protocol's defaults (the EraseConfig defaults
# below), and how generation uses a run of it unless told otherwise (guidance.guide_for_run). A new recipe is one
# register_recipe line; the CLI's --recipe and the benchmark's methods pick it up.
RECIPE_SETTINGS: dict[str, dict] = {}
RECIPE_GATES: dict[str, GateDefaults] = {}
# what a recipe changes on one kind of denoiser ("unet", "mmdit", "flux"; adapters.denoiser_kind), over its settings
RECIPE_DENOISER_SETTINGS: dict[str, dict[str, dict]] = {}
RECIPES = RECIPE_SETTINGS  # the registered names


def register_recipe(name: str, settings: dict, gates: GateDefaults,
                    per_denoiser: Optional[dict[str, dict]] = None) -> None:
    """``settings``: EraseConfig fields the recipe changes; ``gates``: its runs' generation defaults (the gate, the
    ``keep`` and ``erase_with`` weights), stored with each run; ``per_denoiser``: fields it sets differently on one
    kind of denoiser (``{"mmdit": {...}}``)."""
    per_denoiser = dict(per_denoiser or {})
    unknown = set(settings).union(*per_denoiser.values()) - set(EraseConfig.__dataclass_fields__)
    if unknown:
        raise UnguideError(f"recipe {name!r} sets unknown erase settings {sorted(unknown)}")
    if not isinstance(gates, GateDefaults):
        raise UnguideError(f"recipe {name!r}: give its generation defaults as a GateDefaults(gate, keep, erase_with)")
    RECIPE_SETTINGS[name], RECIPE_GATES[name] = dict(settings), gates
    RECIPE_DENOISER_SETTINGS[name] = per_denoiser


# EraseConfig fields that say how a run's gates are calibrated, not how its adapter is trained: a finished run asked for
# other values is recalibrated, not retrained
CALIBRATION_SETTINGS = ("calibration_steps", "calibration_samples", "calibration_ceiling")

TimestepMapping = Literal["reference", "aligned"]
TIMESTEP_MAPPINGS: tuple[str, ...] = get_args(TimestepMapping)


@dataclass
class EraseConfig:
    """Defaults are the reference protocol's (`../shared/METHOD.md` section 2, beside this repository); ``from_recipe`` names a whole recipe."""

    preset: LayerPreset = "object"
    iterations: int = 200
    lr: float = 3e-5
    eta: float = 2.0  # negative-guidance strength
    start_guidance: float = 9.0  # CFG scale of the partial trajectories
    ddim_steps: int = 50
    rank: int = 1
    alpha: float = 8.0
    seed: int = 0
    checkpoint_every: int = 20
    # "reference": t drawn in [k*1000/50, (k+1)*1000/50) as the reference code does, although z_k (k steps from
    # noise) sits near timestep 1000 - k*20; "aligned": t is the timestep z_k actually sits at
    timestep_mapping: TimestepMapping = "reference"
    recipe: str = "reference"  # the name of the recipe these settings came from (recorded with the run)
    a_init: AInit = "gaussian"  # LoRA A init: gaussian = N(0, 1/rank) (reference), uniform = +-1/sqrt(fan_in)
    anchor_weight: float = 0.0  # lambda of the anchor-preservation term (0: none, the reference)
    anchors_per_step: int = 1  # anchor prompts drawn per iteration
    anchors: Optional[list] = None  # anchor prompts; None: the concept's own
    # False (reference): every iteration erases the target prompt; True: each iteration erases one prompt drawn from
    # the target and the concept's trained synonyms, so the adapter learns the words the spec lists, not one phrase
    erase_synonyms: bool = False
    # where the calibrated gate's threshold sits between the highest anchor score (0) and the lowest concept-prompt
    # score (1), on a log scale; 0.5 (their geometric mean) unless a concept spec or flag says otherwise
    gate_position: float = GATE_POSITION
    # DDIM steps of the base drawings the image gate is calibrated on (generation's default; the benchmark passes its
    # own). How the gate is calibrated, not how the adapter is trained: a finished run asked for another value is
    # recalibrated, not retrained
    calibration_steps: int = 50
    # base images per calibration prompt (the same rule: another value recalibrates, does not retrain); fewer make
    # quick runs and tests cheaper at the price of a noisier threshold
    calibration_samples: int = CALIBRATION_SAMPLES
    # the image gate's usual threshold never above this score (None: no cap; image_gate.image_threshold); the same
    # rule: another value recalibrates, does not retrain
    calibration_ceiling: Optional[float] = None
    # where each iteration's points z_k come from (erasure/schedule.py): "fresh" (reference, ESD's) draws a partial
    # trajectory with the model being trained for every sample; "cached" draws the base model's trajectories of the
    # erased prompts once (``trajectories`` noises each, in one batch) and reads every sample's z_k from them
    schedule: Schedule = "fresh"
    batch: int = 1  # samples (z_k, t, erased prompt, anchors) per optimiser step
    trajectories: int = 8  # cached schedule: trajectories per erased prompt in each drawing
    refresh: int = 0  # cached schedule: the model being trained redraws them every this many iterations (0: never)

    def __post_init__(self):
        checks = [(self.recipe in RECIPES, f"unknown recipe {self.recipe!r}: use {' or '.join(RECIPES)}"),
                  (self.preset in LAYER_PRESETS, f"unknown layer preset {self.preset!r}: use {', '.join(LAYER_PRESETS)}"),
                  (self.a_init in A_INITS, f"unknown A init {self.a_init!r}: use {' or '.join(A_INITS)}"),
                  (self.timestep_mapping in TIMESTEP_MAPPINGS,
                   f"unknown timestep mapping {self.timestep_mapping!r}: use {' or '.join(TIMESTEP_MAPPINGS)}"),
                  (self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}: use {' or '.join(SCHEDULES)}"),
                  (min(self.iterations, self.rank, self.calibration_steps, self.calibration_samples, self.batch,
                       self.trajectories) >= 1,
                   "iterations, rank, calibration steps and samples, batch and trajectories must be >= 1"),
                  (self.lr > 0 and self.refresh >= 0, "the learning rate must be > 0 and refresh >= 0"),
                  (self.anchor_weight >= 0 and self.anchors_per_step >= 1,
                   "the anchor weight must be >= 0 and anchors per step >= 1")]
        check_position("gate_position", self.gate_position)
        for ok, message in checks:
            if not ok:
                raise UnguideError(message)

    @classmethod
    def from_recipe(cls, recipe: str = "reference", denoiser: str = "unet", **overrides) -> "EraseConfig":
        """The named recipe's settings (with what it sets for this kind of denoiser), then ``overrides`` (None values
        are ignored, so CLI defaults pass through)."""
        if recipe not in RECIPE_SETTINGS:
            raise UnguideError(f"unknown recipe {recipe!r}: use {' or '.join(RECIPES)}")
        settings = {**RECIPE_SETTINGS[recipe], **RECIPE_DENOISER_SETTINGS[recipe].get(denoiser, {})}
        schedule = overrides.get("schedule")
        if schedule is not None and schedule != settings.get("schedule", "fresh"):
            if schedule not in SCHEDULE_SETTINGS:
                raise UnguideError(f"unknown schedule {schedule!r}: use {' or '.join(SCHEDULE_SETTINGS)}")
            settings.update(SCHEDULE_SETTINGS[schedule])  # another schedule brings its own batch and iterations
        settings.update({k: v for k, v in overrides.items() if v is not None})
        return cls(recipe=recipe, **settings)

    @classmethod
    def for_concept(cls, recipe: str, concept: ConceptSpec, denoiser: str = "unet", **overrides) -> "EraseConfig":
        """``from_recipe`` with what the concept's spec asks for where ``overrides`` leave it open (None): its layer
        preset and, if the spec says, whether to erase its synonyms (an attribute whose synonym prompts name one
        object, like the toy 'red', turns it off) and, for recipes with anchors, its anchor weight and anchors per
        iteration. ``denoiser``: the kind the run erases on (``adapters.denoiser_kind``)."""
        spec = {"preset": concept.preset, "erase_synonyms": concept.erase_synonyms}
        if RECIPE_SETTINGS.get(recipe, {}).get("anchor_weight", 0) > 0:  # never the reference recipe: no anchors
            spec.update(anchor_weight=concept.anchor_weight, anchors_per_step=concept.anchors_per_step,
                        gate_position=concept.gate_position)
        for key, value in spec.items():
            if overrides.get(key) is None:
                overrides[key] = value
        return cls.from_recipe(recipe, denoiser, **overrides)

    def adapter_config(self) -> AdapterConfig:
        return AdapterConfig(self.preset, self.rank, self.alpha, self.a_init)


# A schedule is named with the settings that go with it (a recipe takes one; ``--schedule`` swaps it, so that "fresh"
# on the selective recipe is exactly its earlier schedule). "cached" costs a third of "fresh"'s UNet evaluations:
# its trajectories are drawn in batches of every erased prompt (by the base model, then every 50 iterations by the
# model being trained) over 25 DDIM steps, and the image gate is calibrated on 6 drawings of 20 steps per prompt
# instead of 8 of 50 (docs/recipes.md, "Schedules"; measured with `unguide benchmark-erase`).
SCHEDULE_SETTINGS: dict[str, dict] = {
    "fresh": {"schedule": "fresh", "batch": 1, "iterations": 200, "ddim_steps": 50, "calibration_steps": 50,
              "calibration_samples": CALIBRATION_SAMPLES},
    "cached": {"schedule": "cached", "batch": 1, "iterations": 200, "ddim_steps": 25, "trajectories": 4,
               "refresh": 50, "calibration_steps": 20, "calibration_samples": 6},
}

register_recipe("reference", {}, GateDefaults(gate="empty", keep="paper", erase_with="paper"))
# (selective runs finished before the image gate stored "calibrated" / "paper": they keep it until a rerun of
# `unguide erase` adds the image gate's calibration)
# On a joint-attention transformer the adapter's change to a prompt's text tokens reaches the image through every
# later block, so holding the anchors takes a stronger anchor term. toyworld-flow, sun/star/boat, 8 seeds, the adapter
# alone on the context embedder: anchor weight 1 keeps held-out classes at Acc_s 71.9 (SSIM vs base 0.42), 4: 75.2
# (0.62), 16: 78.6 (0.71), 32: 84.1 (0.72), 64: 86.2 (0.70; boat's erasure starts to give, Acc_e 3.2), 256 erases
# neither sun nor star (docs/model-families.md)
ANCHOR_WEIGHT_MMDIT = 32.0
register_recipe("selective", {"a_init": "uniform", "lr": 1e-3, "anchor_weight": 1.0, "anchors_per_step": 1,
                              "erase_synonyms": True, **SCHEDULE_SETTINGS["cached"]},
                GateDefaults(gate="calibrated+image", keep="base", erase_with="adapter"),
                per_denoiser={"mmdit": {"anchor_weight": ANCHOR_WEIGHT_MMDIT},
                              "flux": {"anchor_weight": ANCHOR_WEIGHT_MMDIT}})
