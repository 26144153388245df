"""``unguide erase``: train an erasure adapter for a concept."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from .common import GATE_POSITION_HELP, add_model


DEFAULT_RECIPE = "selective"


def _cmd_erase(args) -> int:
    from ..erasure.concepts import read_anchor_file, resolve_concepts
    from ..erasure.groups import erase_group
    from ..erasure.runs import read_run
    from ..erasure.adapters import denoiser_kind
    from ..erasure.training import EraseConfig, erase
    from ..models.loading import load_model

    specs = resolve_concepts(args.concept, args.concept_file)
    if args.vocabulary:
        for concept in specs:
            concept.vocabulary = read_anchor_file(args.vocabulary, "vocabulary")
    anchors = read_anchor_file(args.anchors) if args.anchors else None
    bundle = load_model(args.model, device=args.device, dtype=args.dtype)
    cfgs = [EraseConfig.for_concept(args.recipe, concept, denoiser_kind(bundle.unet), preset=args.preset,
                                    iterations=args.iterations, lr=args.lr, eta=args.eta,
                                    start_guidance=args.start_guidance, rank=args.rank, alpha=args.alpha,
                                    seed=args.seed, timestep_mapping=args.timestep_mapping,
                                    a_init=args.a_init, anchor_weight=args.anchor_weight,
                                    anchors_per_step=args.anchors_per_step, erase_synonyms=args.erase_synonyms,
                                    gate_position=args.gate_position, calibration_steps=args.calibration_steps,
                                    calibration_samples=args.calibration_samples, anchors=anchors,
                                    schedule=args.schedule, batch=args.batch, trajectories=args.trajectories)
            for concept in specs]
    t0 = time.time()
    if len(specs) == 1:
        meta = erase(bundle, specs[0], args.out, cfgs[0])
        _say_run(specs[0], cfgs[0], meta, Path(args.out), time.time() - t0)
        if meta.lora_loads_with:
            print(f"the adapter loads in diffusers too: {meta.lora_loads_with}.load_lora_weights('{args.out}')")
    else:
        group = erase_group(bundle, specs, args.out, cfgs)
        for concept, cfg in zip(specs, cfgs):
            _say_run(concept, cfg, read_run(Path(args.out) / concept.name), Path(args.out) / concept.name)
        print(f"erased {len(specs)} concepts together in {time.time() - t0:.1f} s ({', '.join(group.members)}; "
              f"one adapter each, each prompt gated against every concept): {Path(args.out) / 'group.json'}")
    print(f"check how selective it is before generating: unguide influence --model {args.model} --erasure {args.out}"
          if len(specs) == 1 else
          f"generate with all of them: unguide generate --model {args.model} --erasure {args.out} --prompt ...")
    return 0


def _say_run(concept, cfg, meta, out: Path, seconds: float | None = None) -> None:
    took = f" in {seconds:.1f} s" if seconds is not None else ""
    print(f"erased '{concept.name}' ({cfg.recipe} recipe, {cfg.preset}, {cfg.schedule} schedule, {cfg.iterations} "
          f"iterations of {cfg.batch}){took}; final loss {meta.final_loss:.5f}; adapter: {out / meta.weights}; "
          f"metadata: {out / 'erasure.json'}")
    if meta.cost:
        c = meta.cost
        print(f"cost: training {c['train_seconds']:.1f} s, {c['train_evals']} UNet evaluations; gate calibration "
              f"{c['calibration_seconds']:.1f} s, {c['calibration_evals']} evaluations")
    gate = meta.calibration.prompt
    if gate.get("threshold") is not None:
        print(f"prompt gate calibrated on {len(gate['anchor_scores'])} anchors: threshold {gate['threshold']:.4g} at position "
              f"{gate.get('position', 0.5):g} (anchors up to {max(gate['anchor_scores'].values()):.4g}, concept prompts from "
              f"{min(gate['concept_scores'].values()):.4g}{'' if gate['separated'] else ': they OVERLAP, the gate will misroute some'})")
    image = meta.calibration.image
    if image:
        concept_scores = [s for p in image["concept_candidates"] for s in image["scores"][p]]
        anchors = [s for p, v in image["scores"].items() if p not in image["concept_candidates"] for s in v]
        print(f"image gate calibrated on {len(concept_scores) + len(anchors)} base images: threshold "
              f"{image['threshold']:.3f} at position {image['position']:g} (concept images up to {max(concept_scores):.3f}, "
              f"anchor images from {min(anchors):.3f}{'' if image['separated'] else ': they OVERLAP'})")
    d = meta.defaults
    print(f"generation uses gate '{d.gate}', keep '{d.keep}', erase with '{d.erase_with}' unless told otherwise")


def add_parser(sub) -> None:
    from ..erasure.adapters import A_INITS, LAYER_PRESETS
    from ..erasure.schedule import SCHEDULES
    from ..erasure.training import RECIPES, TIMESTEP_MAPPINGS

    e = sub.add_parser("erase", help="train an erasure adapter for a concept (resumable)")
    add_model(e)
    e.add_argument("--concept", help="a preset name (toy classes such as sun, 'red', sd-cat, sd-nudity, ...); several, "
                   "comma-separated (sun,star,boat), make one group run that erases all of them")
    e.add_argument("--concept-file", help="a concept JSON file (see docs: target, reference, synonyms, other); several, "
                   "comma-separated, as --concept")
    e.add_argument("--out", required=True, help="run directory (a rerun resumes from its last checkpoint)")
    e.add_argument("--preset", choices=LAYER_PRESETS, default=None,
                   help="layers: object (LoRA where the text enters: a UNet's attn2 k/v, a transformer's context "
                   "embedder), explicit (LoRA on every other Linear), full (ESD-x: the text's k/v weights)")
    e.add_argument("--recipe", choices=RECIPES, default=DEFAULT_RECIPE,
                   help="selective (default): learnable LoRA A + anchor preservation + a calibrated gate; reference: the "
                   "paper's protocol exactly (A ~ N(0,1), lr 3e-5, no anchors). Flags below override the recipe")
    e.add_argument("--anchors", default=None,
                   help="text file of anchor prompts to preserve, one a line (\"\" = the empty prompt); "
                   "default: the concept's own anchors")
    e.add_argument("--vocabulary", default=None,
                   help="text file of generic prompts trained like anchors but not used to calibrate the gate "
                   "(replaces the concept's vocabulary; docs/recipes.md)")
    e.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help="where training points come from: cached (the base model's trajectories drawn once, batched; "
                   "selective's default) or fresh (a new trajectory per sample with the model being trained: the "
                   "paper's, reference's default); each brings its own batch and iterations")
    e.add_argument("--batch", type=int, default=None, help="samples per optimiser step (default: the schedule's)")
    e.add_argument("--trajectories", type=int, default=None,
                   help="cached schedule: base trajectories drawn per erased prompt (default 8)")
    e.add_argument("--iterations", type=int, default=None,
                   help="optimiser steps (default: the schedule's, fresh 200, cached 50)")
    e.add_argument("--lr", type=float, default=None, help="default: the recipe's (reference 3e-5, selective 1e-3)")
    e.add_argument("--a-init", choices=A_INITS, default=None,
                   help="LoRA A init: gaussian N(0,1) (reference) or uniform +-1/sqrt(fan_in) (selective)")
    e.add_argument("--anchor-weight", type=float, default=None, help="weight of the anchor term (selective: 1 on a UNet, 32 on a transformer; reference 0)")
    e.add_argument("--anchors-per-step", type=int, default=None, help="anchor prompts per iteration (default: the spec's, else 1)")
    e.add_argument("--gate-position", type=float, default=None,
                   help=GATE_POSITION_HELP + "; stored with the run (default: the spec's, else 0.5)")
    e.add_argument("--calibration-steps", type=int, default=None,
                   help="DDIM steps of the base drawings the image gate is calibrated on (default 50, generation's; "
                   "a finished run asked for another value is recalibrated, not retrained)")
    e.add_argument("--calibration-samples", type=int, default=None,
                   help="base images per prompt the image gate is calibrated on (default 8; fewer: quicker, noisier "
                   "threshold; recalibrates a finished run, as --calibration-steps)")
    e.add_argument("--erase-synonyms", action=argparse.BooleanOptionalAction, default=None,
                   help="erase the concept's trained synonyms too, one concept prompt drawn per iteration "
                   "(selective: on; reference: off, the target alone)")
    e.add_argument("--eta", type=float, default=None, help="negative guidance strength (default 2)")
    e.add_argument("--start-guidance", type=float, default=None, help="default 9")
    e.add_argument("--rank", type=int, default=None, help="default 1")
    e.add_argument("--alpha", type=float, default=None, help="LoRA output scale (default 8)")
    e.add_argument("--seed", type=int, default=None, help="default 0")
    e.add_argument("--timestep-mapping", choices=TIMESTEP_MAPPINGS, default=None,
                   help="reference (default): t in [k*20, k*20+20) as the reference code; aligned: the timestep z_k sits at")
    e.set_defaults(func=_cmd_erase)
