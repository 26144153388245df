"""Erasure training (``unguide erase``): the negative-guidance objective of ESD on a LoRA adapter.

Each iteration (METHOD.md section 2): pick a DDIM step k in [0, 50), run the *adapted* model with CFG
(scale 9) on the target prompt for k steps from fresh noise (the shared sampling loop), map k to a DDPM
time t in [k*1000/50, (k+1)*1000/50), and regress the adapted prediction for the target onto
``eps_base(ref) - eta * (eps_base(tgt) - eps_base(ref))``, computed by the same UNet with the adapter off.

All randomness of iteration i comes from a generator seeded with (seed, i) and the Adam state is
checkpointed, so a resumed run ends with exactly the adapter an uninterrupted run would.

Two recipes (``EraseConfig.from_recipe``):

* ``reference``: the paper's protocol, unchanged (LoRA A ~ N(0, 1), lr 3e-5, no anchors).
* ``selective``: A initialised uniform in +-1/sqrt(fan_in) (peft's default) so that it can learn *which* token
  states carry the concept, lr 1e-3, and an anchor term: at the same z_k and t, the adapted model must predict
  what the base model predicts for anchor prompts (``anchor_weight * MSE``, one anchor drawn per iteration unless
  the spec asks for more). A spec's vocabulary is trained like its anchors; the gate is calibrated on the anchors
  alone (``gate_anchors``). With a random A that the reference lr never moves, the adapter acts on every prompt
  alike; with a learnable A plus anchors it learns to leave prompts unlike the target alone, including ones it
  never saw (docs/findings-toyworld.md). Each iteration erases one prompt drawn from the target and the spec's
  trained synonyms (``erase_synonyms``), so the adapter learns the words the spec lists, not one phrase; a spec
  may turn this off (``EraseConfig.for_concept``).

At the end of every run the gate is calibrated (:func:`unguide.guidance.unguidance.calibrate_gate`) and stored with it.
"""
from __future__ import annotations

import json
import platform
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal, Optional, get_args

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .adapters import A_INITS, LAYER_PRESETS, LORA_FILE, AdapterConfig, AInit, LayerPreset, make_adapter
from .concepts import ConceptSpec, default_anchors
from ..errors import UnguideError
from ..io import load_optimizer_tensors, load_tensors, optimizer_tensors, output_lock, save_tensors, write_json, write_text
from ..guidance.unguidance import GATE_POSITION, calibrate_gate, check_gate_position
from ..guidance.image_gate import DetectorConfig, calibrate_image_gate
from ..models.worlds import world_of
from ..sampling.ddim import cfg_noise_fn, ddim_loop, make_scheduler, unet_eps

METADATA_FILE = "erasure.json"
CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_STATE = "checkpoint.json"
LOG_FILE = "train_log.jsonl"
LOG = logging.getLogger("unguide")  # the CLI shows INFO lines; a library caller can silence them


# Recipes, registered by name: what each changes from the reference protocol's defaults (the EraseConfig defaults
# below), and how generation uses a run of it unless told otherwise (guidance.guide_for_run). A new recipe is one
# register_recipe line; the CLI's --recipe and the benchmark's methods pick it up.
RECIPE_SETTINGS: dict[str, dict] = {}
RECIPE_GATES: dict[str, dict] = {}
RECIPES = RECIPE_SETTINGS  # the registered names


def register_recipe(name: str, settings: dict, gates: dict) -> None:
    """``settings``: EraseConfig fields the recipe changes; ``gates``: its runs' generation defaults (``default``
    gate, ``keep`` and ``erase_with`` weights)."""
    unknown = set(settings) - set(EraseConfig.__dataclass_fields__)
    if unknown:
        raise UnguideError(f"recipe {name!r} sets unknown erase settings {sorted(unknown)}")
    RECIPE_SETTINGS[name], RECIPE_GATES[name] = dict(settings), dict(gates)


TimestepMapping = Literal["reference", "aligned"]
TIMESTEP_MAPPINGS: tuple[str, ...] = get_args(TimestepMapping)


