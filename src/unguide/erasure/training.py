"""Erasure training (``unguide erase``): the negative-guidance objective of ESD on a LoRA adapter.

Each iteration (`../shared/METHOD.md` section 2, beside this repository): pick a DDIM step k in [0, 50), run the *adapted* model with CFG
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

At the end of every run both gates are calibrated (:func:`calibrate`: :func:`unguide.guidance.prompt_gate.calibrate_gate`,
:func:`unguide.guidance.image_gate.calibrate_image_gate`) and stored with it (:class:`~unguide.erasure.runs.ErasureRun`).
The model's output is used as it comes (noise or v): the target is an affine combination of outputs at one x_t, the
same in either space (:mod:`unguide.models.prediction`).
"""
from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from .adapters import LORA_FILE, make_adapter
from .concepts import ConceptSpec, default_anchors
from .recipes import (CALIBRATION_SETTINGS, RECIPE_GATES, RECIPE_SETTINGS, RECIPES, TIMESTEP_MAPPINGS,  # noqa: F401
                      EraseConfig, register_recipe)
from .objective import BASE_BATCH, base_outputs, negative_guidance_loss
from .schedule import TrajectoryPool, fresh_points, plan_iteration
from .runs import METADATA_FILE, RUN_VERSION, ErasureRun, read_run
from ..errors import UnguideError
from ..io import load_optimizer_tensors, load_tensors, optimizer_tensors, output_lock, save_tensors, write_json, write_text
from ..guidance.config import CALIBRATION_SAMPLES, Calibration
from ..guidance.prompt_gate import calibrate_gate
from ..guidance.image_gate import DetectorConfig, calibrate_image_gate
from ..models.worlds import world_of
from ..sampling.ddim import EvalCounter, make_sampler, model_output

CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_STATE = "checkpoint.json"
LOG_FILE = "train_log.jsonl"
LOG = logging.getLogger("unguide")  # the CLI shows INFO lines; a library caller can silence them


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
          stop_after: Optional[int] = None) -> ErasureRun | dict:
    """Train (or resume) an erasure run into ``out``; returns the finished run. The bundle's UNet is left as the base
    model (attach the result with :meth:`ErasureRun.attach` or ``pipe.load_erasure``).

    ``stop_after`` ends the process-level run early after that many iterations (for tests of resume): it returns
    ``{"status": "interrupted", "iteration": i}``."""
    out = Path(out)
    concept = with_default_anchors(bundle, concept, cfg)
    run_anchors(concept, cfg)  # checked before anything is written
    with output_lock(out, "an erasure"):
        done = _finished(bundle, concept, out, cfg, progress)
        return done if done is not None else _erase(bundle, concept, out, cfg, progress, stop_after)


def _finished(bundle, concept: ConceptSpec, out: Path, cfg: EraseConfig, progress: bool) -> Optional[ErasureRun]:
    """The run already in ``out`` if it is this one, finished (its image gate recalibrated if it is out of date)."""
    if not (out / METADATA_FILE).exists() or json.loads((out / METADATA_FILE).read_text()).get("status") != "finished":
        return None
    done = read_run(out)
    if done.base_fingerprint != bundle.fingerprint() or not _same_config(done.config, cfg) \
            or done.concept != concept.to_dict():
        raise UnguideError(f"{out} already holds a finished run with other settings{_differences(done.config, cfg)}: "
                           "choose another `out`")
    stale_image = bool(gate_anchors(concept, cfg)) and not _image_gate_current(done.calibration.image, cfg)
    if stale_image or done.prompt_gate_stale(bundle):
        done = _recalibrate(bundle, concept, cfg, done, progress, prompt=done.prompt_gate_stale(bundle), image=stale_image)
    return done


def _erase(bundle, concept: ConceptSpec, out: Path, cfg: EraseConfig, progress: bool,
           stop_after: Optional[int]) -> ErasureRun | dict:
    unet = bundle.unet
    dtype_name = str(unet.dtype).removeprefix("torch.")  # the frozen model's precision; trained weights are float32
    adapter = make_adapter(unet, cfg.adapter_config(), init_seed=cfg.seed)
    counter = EvalCounter(unet)
    try:
        trained = _train(bundle, concept, adapter, out, cfg, dtype_name, progress, stop_after)
        if trained.get("status") == "interrupted":
            return trained
        weights = adapter.save(out)
        cost = {"train_seconds": trained["seconds"], "train_evals": counter.count}
        t0, counter.count = time.time(), 0
        calibration = calibrate(bundle, adapter, concept, cfg, progress)
        cost.update(calibration_seconds=round(time.time() - t0, 1), calibration_evals=counter.count)
    finally:
        counter.close()
        unet.eval()
        adapter.remove()  # whatever happened, leave the bundle as it came: the base model
    losses = trained["losses"]
    run = ErasureRun(concept=concept.to_dict(), config=asdict(cfg), anchors=run_anchors(concept, cfg),
                     base_model=bundle.name, base_fingerprint=bundle.fingerprint(), calibration=calibration,
                     defaults=RECIPE_GATES[cfg.recipe], weights=weights.name, base_family=bundle.family.name,
                     lora_loads_with=bundle.family.pipeline_class if weights.name == LORA_FILE else None,
                     dtype=dtype_name, losses=losses, final_loss=losses[-1] if losses else None,
                     train_seconds_this_process=trained["seconds"], cost=cost, versions=_versions(), path=out)
    write_json(out / METADATA_FILE, run.to_json())
    for name in (CHECKPOINT, CHECKPOINT_STATE):
        (out / name).unlink(missing_ok=True)
    return read_run(out)  # as every later reader sees it (JSON lists, not tuples)


def calibrate(bundle, adapter, concept: ConceptSpec, cfg: EraseConfig, progress: bool = True) -> Calibration:
    """Both gates calibrated for a trained adapter: the prompt gate always, the image gate when the run has anchors."""
    anchors = gate_anchors(concept, cfg)
    prompt = calibrate_gate(bundle, adapter, concept, anchors, progress=progress, position=cfg.gate_position)
    image = calibrate_image_gate(bundle, adapter, concept, anchors, steps=cfg.calibration_steps,
                                 samples=cfg.calibration_samples, ceiling=cfg.calibration_ceiling,
                                 progress=progress) if anchors else None
    return Calibration(prompt, image)


def _resume(out: Path, adapter, opt, cfg: EraseConfig, fingerprint: str, dtype_name: str) -> tuple[int, list]:
    """(next iteration, losses so far) from the run's checkpoint, after checking it belongs to this run."""
    state_path = out / CHECKPOINT_STATE
    if not state_path.exists():
        return 0, []
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
    return int(state["iteration"]), list(state["losses"])