@dataclass
class EraseConfig:
    """Defaults are the reference protocol's (METHOD.md section 2); ``from_recipe`` names a whole recipe."""

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

    def __post_init__(self):
        checks = [(self.recipe in RECIPES, f"unknown recipe {self.recipe!r}: use {' or '.join(RECIPES)}"),
                  (self.preset in LAYER_PRESETS, f"unknown layer preset {self.preset!r}: use {', '.join(LAYER_PRESETS)}"),
                  (self.a_init in A_INITS, f"unknown A init {self.a_init!r}: use {' or '.join(A_INITS)}"),
                  (self.timestep_mapping in TIMESTEP_MAPPINGS,
                   f"unknown timestep mapping {self.timestep_mapping!r}: use {' or '.join(TIMESTEP_MAPPINGS)}"),
                  (self.iterations >= 1 and self.rank >= 1 and self.calibration_steps >= 1,
                   "iterations, rank and calibration steps must be >= 1"),
                  (self.lr > 0, "the learning rate must be > 0"),
                  (self.anchor_weight >= 0 and self.anchors_per_step >= 1,
                   "the anchor weight must be >= 0 and anchors per step >= 1")]
        check_gate_position(self.gate_position)
        for ok, message in checks:
            if not ok:
                raise UnguideError(message)

    @classmethod
    def from_recipe(cls, recipe: str = "reference", **overrides) -> "EraseConfig":
        """The named recipe's settings, then ``overrides`` (None values are ignored, so CLI defaults pass through)."""
        if recipe not in RECIPE_SETTINGS:
            raise UnguideError(f"unknown recipe {recipe!r}: use {' or '.join(RECIPES)}")
        settings = {**RECIPE_SETTINGS[recipe], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(recipe=recipe, **settings)

    @classmethod
    def for_concept(cls, recipe: str, concept: ConceptSpec, **overrides) -> "EraseConfig":
        """``from_recipe`` with what the concept's spec asks for where ``overrides`` leave it open (None): its layer
        preset and, if the spec says, whether to erase its synonyms (an attribute whose synonym prompts name one
        object, like the toy 'red', turns it off) and, for recipes with anchors, its anchor weight and anchors per
        iteration."""
        spec = {"preset": concept.preset, "erase_synonyms": concept.erase_synonyms}
        if RECIPE_SETTINGS.get(recipe, {}).get("anchor_weight", 0) > 0:  # never the reference recipe: no anchors
            spec.update(anchor_weight=concept.anchor_weight, anchors_per_step=concept.anchors_per_step,
                        gate_position=concept.gate_position)
        for key, value in spec.items():
            if overrides.get(key) is None:
                overrides[key] = value
        return cls.from_recipe(recipe, **overrides)

    def adapter_config(self) -> AdapterConfig:
        return AdapterConfig(self.preset, self.rank, self.alpha, self.a_init)


register_recipe("reference", {}, {"default": "empty", "keep": "paper", "erase_with": "paper"})
# (selective runs finished before the image gate stored "calibrated" / "paper": they keep it until a rerun of
# `unguide erase` adds the image gate's calibration)
register_recipe("selective", {"a_init": "uniform", "lr": 1e-3, "anchor_weight": 1.0, "anchors_per_step": 1,
                              "erase_synonyms": True},
                {"default": "image", "keep": "base", "erase_with": "adapter"})


def _iteration_sample(cfg: EraseConfig, i: int, latent_shape) -> tuple[int, int, torch.Tensor]:
    """(k, ddpm_t, z_T) of iteration i: a pure function of (seed, i)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)
    k = int(torch.randint(0, cfg.ddim_steps, (1,), generator=g))
    lo, hi = round(k / cfg.ddim_steps * 1000), round((k + 1) / cfg.ddim_steps * 1000)
    t = int(torch.randint(lo, hi, (1,), generator=g))
    z = torch.randn((1, *latent_shape), generator=g)
    return k, t, z


def _iteration_anchors(cfg: EraseConfig, i: int, n_anchors: int) -> list[int]:
    """Which anchors iteration i uses: a pure function of (seed, i), drawn apart from the reference stream."""
    rng = np.random.default_rng([cfg.seed, i, 1])
    return sorted(rng.choice(n_anchors, size=min(cfg.anchors_per_step, n_anchors), replace=False).tolist())


def _iteration_prompt(cfg: EraseConfig, i: int, n_prompts: int) -> int:
    """Which of the concept's prompts (0: the target) iteration i erases: a pure function of (seed, i)."""
    if not cfg.erase_synonyms or n_prompts == 1:
        return 0
    return int(np.random.default_rng([cfg.seed, i, 2]).integers(n_prompts))


def erasure_loss(unet, adapter, sched, cfg: EraseConfig, k: int, t: int, z: torch.Tensor, prompts,
                 anchors: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
    """The negative-guidance loss at one (k, t, z_T), plus ``anchor_weight`` x the anchor-preservation loss when
    anchor states are given; gradients flow into the adapter only. Returns (loss, its parts for the log)."""
    tgt, ref, empty = prompts
    with torch.no_grad():
        z_k = ddim_loop(sched, z * sched.init_noise_sigma, cfg_noise_fn(unet, tgt, empty, cfg.start_guidance), stop=k)
    if anchors is None:  # the reference protocol, exactly as it has always been computed
        with torch.no_grad():
            with adapter.base():
                e_ref, e_tgt = unet_eps(unet, torch.cat([z_k, z_k]), t, torch.cat([ref, tgt])).chunk(2)
            target = e_ref - cfg.eta * (e_tgt - e_ref)
        pred = unet_eps(unet, z_k, t, tgt)
        loss = F.mse_loss(pred.float(), target.float())
        return loss, {"erase": loss.item()}
    n = anchors.shape[0]
    with torch.no_grad(), adapter.base():
        base = unet_eps(unet, z_k.expand(n + 2, -1, -1, -1), t, torch.cat([ref, tgt, anchors]))
    e_ref, e_tgt, e_anchor = base[:1], base[1:2], base[2:]
    target = e_ref - cfg.eta * (e_tgt - e_ref)
    pred = unet_eps(unet, z_k.expand(n + 1, -1, -1, -1), t, torch.cat([tgt, anchors]))
    erase_part = F.mse_loss(pred[:1].float(), target.float())
    anchor_part = F.mse_loss(pred[1:].float(), e_anchor.float())
    return erase_part + cfg.anchor_weight * anchor_part, {"erase": erase_part.item(), "anchor": anchor_part.item()}


def concept_prompts(bundle, concept: ConceptSpec, cfg: EraseConfig):
    """Encoded (prompts to erase, reference, empty): the target first, then the trained synonyms if the recipe
    erases them."""
    dtype = bundle.unet.dtype
    erased = [concept.target, *(concept.synonym_prompts(heldout=False) if cfg.erase_synonyms else [])]
    encoded = [bundle.encode_prompts([p]).to(dtype) for p in dict.fromkeys(erased)]
    return encoded, *(bundle.encode_prompts([p]).to(dtype) for p in (concept.reference, ""))


def gate_anchors(concept: ConceptSpec, cfg: EraseConfig) -> list[str]:
    """The anchors the gate is calibrated on: ``cfg.anchors`` (``--anchors``) or the concept's own."""
    return list(cfg.anchors) if cfg.anchors is not None else list(concept.anchors)


def with_default_anchors(bundle, concept: ConceptSpec, cfg: EraseConfig) -> ConceptSpec:
    """A concept whose spec lists no anchors, erased by a recipe that trains on them, gets its model family's:
    the world's own list (a plug-in's ``default_anchors``) or the shipped everyday list for Stable Diffusion, minus
    the concept's own words; said in one line. Anchors given with ``cfg.anchors`` (--anchors) are left alone."""
    if cfg.anchor_weight == 0 or cfg.anchors is not None or concept.anchors:
        return concept
    world = world_of(bundle)
    listed = getattr(world, "default_anchors", None) if world is not None else None
    anchors, dropped = default_anchors(concept, listed() if callable(listed) else listed)
    source = f"the {world.NAME} world's" if listed is not None else "the shipped everyday (Stable Diffusion)"
    LOG.info(f"concept {concept.name!r} lists no anchors: using {source} anchor list, {len(anchors)} prompts"
             + (f" ({dropped} left out as the concept's own words)" if dropped else ""))
    return replace(concept, anchors=anchors)


def run_anchors(concept: ConceptSpec, cfg: EraseConfig) -> list[str]:
    """The prompts a run trains to keep: the gate's anchors, then the concept's vocabulary (none for the reference
    recipe)."""
    if cfg.anchor_weight == 0:
        return []
    listed = gate_anchors(concept, cfg)
    if not listed:
        raise UnguideError(f"concept {concept.name!r} has no anchors for the {cfg.recipe} recipe: add \"anchors\" to its "
                           "spec, pass `anchors` FILE (one prompt a line), or use `recipe` reference")
    anchors = list(dict.fromkeys(listed + list(concept.vocabulary)))
    clash = sorted({concept.target, *concept.synonym_prompts()} & set(anchors))
    if clash:
        raise UnguideError(f"anchor(s) {clash} are the concept's own prompts: an adapter cannot both erase and keep them")
    return anchors


def erase(bundle, concept: ConceptSpec, out: str | Path, cfg: EraseConfig = EraseConfig(), progress: bool = True,
          stop_after: Optional[int] = None) -> dict:
    """Train (or resume) an erasure run into ``out``; returns the run's metadata. The bundle's UNet is left
    as the base model (load the result with :func:`attach_erasure`).

    ``stop_after`` ends the process-level run early after that many iterations (for tests of resume)."""
    out = Path(out)
    concept = with_default_anchors(bundle, concept, cfg)
    run_anchors(concept, cfg)  # checked before anything is written
    with output_lock(out, "an erasure"):
        return _erase(bundle, concept, out, cfg, progress, stop_after)


def _erase(bundle, concept: ConceptSpec, out: Path, cfg: EraseConfig, progress: bool, stop_after: Optional[int]) -> dict:
    anchors = run_anchors(concept, cfg)
    meta_path = out / METADATA_FILE
    fingerprint = bundle.fingerprint()
    if meta_path.exists():
        done = json.loads(meta_path.read_text())
        if done.get("status") == "finished":
            if done.get("base_fingerprint") != fingerprint or not _same_config(done.get("config"), cfg) \
                    or done.get("concept") != concept.to_dict():
                raise UnguideError(f"{out} already holds a finished run with other settings: choose another `out`")
            if gate_anchors(concept, cfg) and not _image_gate_current((done.get("gate") or {}).get("image"), cfg):
                done = _add_image_gate(bundle, concept, cfg, out, done, progress)
            return done
    unet = bundle.unet
    dtype_name = str(unet.dtype).removeprefix("torch.")  # the frozen model's precision; trained weights are float32
    adapter = make_adapter(unet, cfg.adapter_config(), init_seed=cfg.seed)
    try:
        opt = torch.optim.Adam(adapter.parameters(), lr=cfg.lr)
        losses: list[float] = []
        start = 0
        state_path = out / CHECKPOINT_STATE
        if state_path.exists():
            state = json.loads(state_path.read_text())
            if not _same_config(state.get("config"), cfg) or state.get("base_fingerprint") != fingerprint:
                raise UnguideError(f"{out} holds a checkpoint of a different run (settings or base model differ): "
                                   "use another `out` or delete that directory")
            if state.get("dtype", "float32") != dtype_name:
                raise UnguideError(f"{out} holds a checkpoint trained in {state.get('dtype', 'float32')}: resume it with "
                                   f"`dtype` {state.get('dtype', 'float32')} (not {dtype_name}) or use another `out`")
            tensors = load_tensors(out / CHECKPOINT)
            adapter.load_trainable_state({k[8:]: v for k, v in tensors.items() if k.startswith("adapter.")})
            load_optimizer_tensors(opt, tensors)
            start, losses = int(state["iteration"]), list(state["losses"])
        _truncate_log(out / LOG_FILE, start)  # iterations after the last checkpoint are redone, not logged twice
        shape = bundle.latent_shape()
        device, dtype = bundle.device, unet.dtype
        erased, ref, empty = concept_prompts(bundle, concept, cfg)
        anchor_states = bundle.encode_prompts(anchors).to(dtype) if anchors else None
        sched = make_scheduler(bundle, cfg.ddim_steps)
        t0 = time.time()
        unet.train()
        bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc=f"erase {concept.name}",
                   disable=not progress)
        for i in bar:
            k, t, z = _iteration_sample(cfg, i, shape)
            if cfg.timestep_mapping == "aligned":
                t = int(sched.timesteps[k])
            drawn = _iteration_anchors(cfg, i, len(anchors)) if anchors else []
            which = _iteration_prompt(cfg, i, len(erased))
            loss, parts = erasure_loss(unet, adapter, sched, cfg, k, t, z.to(device=device, dtype=dtype),
                                       (erased[which], ref, empty), anchor_states[drawn] if drawn else None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(round(loss.item(), 6))
            bar.set_postfix(loss=f"{loss.item():.4f}")
            row = {"iteration": i + 1, "k": k, "t": t, "loss": losses[-1]}
            if len(erased) > 1:
                row["erased"] = which
            if drawn:
                row.update(anchors=[anchors[j] for j in drawn], **{f"loss_{n}": round(v, 6) for n, v in parts.items()})
            with open(out / LOG_FILE, "a") as f:
                f.write(json.dumps(row) + "\n")
            last = i + 1 == cfg.iterations
            if (i + 1) % cfg.checkpoint_every == 0 and not last:
                _checkpoint(out, adapter, opt, i + 1, losses, cfg, fingerprint, dtype_name)
            if stop_after is not None and i + 1 - start >= stop_after and not last:
                _checkpoint(out, adapter, opt, i + 1, losses, cfg, fingerprint, dtype_name)
                return {"status": "interrupted", "iteration": i + 1}
        unet.eval()
        train_seconds = round(time.time() - t0, 1)
        weights = adapter.save(out)
        gate = calibrate_gate(bundle, adapter, concept, gate_anchors(concept, cfg), progress=progress,
                              position=cfg.gate_position)
        gate.update(RECIPE_GATES[cfg.recipe])
        if gate_anchors(concept, cfg):
            gate["image"] = calibrate_image_gate(bundle, adapter, concept, gate_anchors(concept, cfg),
                                                 steps=cfg.calibration_steps, progress=progress)
    finally:
        unet.eval()
        adapter.remove()  # whatever happened, leave the bundle as it came: the base model
    meta = {"status": "finished", "concept": concept.to_dict(), "config": asdict(cfg), "anchors": anchors,
            "base_model": bundle.name, "base_fingerprint": fingerprint, "base_family": bundle.family.name,
            "lora_loads_with": bundle.family.pipeline_class if weights.name == LORA_FILE else None,
            "dtype": dtype_name, "weights": weights.name, "losses": losses,
            "final_loss": losses[-1] if losses else None, "gate": gate,
            "train_seconds_this_process": train_seconds, "versions": _versions()}
    write_json(meta_path, meta)
    for name in (CHECKPOINT, CHECKPOINT_STATE):
        (out / name).unlink(missing_ok=True)
    return meta


def _image_gate_current(stored: Optional[dict], cfg: EraseConfig) -> bool:
    """Whether a run's image gate was calibrated with today's detector on drawings of ``cfg.calibration_steps`` steps
    (a calibration is only valid for its detector and the images it saw)."""
    if not stored or "detector" not in stored or stored.get("steps", 50) != cfg.calibration_steps:
        return False
    return DetectorConfig(**{**stored["detector"], "timesteps": tuple(stored["detector"]["timesteps"])}) == DetectorConfig()


def _add_image_gate(bundle, concept: ConceptSpec, cfg: EraseConfig, out: Path, meta: dict, progress: bool) -> dict:
    """A run finished before the image gate existed, or calibrated with an older detector, gains today's calibration
    (the adapter is not retrained), and the gate defaults its recipe recommends now."""
    adapter, _ = attach_erasure(bundle, out)
    try:
        image = calibrate_image_gate(bundle, adapter, concept, gate_anchors(concept, cfg), steps=cfg.calibration_steps,
                                     progress=progress)
    finally:
        adapter.remove()
    meta = {**meta, "config": asdict(cfg), "gate": {**meta["gate"], "image": image, **RECIPE_GATES[cfg.recipe]}}
    write_json(out / METADATA_FILE, meta)
    return meta


def _same_config(stored: Optional[dict], cfg: EraseConfig) -> bool:
    """Whether a stored run's settings are ``cfg``'s; a setting added after the run was made counts as its default,
    so runs of earlier versions still resume and attach."""
    if stored is None:
        return False
    identity = {k: v for k, v in asdict(cfg).items() if k != "calibration_steps"}
    return {**asdict(EraseConfig()), **stored, "calibration_steps": None} == {**identity, "calibration_steps": None}


def _truncate_log(path: Path, iteration: int) -> None:
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [line for line in rows if json.loads(line)["iteration"] <= iteration]
    if len(keep) != len(rows):
        write_text(path, "".join(line + "\n" for line in keep))


def _checkpoint(out: Path, adapter, opt, iteration: int, losses, cfg: EraseConfig, fingerprint: str,
                dtype_name: str) -> None:
    tensors = {f"adapter.{k}": v for k, v in adapter.trainable_state().items()}
    tensors.update(optimizer_tensors(opt))
    save_tensors(out / CHECKPOINT, tensors)
    write_json(out / CHECKPOINT_STATE, {"iteration": iteration, "losses": losses, "config": asdict(cfg),
                                        "base_fingerprint": fingerprint, "dtype": dtype_name})


def _versions() -> dict:
    import diffusers
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def read_run(run_dir: str | Path) -> dict:
    """A finished run's metadata, with clear errors for anything else."""
    run_dir = Path(run_dir)
    meta_path = run_dir / METADATA_FILE
    if not run_dir.is_dir():
        raise UnguideError(f"erasure run {run_dir} not found: pass the `out` directory of `unguide erase`")
    if not meta_path.is_file():
        raise UnguideError(f"{run_dir} is not a finished erasure run (no {METADATA_FILE}): rerun `unguide erase` to finish it")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        raise UnguideError(f"{meta_path} is not valid JSON: the run directory is damaged, rerun `unguide erase`") from None
    if meta.get("status") != "finished" or not (run_dir / meta.get("weights", LORA_FILE)).is_file():
        raise UnguideError(f"{run_dir} is not a finished erasure run: rerun `unguide erase` to finish it")
    return meta


def attach_erasure(bundle, run_dir: str | Path):
    """Load a finished run's adapter onto the bundle's UNet, refusing runs trained on another base model."""
    from .adapters import load_adapter

    meta = read_run(run_dir)
    if meta["base_fingerprint"] != bundle.fingerprint():
        raise UnguideError(f"erasure run {run_dir} was trained on another base model ({meta['base_model']}, fingerprint "
                           f"{meta['base_fingerprint']}) than {bundle.name}: use `model` {meta['base_model']} or retrain")
    cfg = meta["config"]
    adapter = load_adapter(bundle.unet, run_dir, AdapterConfig(cfg["preset"], cfg["rank"], cfg["alpha"],
                                                               cfg.get("a_init", "gaussian")))
    return adapter, meta