def _train(bundle, concept: ConceptSpec, adapter, out: Path, cfg: EraseConfig, dtype_name: str, progress: bool,
           stop_after: Optional[int]) -> dict:
    """The training loop, resumed from the last checkpoint; every iteration is logged in train_log.jsonl."""
    unet, fingerprint, anchors = bundle.unet, bundle.fingerprint(), run_anchors(concept, cfg)
    opt = torch.optim.Adam(adapter.parameters(), lr=cfg.lr)
    start, losses = _resume(out, adapter, opt, cfg, fingerprint, dtype_name)
    _truncate_log(out / LOG_FILE, start)  # iterations after the last checkpoint are redone, not logged twice
    erased, ref, empty = concept_prompts(bundle, concept, cfg)
    anchor_states = bundle.encode_prompts(anchors).to(unet.dtype) if anchors else None
    sampler = make_sampler(bundle, cfg.ddim_steps)
    t0 = time.time()

    def plan(i: int):
        return plan_iteration(cfg, i, sampler, len(erased), len(anchors), bundle.latent_shape())

    cached = cfg.schedule == "cached"
    pool = TrajectoryPool.from_state(load_tensors(out / CHECKPOINT)) if cached and start else None
    unet.train()
    bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc=f"erase {concept.name}",
               disable=not progress)
    def states(samples):
        drawn = [j for s in samples for j in s.anchors]
        return torch.cat([erased[s.prompt] for s in samples]), anchor_states[drawn] if drawn else None

    base: dict = {}  # cached schedule: iteration -> its base outputs, a window's computed together
    for i in bar:
        samples = plan(i)
        if cached:
            pool = _window_pool(bundle, adapter, sampler, cfg, erased, empty, plan, i, pool)
            if i not in base:
                base = _window_base(unet, adapter, cfg, pool, plan, i, ref, states)
        z_k = pool.take(samples) if cached else fresh_points(unet, sampler, cfg, samples, erased, empty)
        tgt, kept = states(samples)
        loss, parts = negative_guidance_loss(unet, adapter, cfg, z_k, [s.t for s in samples], tgt, ref, kept,
                                             base=base.get(i))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(round(loss.item(), 6))
        bar.set_postfix(loss=f"{loss.item():.4f}")
        _log_iteration(out, i, samples, losses[-1], len(erased) > 1, anchors, parts)
        last = i + 1 == cfg.iterations
        stop = stop_after is not None and i + 1 - start >= stop_after and not last
        if ((i + 1) % cfg.checkpoint_every == 0 and not last) or stop:
            _checkpoint(out, adapter, opt, i + 1, losses, cfg, fingerprint, dtype_name, pool)
        if stop:
            return {"status": "interrupted", "iteration": i + 1}
    unet.eval()
    return {"losses": losses, "seconds": round(time.time() - t0, 1)}


def _window_pool(bundle, adapter, sampler, cfg: EraseConfig, erased, empty, plan, i: int,
                 pool: Optional[TrajectoryPool]) -> TrajectoryPool:
    """The cached trajectories iteration i reads: the pool it has if it serves i's window, else that window's,
    drawn now (for all its iterations, also when resumed inside it) by the base model (window 0) or the model being trained."""
    window = TrajectoryPool.window_of(cfg, i)
    if pool is not None and pool.window == window:
        return pool
    first = window * cfg.refresh if cfg.refresh else 0
    end = min(first + cfg.refresh, cfg.iterations) if cfg.refresh else cfg.iterations
    return TrajectoryPool.draw(bundle, adapter, sampler, cfg, erased, empty, [plan(j) for j in range(first, end)],
                               window)


def _window_base(unet, adapter, cfg: EraseConfig, pool: TrajectoryPool, plan, i: int, ref, states) -> dict:
    """{iteration: base outputs} for every iteration of i's window, computed in batches of ``BASE_BATCH`` rows from
    the window's first iteration (also when resumed inside it, so the batches and the numbers are the same)."""
    first = TrajectoryPool.window_of(cfg, i) * cfg.refresh if cfg.refresh else 0
    end = min(first + cfg.refresh, cfg.iterations) if cfg.refresh else cfg.iterations
    plans = [plan(j) for j in range(first, end)]
    samples = [s for p in plans for s in p]
    tgt, anchors = states(samples)
    target, anchor_base = base_outputs(unet, adapter, cfg, pool.take(samples), [s.t for s in samples], tgt, ref,
                                       anchors, batch_size=BASE_BATCH)
    out, row = {}, 0
    for j, p in zip(range(first, end), plans):
        out[j] = (target[row:row + len(p)], anchor_base[row:row + len(p)] if anchor_base is not None else None)
        row += len(p)
    return out


def _log_iteration(out: Path, i: int, samples, loss: float, several_prompts: bool, anchors: list, parts: dict) -> None:
    """One line per iteration; a one-sample iteration's fields are plain values, a batch's are lists."""
    one = len(samples) == 1

    def field(values):
        return values[0] if one else values

    row = {"iteration": i + 1, "k": field([s.k for s in samples]), "t": field([s.t for s in samples]), "loss": loss}
    if several_prompts:
        row["erased"] = field([s.prompt for s in samples])
    if anchors:
        kept = [[anchors[j] for j in s.anchors] for s in samples]
        row.update(anchors=field(kept), **{f"loss_{n}": round(v, 6) for n, v in parts.items()})
    with open(out / LOG_FILE, "a") as f:
        f.write(json.dumps(row) + "\n")


def _image_gate_current(stored: Optional[dict], cfg: EraseConfig) -> bool:
    """Whether a run's image gate was calibrated with today's detector on ``cfg.calibration_samples`` drawings of
    ``cfg.calibration_steps`` steps and placed under ``cfg.calibration_ceiling`` (a calibration is only valid for its
    detector and the images it saw)."""
    if not stored or "detector" not in stored or stored.get("steps", 50) != cfg.calibration_steps \
            or stored.get("samples", CALIBRATION_SAMPLES) != cfg.calibration_samples \
            or stored.get("ceiling") != cfg.calibration_ceiling:
        return False
    return DetectorConfig(**{**stored["detector"], "timesteps": tuple(stored["detector"]["timesteps"])}) == DetectorConfig()


def _recalibrate(bundle, concept: ConceptSpec, cfg: EraseConfig, run: ErasureRun, progress: bool, prompt: bool,
                 image: bool) -> ErasureRun:
    """A run finished before the image gate existed or calibrated with an older detector (``image``), or whose prompt
    gate was scored in v rather than noise (``prompt``), gains today's calibration of that gate (the adapter is not
    retrained), and the gate defaults its recipe recommends now."""
    adapter = run.attach(bundle)
    anchors = gate_anchors(concept, cfg)
    try:
        calibration = Calibration(
            calibrate_gate(bundle, adapter, concept, anchors, progress=progress, position=cfg.gate_position) if prompt
            else run.calibration.prompt,
            calibrate_image_gate(bundle, adapter, concept, anchors, steps=cfg.calibration_steps,
                                 samples=cfg.calibration_samples, ceiling=cfg.calibration_ceiling, progress=progress)
            if image else run.calibration.image)
    finally:
        adapter.remove()
    run = replace(run, config=asdict(cfg), calibration=calibration, defaults=RECIPE_GATES[cfg.recipe],
                  version=RUN_VERSION)
    write_json(run.path / METADATA_FILE, run.to_json())
    return read_run(run.path)


def _same_config(stored: Optional[dict], cfg: EraseConfig) -> bool:
    """Whether a stored run's settings are ``cfg``'s; a setting added after the run was made counts as its default,
    so runs of earlier versions still resume and attach."""
    if stored is None:
        return False
    calibration = dict.fromkeys(CALIBRATION_SETTINGS)  # how the gate is calibrated, not how the adapter is trained
    return {**asdict(EraseConfig()), **stored, **calibration} == {**asdict(cfg), **calibration}


def _differences(stored: dict, cfg: EraseConfig) -> str:
    """' (schedule: fresh there, cached here; ...)': what a user must pass to reuse a stored run, or '' if the settings
    agree (the concept or the base model differ)."""
    now = asdict(cfg)
    differ = [f"{k}: {v!r} there, {now[k]!r} here" for k, v in {**asdict(EraseConfig()), **stored}.items()
              if k in now and v != now[k] and k not in CALIBRATION_SETTINGS]
    return f" ({'; '.join(differ[:4])})" if differ else ""


def _truncate_log(path: Path, iteration: int) -> None:
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [line for line in rows if json.loads(line)["iteration"] <= iteration]
    if len(keep) != len(rows):
        write_text(path, "".join(line + "\n" for line in keep))


def _checkpoint(out: Path, adapter, opt, iteration: int, losses, cfg: EraseConfig, fingerprint: str,
                dtype_name: str, pool: Optional[TrajectoryPool] = None) -> None:
    tensors = {f"adapter.{k}": v for k, v in adapter.trainable_state().items()}
    tensors.update(optimizer_tensors(opt))
    tensors.update(pool.state() if pool is not None else {})
    save_tensors(out / CHECKPOINT, tensors)
    write_json(out / CHECKPOINT_STATE, {"iteration": iteration, "losses": losses, "config": asdict(cfg),
                                        "base_fingerprint": fingerprint, "dtype": dtype_name})


def _versions() -> dict:
    import diffusers
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}
