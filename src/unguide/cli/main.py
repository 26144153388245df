"""The ``unguide`` command line. Bad input ends with one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ..errors import UnguideError, check_number

DEFAULT_RECIPE = "selective"


class Parser(argparse.ArgumentParser):
    """argparse that reports bad input as one line (the problem and the fix) with exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# Where each numeric flag's values may lie (inclusive); an int flag not named here counts something (>= 1), a float
# flag not named here only has to be finite. Checked as the flag is parsed, so NaN or "--steps 0" never reaches a job.
INT_LOW = {"--seed": 0, "--threads": 0, "--inversion-steps": 0, "--pairs": 0}
FLOAT_RANGE = {"--guidance": (0, None), "--start-guidance": (0, None), "--eta": (0, None), "--anchor-weight": (0, None),
               "--gate-position": (0, 1), "--image-gate-position": (0, 1)}
FLOAT_ABOVE_ZERO = ("--lr", "--erase-lr", "--alpha", "--max-minutes", "--text-norm")


def _number_type(flag: str, integer: bool):
    low, high = (INT_LOW.get(flag, 1), None) if integer else FLOAT_RANGE.get(flag, (None, None))
    above = 0 if flag in FLOAT_ABOVE_ZERO else None

    def parse(text: str):
        try:
            return check_number(flag, text, low=low, high=high, integer=integer, above=above)
        except UnguideError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{flag} ")) from None

    parse.__name__ = "int" if integer else "float"  # argparse names the type in its messages
    return parse


def _check_numbers(parser: argparse.ArgumentParser) -> None:
    """Give every int/float flag of every command its range check."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _check_numbers(sub)
        elif action.type in (int, float) and action.option_strings:
            action.type = _number_type(action.option_strings[0], action.type is int)


def _add_model(p: argparse.ArgumentParser) -> None:
    from ..models.loading import DTYPES

    p.add_argument("--model", default="toyworld",
                   help="'toyworld' (embedded default), a diffusers Stable Diffusion directory, or a hub id")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="precision the model runs in (default float32); erasure keeps its trained weights in float32. "
                   "Reduced precision is for GPUs: on CPU it runs, slower (float16 much slower)")


def _cmd_generate(args) -> int:
    """``unguide generate``: the same UnGuidePipeline as the Python API, writing into a folder."""
    from ..guidance.unguidance import check_gate_position, decision_settings
    from ..generation.pipeline import UnGuidePipeline
    from ..generation.prompts import PromptRow, read_prompts
    from ..generation.folders import check_request, plan_items

    rows = [PromptRow(p) for p in args.prompt] if args.prompt else read_prompts(args.prompts)
    check_request(rows, args.n, args.steps)
    if args.gate_position is not None:
        check_gate_position(args.gate_position)  # before any model is loaded
    pipe = UnGuidePipeline.from_pretrained(args.model, torch_dtype=args.dtype, device=args.device)
    if args.erasure:
        pipe.load_erasure(args.erasure)
    guide = pipe.guide(mode=args.mode, w=args.w, gate=args.gate, keep=args.keep, erase_with=args.erase_with,
                       gate_position=args.gate_position, image_gate_position=args.image_gate_position,
                       **decision_settings(args.scorer, args.weighting))
    if getattr(guide, "note", None):
        print(f"unguide: note: {guide.note}", file=sys.stderr)
    bundle = pipe.bundle
    guidance = args.guidance if args.guidance is not None else bundle.default_guidance
    items = plan_items(rows, args.n, args.seed, guidance, args.height or bundle.image_size, args.width or bundle.image_size)
    for it in items:
        bundle.latent_shape(it.height, it.width)  # validate sizes before any work
    info = {"model": bundle.name, "steps": args.steps, "n": args.n, "seed": args.seed, "guidance": guidance,
            "prompts": args.prompts or args.prompt, "guide": guide.name, "erasure": pipe.erasure_info(guide)}
    if args.dtype not in (None, "float32"):
        info["dtype"] = args.dtype  # float32 (the default) goes unrecorded, as in runs made before --dtype
    out = pipe.generate_to(items, args.out, num_inference_steps=args.steps, guide=guide, batch_size=args.batch_size,
                           run_info=info)
    n_files = sum(1 for it in items if (out / it.filename).exists())
    print(f"{n_files} images in {out} (index: {out / 'index.jsonl'}, grid: {out / 'grid.png'})")
    return 0


def _channels(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        widths = ()
    if len(widths) != 3 or any(w < 16 or w % 16 for w in widths):
        raise argparse.ArgumentTypeError(f"{text!r}: give three comma-separated multiples of 16, e.g. 32,64,128")
    return widths


def _train_device(name: str) -> str:
    """The device a training stage runs on; a CUDA device that is not there is a usage error, not a crash."""
    import torch

    if name == "cpu":
        return name
    if not name.startswith("cuda"):
        raise UnguideError(f"unknown --device {name!r}: use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UnguideError(f"--device {name}: no CUDA device is visible here; use --device cpu")
    return name


def _cmd_train_toy(args) -> int:
    import torch

    from ..models.worlds import get_world

    device = _train_device(args.device)  # checked before any stage starts
    if args.threads:
        torch.set_num_threads(args.threads)
    unet = dict(steps=args.unet_steps, text_norm=args.text_norm)
    if args.stage != "export":  # export takes the architecture and text side from the checkpoint it exports
        unet.update(text_states=args.text_states, stop_after=args.stop_after, block_out_channels=args.unet_channels)
    get_world("toyworld").train(args.out, args.stage, args.classifier_steps, args.vae_steps, unet, args.max_minutes, device)
    return 0


def _cmd_erase(args) -> int:
    from ..erasure.concepts import read_anchor_file, resolve_concept
    from ..erasure.training import EraseConfig, erase
    from ..models.loading import load_model

    concept = resolve_concept(args.concept, args.concept_file)
    if args.vocabulary:
        concept.vocabulary = read_anchor_file(args.vocabulary, "vocabulary")
    cfg = EraseConfig.for_concept(args.recipe, concept, preset=args.preset, iterations=args.iterations,
                                  lr=args.lr, eta=args.eta, start_guidance=args.start_guidance, rank=args.rank,
                                  alpha=args.alpha, seed=args.seed, timestep_mapping=args.timestep_mapping,
                                  a_init=args.a_init, anchor_weight=args.anchor_weight,
                                  anchors_per_step=args.anchors_per_step, erase_synonyms=args.erase_synonyms,
                                  gate_position=args.gate_position,
                                  anchors=read_anchor_file(args.anchors) if args.anchors else None)
    bundle = load_model(args.model, device=args.device, dtype=args.dtype)
    t0 = time.time()
    meta = erase(bundle, concept, args.out, cfg)
    print(f"erased '{concept.name}' ({cfg.recipe} recipe, {cfg.preset}, {cfg.iterations} iterations) in "
          f"{time.time() - t0:.1f} s; final loss {meta['final_loss']:.5f}; adapter: {Path(args.out) / meta['weights']}; "
          f"metadata: {Path(args.out) / 'erasure.json'}")
    gate = meta.get("gate") or {}
    if gate.get("threshold") is not None:
        print(f"prompt gate calibrated on {len(gate['anchor_scores'])} anchors: threshold {gate['threshold']:.4g} at position "
              f"{gate.get('position', 0.5):g} (anchors up to {max(gate['anchor_scores'].values()):.4g}, concept prompts from "
              f"{min(gate['concept_scores'].values()):.4g}{'' if gate['separated'] else ': they OVERLAP, the gate will misroute some'})")
    image = gate.get("image")
    if image:
        concept = [s for p in image["concept_candidates"] for s in image["scores"][p]]
        anchors = [s for p, v in image["scores"].items() if p not in image["concept_candidates"] for s in v]
        print(f"image gate calibrated on {len(concept) + len(anchors)} base images: threshold {image['threshold']:.3f} at "
              f"position {image['position']:g} (concept images up to {max(concept):.3f}, anchor images from "
              f"{min(anchors):.3f}{'' if image['separated'] else ': they OVERLAP'})")
    if gate.get("default"):
        print(f"generation uses gate '{gate['default']}', keep '{gate['keep']}', erase with '{gate['erase_with']}' unless "
              "told otherwise")
    print(f"check how selective it is before generating: unguide influence --model {args.model} --erasure {args.out}")
    return 0


def _cmd_toy_quality(args) -> int:
    from ..io import write_json
    from ..models.loading import load_model
    from ..models.worlds import world_of

    bundle = load_model(args.model, device=args.device, dtype=args.dtype)
    if world_of(bundle) is None:
        raise UnguideError(f"{args.model} is not a toy-world model: toy-quality judges the embedded model's classes")
    result = world_of(bundle).quality(bundle, samples=args.samples, guidance=args.guidance, steps=args.steps,
                                          seed=args.seed)
    if args.out:
        write_json(args.out, result)
    for name in ("class_prompts", "heldout_synonyms"):
        r = result[name]
        print(f"{name}: mean {r['mean']:.1%} | " + ", ".join(f"{c} {a:.0%}" for c, a in r["per_class"].items()))
    print(f"seconds per image (batch 32, {args.steps} steps): {result['class_prompts']['seconds_per_image']:.3f}")
    return 0


def _cmd_benchmark(args) -> int:
    from ..evaluation.benchmark import Benchmark, BenchmarkConfig
    from ..models.loading import load_model
    from ..evaluation.report import markdown_table

    concepts = "all" if args.concepts == "all" else [c.strip() for c in args.concepts.split(",") if c.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    cfg = BenchmarkConfig(suite=args.suite, concepts=concepts, methods=methods, samples=args.samples, steps=args.steps,
                          seed=args.seed, guidance=args.guidance, erase_iterations=args.iterations,
                          erase_lr=args.erase_lr, batch_size=args.batch_size, selective_keep=args.keep,
                          selective_erase_with=args.erase_with, selective_gate_position=args.gate_position,
                          selective_image_gate=args.image_gate, selective_image_position=args.image_gate_position,
                          prompts=args.prompts,
                          clip_model=None if args.clip_model == "none" else args.clip_model,
                          fid_reference=args.fid_reference)
    bundle = load_model(args.model, device=args.device, dtype=args.dtype)
    report = Benchmark(bundle, cfg, args.out).run()
    if report:  # the main process (the others only generate their share)
        print(markdown_table(report, average_only=True))
        print(f"report: {Path(args.out) / 'report.html'} (also report.md, report.json); {report['seconds']:.0f} s")
    return 0


def _cmd_evaluate(args) -> int:
    from ..erasure.concepts import resolve_concept
    from ..evaluation.evaluate import evaluate_folder

    concept = resolve_concept(args.concept, args.concept_file) if (args.concept or args.concept_file) else None
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    result = evaluate_folder(args.images, judge=args.judge, concept=concept, reference=args.reference, labels=labels,
                             clip_model=args.clip_model)
    headline = {k: v for k, v in result.items() if isinstance(v, (int, float))}
    for key in ("concept", "colour_rate", "preservation", "nudenet"):
        if key in result:
            headline[key] = {k: v for k, v in result[key].items() if not isinstance(v, dict)}
    print(json.dumps(headline, indent=1))
    print(f"metrics: {Path(args.images) / 'metrics.json'}")
    return 0


def _cmd_benchmark_scorer(args) -> int:
    from ..erasure.concepts import load_preset
    from ..evaluation.cost import run_gate_cost, scorer_benchmark
    from ..erasure.training import attach_erasure
    from ..io import write_json
    from ..models.loading import load_model
    from ..models.worlds import world_of
    from ..generation.prompts import read_prompts

    bundle = load_model(args.model, device=args.device, dtype=args.dtype)
    adapter, meta = attach_erasure(bundle, args.erasure)
    if args.prompts:
        prompts = [r.prompt for r in read_prompts(args.prompts)]
    elif world_of(bundle) is not None:
        prompts = world_of(bundle).decision_prompts(load_preset(meta["concept"]["name"]))
    else:
        raise UnguideError("give --prompts FILE: the default prompt set exists for the embedded model's concepts only")
    guidance = args.guidance if args.guidance is not None else bundle.default_guidance
    image_gate = "image" in (meta.get("gate") or {})
    if args.gates_only:
        if not image_gate:
            raise UnguideError(f"{args.erasure} has no image gate: drop --gates-only, or rerun `unguide erase` on it")
        return _print_image_gate_cost(bundle, adapter, meta, prompts, guidance, args, {"erasure": str(args.erasure)})
    result = scorer_benchmark(bundle, adapter, prompts, guidance, steps=args.steps, reference_draws=args.reference_draws,
                              timing_prompts=args.timing_prompts)
    result["erasure"] = str(args.erasure)
    stored_default = (meta.get("gate") or {}).get("default")
    # the prompt gate's own figures (for a run whose default is an image gate: its calibrated prompt gate)
    prompt_gate = "calibrated" if stored_default in ("image", "calibrated+image") else None
    result["run_gate"] = run_gate_cost(bundle, adapter, meta, prompts, guidance, steps=args.steps, gate=prompt_gate)
    if args.out:
        write_json(args.out, result)
    print(f"{len(prompts)} prompts; fast vs reference decisions agree on {100 * result['agreement']:.1f}%")
    for name in ("reference", "fast"):
        r = result[name]
        print(f"  {name:9s}: {r['decision_evals_per_prompt']:.0f} UNet evals per prompt for the decision, "
              f"{r['evals_per_image_one_image_per_prompt']:.0f} per image (one image per prompt, {args.steps} steps); "
              f"{r['erase_decisions']} prompts get w<1")
    if "timing" in result:
        t = result["timing"]
        print(f"  wall clock, {t['images']} images side by side: base {t['base_seconds']:.1f} s, UnGuide fast "
              f"{t['unguide_fast_seconds']:.1f} s (x{t['ratio_fast_to_base']:.2f}), UnGuide reference "
              f"{t['unguide_reference_seconds']:.1f} s (x{t['ratio_reference_to_base']:.2f})")
    g = result["run_gate"]
    line = (f"  the run's own gate ({g['gate']['kind']}, keep w = {g['keep_w']:g}) keeps {g['kept']} of {g['prompts']} prompts")
    if g["kept"]:
        line += (f"; on those, one image each: {g['evals_per_image_gated']:.0f} UNet evals per image (plain generation "
                 f"{g['evals_per_image_base']:.0f}), wall clock x{g['ratio_gated_to_base']:.2f}, same-seed SSIM to base "
                 f">= {g['ssim_to_base_min']:.4f} ({g['identical_to_base']} of {g['kept']} images identical)")
    print(line)
    if image_gate:
        return _print_image_gate_cost(bundle, adapter, meta, prompts, guidance, args, result)
    return 0


def _print_image_gate_cost(bundle, adapter, meta: dict, prompts: list[str], guidance: float, args, result: dict) -> int:
    """benchmark-scorer's image-gate part: UNet evaluations per image for held-out and concept prompts, both gates."""
    from ..evaluation.cost import gate_cost_by_group
    from ..io import write_json

    groups = _cost_groups(meta, prompts)
    result["image_gate"] = {gate: gate_cost_by_group(bundle, adapter, meta, groups, guidance, gate=gate, steps=args.steps)
                            for gate in ("image", "calibrated+image")}
    if args.out:
        write_json(args.out, result)
    for gate, cost in result["image_gate"].items():
        for name in groups:
            c = cost[name]
            print(f"  gate {gate}, {name} ({c['prompts']} prompts, one image each): {c['evals_per_image_gated']:.0f} UNet "
                  f"evals per image, detector and redraws included (plain generation {c['evals_per_image_base']:.0f}); "
                  f"{c['erased']} erased, {c['image_flagged']} flagged by the image gate, {c['substituted']} drawn "
                  f"from the reference prompt; wall clock "
                  f"x{c['ratio_gated_to_base']:.2f}")
    return 0


def _cost_groups(meta: dict, prompts: list[str]) -> dict:
    """The cost report's prompt groups: those that carry the concept (its target, synonyms or label) and those that
    name none of the concept's words nor any class its anchors name (the held-out kind)."""
    import re

    concept = meta["concept"]
    words = {w.lower() for w in [concept.get("label") or "", *concept.get("synonyms", []),
                                 *concept.get("heldout_synonyms", [])] if w}
    anchor_words = {a.split()[-1].lower() for a in meta.get("anchors") or [] if a.startswith("a photo of the ")}

    def has(p: str, vocab: set) -> bool:
        return any(re.search(rf"\b{re.escape(w)}\b", p.lower()) for w in vocab)

    return {"concept prompts": [p for p in prompts if has(p, words)],
            "held-out prompts": [p for p in prompts if not has(p, words) and not has(p, anchor_words)]}


def _concept_prompts(meta: dict) -> list[tuple[str, str]]:
    """(role, prompt) for the prompts an erasure run's own concept spec names."""
    from ..erasure.concepts import concept_from_dict
    from ..evaluation.suites import concept_rows

    spec = concept_from_dict(meta["concept"], "of the erasure run")
    spec.anchors = list(meta.get("anchors") or spec.anchors)
    names = {"erased": "target", "heldout": "synonym"}
    return [(names.get(r["role"], r["role"]), r["prompt"]) for r in concept_rows(spec)]


def _selectivity_summary(rows: list[dict]) -> str:
    """One line: how many of the concept's own prompts UnGuidance hands to the adapter (w < 1)."""
    parts = []
    for role, label in (("target", "target"), ("synonym", "synonyms"), ("anchor", "anchor prompts"),
                        ("other", "other prompts")):
        group = [r for r in rows if r["role"] == role]
        if group:
            parts.append(f"{label} {sum(r['w'] < 1 for r in group)} of {len(group)}")
    line = "to the adapter (w < 1): " + ", ".join(parts)
    leaks = sum(r["w"] < 1 for r in rows if r["role"] in ("other", "anchor"))
    if leaks:
        line += (f". {leaks} unrelated prompt(s) would follow the adapter too (it is not selective for them): "
                 "UnGuidance will change their images")
    return line


def _cmd_influence(args) -> int:
    """Print each prompt's influence score and the weight UnGuidance would give it: how to see, before
    generating anything, whether an adapter is selective (targets above the empty prompt, the rest below).
    Without prompts, the run's own concept spec is checked: target, synonyms and its unrelated prompts."""
    from ..erasure.training import attach_erasure
    from ..guidance.unguidance import decision_settings, guide_for_run
    from ..io import write_json
    from ..models.loading import load_model
    from ..generation.prompts import read_prompts

    bundle = load_model(args.model, device=args.device, dtype=args.dtype)
    adapter, meta = attach_erasure(bundle, args.erasure)
    own_concept = not (args.prompt or args.prompts)
    if own_concept:
        named = _concept_prompts(meta)
    else:
        named = [("", p) for p in (list(args.prompt) if args.prompt else [r.prompt for r in read_prompts(args.prompts)])]
    gate = args.gate or (meta.get("gate") or {}).get("default")
    if gate in ("image", "calibrated+image"):
        print(f"unguide: note: the {gate} gate decides on drawn images, which `influence` does not draw: shown is the "
              "run's calibrated prompt gate (`unguide generate` records each image's detector score)", file=sys.stderr)
        gate = "calibrated"
    guide = guide_for_run(adapter, meta, gate=gate, keep=args.keep, erase_with=args.erase_with,
                          gate_position=args.gate_position, **decision_settings(args.scorer, args.weighting))
    guidance = args.guidance if args.guidance is not None else bundle.default_guidance
    infos = guide.decide(bundle, [p for _, p in named], guidance)
    rows = [{"prompt": p, "role": role, **info} for (role, p), info in zip(named, infos)]
    source = {"empty": 'd("")', "calibrated": "the run's calibration", "value": "given"}[guide.gate.kind]
    print(f"gate: {guide.gate.kind} (threshold {infos[0]['threshold']:.4g} = {source}); prompts above it get "
          f"w = {guide.rule.w_erase:g}, the rest w = {guide.rule.w_keep:g}")
    print(f"{'d(c)/threshold':>14}  {'w':>5}  {'role':7}  prompt")
    for r in rows:
        print(f'{r["score"] / r["threshold"]:14.2f}  {r["w"]:5.2f}  {r["role"]:7}  {r["prompt"]}')
    summary = _selectivity_summary(rows) if own_concept else None
    if summary:
        print(summary)
    if args.out:
        write_json(args.out, {"erasure": str(args.erasure), "guidance": guidance, "scorer": args.scorer,
                              "weighting": args.weighting, "gate": guide.settings()["gate"], "prompts": rows,
                              "summary": summary})
    return 0


def _cmd_attack(args) -> int:
    from ..attack.harness import AttackConfig, attack_benchmark
    from ..models.loading import load_model

    cfg = AttackConfig(candidates=args.candidates, pairs=args.pairs, renders=args.renders, keep=args.keep,
                       inversion_steps=args.inversion_steps, soft_tokens=args.soft_tokens, samples=args.samples,
                       steps=args.steps, seed=args.seed, gate_images=args.gate_images)
    concepts = "all" if args.concepts == "all" else [c.strip() for c in args.concepts.split(",") if c.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bundle = load_model(args.model, device=args.device, dtype=args.dtype)
    report = attack_benchmark(bundle, args.benchmark, concepts, methods, cfg, out=args.out, images=args.images,
                              suite_name=args.suite, clip_model=args.clip_model, erase_iterations=args.iterations)
    out = Path(args.out) if args.out else Path(args.benchmark) / "attack"
    def pct(rate) -> str:
        return "    –" if rate is None else f"{100 * rate:5.1f}%"

    for concept, methods_ in report["results"].items():
        for method, r in methods_.items():
            print(f"{concept:10s} {method:18s} target {pct(r['plain']['success_rate'])}  word search "
                  f"{pct(r['word_search']['success_rate'])}  inversion {pct(r.get('inversion', {}).get('success_rate'))}"
                  f"  any {pct(r['any_success_rate'])}  ({r['budget']['seconds']:.0f} s)")
    print(f"report: {out / 'report.html'} (also report.md, report.json)")
    return 0


def _cmd_demo(args) -> int:
    from .demo import headline, run_demo
    from ..evaluation.report import markdown_table

    report = run_demo(args.out, args.concept, args.samples or 12)
    print(markdown_table(report, average_only=True))
    print("\n" + headline(report, args.concept, args.out))
    return 0


IMAGE_POSITION_HELP = ("where the image gate's threshold sits between the concept's calibration images (0) and the "
                       "anchors' (1); default: the run's own (0.5)")
GATE_POSITION_HELP = ("where the calibrated threshold sits between the run's highest anchor score (0) and its lowest "
                      "concept-prompt score (1), on a log scale; lower catches more of the concept's unseen words and "
                      "more neighbours with them")


def build_parser() -> argparse.ArgumentParser:
    from typing import get_args

    from ..erasure.adapters import A_INITS, LAYER_PRESETS
    from ..erasure.training import RECIPES, TIMESTEP_MAPPINGS
    from ..guidance.unguidance import ERASE_WEIGHTS, KEEP_WEIGHTS, SCORERS, Weighting
    from ..evaluation.judges import judge_names
    from ..models.loading import DTYPES, TEXT_STATES
    from ..evaluation.suites import SUITES

    WEIGHTINGS = get_args(Weighting)

    parser = Parser(prog="unguide", description="Controlled concept erasure for text-to-image diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images (base model, or with an erasure run)")
    _add_model(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    src.add_argument("--prompts", help="text file (one prompt a line) or CSV (I2P columns: prompt, evaluation_seed, ...)")
    g.add_argument("--n", type=int, default=4, help="images per prompt (default 4)")
    g.add_argument("--seed", type=int, default=0, help="image j of a prompt uses seed+j (CSV rows: their evaluation_seed+j)")
    g.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--out", required=True, help="output directory (a rerun resumes: finished images are skipped)")
    g.add_argument("--erasure", default=None, help="an erasure run directory (from `unguide erase`)")
    g.add_argument("--mode", default=None, choices=["unguide", "base", "lora"],
                   help="with --erasure: unguide (default), base (w=1) or lora (w=0)")
    g.add_argument("--w", type=float, default=None, help="with --erasure: a fixed guidance weight w for every prompt")
    g.add_argument("--scorer", default=None, choices=SCORERS,
                   help="influence scorer: fast (default), reference (the paper's), or response (the adapter's own "
                   "response to the prompt's text states: no UNet evaluation; object-preset LoRA runs)")
    g.add_argument("--weighting", default=None, choices=WEIGHTINGS, help="rule from scores to w")
    g.add_argument("--gate", default=None, help="calibrated (the run's stored threshold), empty (the paper's d(\"\") "
                   "rule), a number, image (every prompt drawn by the base model, its image checked by the run's "
                   "detector and redrawn with the erasure if it shows the concept) or calibrated+image (prompts over "
                   "the calibrated gate erased at once, the rest checked on the image); default: the run's recipe's")
    g.add_argument("--image-gate-position", type=float, default=None, help=IMAGE_POSITION_HELP)
    g.add_argument("--keep", default=None, choices=list(KEEP_WEIGHTS),
                   help="weight of prompts under the gate: base (w = 1, the base model's image, no adapter cost) or "
                   "paper (w = 2); default: the run's recipe's")
    g.add_argument("--erase-with", default=None, choices=list(ERASE_WEIGHTS),
                   help="weight of prompts over the gate (and of images the image gate flags): adapter (w = 0, the "
                   "adapter alone), paper (w = -1) or negative (the adapter alone, guided away from the concept's own "
                   "prompt); default: the run's recipe's")
    g.add_argument("--gate-position", type=float, default=None, help=GATE_POSITION_HELP +
                   "; default: the run's own (0.5 unless its spec said otherwise); needs the calibrated gate")
    g.set_defaults(func=_cmd_generate)

    e = sub.add_parser("erase", help="train an erasure adapter for a concept (resumable)")
    _add_model(e)
    e.add_argument("--concept", help="a preset name (toy classes such as sun, 'red', sd-cat, sd-nudity, ...)")
    e.add_argument("--concept-file", help="a concept JSON file (see docs: target, reference, synonyms, other)")
    e.add_argument("--out", required=True, help="run directory (a rerun resumes from its last checkpoint)")
    e.add_argument("--preset", choices=LAYER_PRESETS, default=None,
                   help="layers: object (LoRA on attn2 k/v), explicit (LoRA on non-cross-attention Linear), full (ESD-x)")
    e.add_argument("--recipe", choices=RECIPES, default=DEFAULT_RECIPE,
                   help="selective (default): learnable LoRA A + anchor preservation + a calibrated gate; reference: the "
                   "paper's protocol exactly (A ~ N(0,1), lr 3e-5, no anchors). Flags below override the recipe")
    e.add_argument("--anchors", default=None,
                   help="text file of anchor prompts to preserve, one a line (\"\" = the empty prompt); "
                   "default: the concept's own anchors")
    e.add_argument("--vocabulary", default=None,
                   help="text file of generic prompts trained like anchors but not used to calibrate the gate "
                   "(replaces the concept's vocabulary; docs/recipes.md)")
    e.add_argument("--iterations", type=int, default=None, help="default 200")
    e.add_argument("--lr", type=float, default=None, help="default: the recipe's (reference 3e-5, selective 1e-3)")
    e.add_argument("--a-init", choices=A_INITS, default=None,
                   help="LoRA A init: gaussian N(0,1) (reference) or uniform +-1/sqrt(fan_in) (selective)")
    e.add_argument("--anchor-weight", type=float, default=None, help="weight of the anchor term (selective 1, reference 0)")
    e.add_argument("--anchors-per-step", type=int, default=None, help="anchor prompts per iteration (default: the spec's, else 1)")
    e.add_argument("--gate-position", type=float, default=None,
                   help=GATE_POSITION_HELP + "; stored with the run (default: the spec's, else 0.5)")
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

    t = sub.add_parser("train-toy", help="train the embedded toy-world model (long; resumable)")
    t.add_argument("--stage", choices=["classifier", "vae", "unet", "all", "export"], default="all")
    t.add_argument("--out", default="work/toytrain")
    t.add_argument("--classifier-steps", type=int, default=1500)
    t.add_argument("--vae-steps", type=int, default=700)
    t.add_argument("--unet-steps", type=int, default=7000)
    t.add_argument("--max-minutes", type=float, default=None, help="stop the UNet stage (checkpointed) after this long")
    t.add_argument("--stop-after", type=int, default=None,
                   help="end the UNet stage at this step of the --unet-steps schedule (checkpointed, then exported)")
    t.add_argument("--text-states", choices=TEXT_STATES,
                   default="contextual", help="how the frozen MiniLM's token states condition the UNet "
                   "(contextual: the committed weights; the others: see docs/findings-toyworld.md)")
    t.add_argument("--unet-channels", type=_channels, default=(32, 64, 128),
                   help="UNet block widths, comma-separated (default 32,64,128: the committed model)")
    t.add_argument("--text-norm", type=float, default=None,
                   help="scale the exported model's text states to this mean token norm (CLIP ViT-L: 27.7), "
                   "dividing the cross-attention key/value weights to match (the same model, SD-sized LoRA inputs)")
    t.add_argument("--threads", type=int, default=0)
    t.add_argument("--device", default="cpu", help="where the UNet stage trains: cpu (default), cuda or cuda:N")
    t.set_defaults(func=_cmd_train_toy)

    q = sub.add_parser("toy-quality", help="classifier accuracy of a toy-world model's samples, per class")
    _add_model(q)
    q.add_argument("--samples", type=int, default=32)
    q.add_argument("--guidance", type=float, default=None)
    q.add_argument("--steps", type=int, default=50)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", default=None, help="write the full result as JSON here")
    q.set_defaults(func=_cmd_toy_quality)

    b = sub.add_parser("benchmark", help="erase, generate and evaluate concepts; writes report.{json,md,html}")
    _add_model(b)
    b.add_argument("--suite", choices=SUITES, default="toy",
                   help="toy (the embedded model's 10 classes), cifar10 (Stable Diffusion, the paper's Table 1, CLIP "
                   "judge) or nudity (an I2P-style --prompts CSV, NudeNet)")
    b.add_argument("--concepts", default="all",
                   help="comma-separated concepts of the suite (toy: sun,boat,...; cifar10: cat,dog,...) or 'all'")
    b.add_argument("--methods", default="base,lora,unguide,full,selective,selective-unguide,selective-image",
                   help="from base, lora, unguide, full (the paper's recipe and ESD-x), selective, selective-unguide "
                   "(its calibrated prompt gate), selective-image (its image gate)")
    b.add_argument("--samples", type=int, default=32, help="images per prompt")
    b.add_argument("--steps", type=int, default=50)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--guidance", type=float, default=None)
    b.add_argument("--iterations", type=int, default=None, help="erasure iterations for runs that are missing (default 200)")
    b.add_argument("--erase-lr", type=float, default=None,
                   help="learning rate of the reference-recipe runs (default 3e-5); the selective recipe keeps its own")
    b.add_argument("--keep", choices=list(KEEP_WEIGHTS), default=None,
                   help="selective-unguide: weight of prompts under the calibrated gate, base (w = 1) or paper (w = 2); "
                   "default: the selective recipe's")
    b.add_argument("--erase-with", choices=list(ERASE_WEIGHTS), default=None,
                   help="selective-unguide: weight of prompts over the gate, adapter (w = 0) or paper (w = -1); "
                   "default: the selective recipe's")
    b.add_argument("--gate-position", type=float, default=None,
                   help="selective-unguide: " + GATE_POSITION_HELP + "; default: each run's own")
    b.add_argument("--image-gate", choices=["image", "calibrated+image"], default=None,
                   help="selective-image: the image gate alone (default) or behind the calibrated prompt gate")
    b.add_argument("--image-gate-position", type=float, default=None, help="selective-image: " + IMAGE_POSITION_HELP)
    b.add_argument("--prompts", default=None, help="nudity suite: I2P-style CSV (prompt, evaluation_seed, "
                   "evaluation_guidance, sd_image_width, sd_image_height, nudity_percentage)")
    b.add_argument("--clip-model", default="openai/clip-vit-base-patch32",
                   help="CLIP model (hub id or local directory): the cifar10 judge, the nudity suite's CLIP score and "
                   "FID features; 'none' skips CLIP in the nudity suite")
    b.add_argument("--fid-reference", default=None,
                   help="nudity suite: a folder of reference images (e.g. COCO) for FID on CLIP image features")
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--out", required=True, help="benchmark directory (reruns reuse finished runs and images)")
    b.set_defaults(func=_cmd_benchmark)

    v = sub.add_parser("evaluate", help="score a generated folder (from its index.jsonl); writes metrics.json")
    v.add_argument("--images", required=True)
    v.add_argument("--judge", default="toy", choices=judge_names())
    v.add_argument("--concept", default=None, help="preset name: adds Acc_e/Acc_s/Acc_g/H_o from its prompts")
    v.add_argument("--concept-file", default=None)
    v.add_argument("--reference", default=None, help="base-model images of the same prompts and seeds")
    v.add_argument("--labels", default=None, help="clip judge: comma-separated label set")
    v.add_argument("--clip-model", default="openai/clip-vit-base-patch32")
    v.set_defaults(func=_cmd_evaluate)

    s = sub.add_parser("benchmark-scorer", help="fast vs reference influence scorer: decisions, cost, wall clock")
    _add_model(s)
    s.add_argument("--erasure", required=True)
    s.add_argument("--prompts", default=None, help="prompt file (default: >= 100 prompts around the run's toy concept)")
    s.add_argument("--guidance", type=float, default=None)
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--reference-draws", type=int, default=30)
    s.add_argument("--timing-prompts", type=int, default=32, help="images generated side by side for the timing")
    s.add_argument("--gates-only", action="store_true",
                   help="skip the fast-vs-reference scorer comparison: only the run's gates' costs per prompt group")
    s.add_argument("--out", default=None, help="write the full result as JSON")
    s.set_defaults(func=_cmd_benchmark_scorer)

    f = sub.add_parser("influence", help="influence scores and UnGuidance weights of prompts for an erasure run")
    _add_model(f)
    f.add_argument("--erasure", required=True, help="an erasure run directory")
    src = f.add_mutually_exclusive_group()  # neither: the run's own concept (target, synonyms, other prompts)
    src.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    src.add_argument("--prompts", help="text file (one prompt a line) or I2P-style CSV")
    f.add_argument("--scorer", choices=SCORERS, default="fast")
    f.add_argument("--weighting", choices=WEIGHTINGS, default="binary")
    f.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's)")
    f.add_argument("--gate", default=None, help="calibrated, empty or a number (default: the run's recipe's; the "
                   "image gates decide on images, which `influence` does not draw: their prompt side is shown)")
    f.add_argument("--gate-position", type=float, default=None,
                   help=GATE_POSITION_HELP + "; default: the run's own")
    f.add_argument("--keep", default=None, choices=list(KEEP_WEIGHTS), help="weight under the gate (default: the run's)")
    f.add_argument("--erase-with", default=None, choices=list(ERASE_WEIGHTS),
                   help="weight over the gate (default: the run's)")
    f.add_argument("--out", default=None, help="also write the scores as JSON")
    f.set_defaults(func=_cmd_influence)

    k = sub.add_parser("attack", help="try to bring erased concepts back (word search + soft-token inversion), "
                       "per method, against the runs of a benchmark directory")
    _add_model(k)
    k.add_argument("--benchmark", required=True, help="a benchmark directory (its runs are attacked; missing runs are "
                   "trained as `unguide benchmark` would)")
    k.add_argument("--suite", choices=SUITES, default="toy")
    k.add_argument("--concepts", default="sun", help="comma-separated concepts or 'all' (default sun)")
    k.add_argument("--methods", default="base,lora,unguide,full,selective,selective-unguide,selective-image")
    k.add_argument("--gate-images", type=int, default=2, help="against an image gate: images the attacker draws per "
                   "candidate prompt to see whether the detector flags it (default 2)")
    k.add_argument("--images", default=None, help="a folder of images of the concept (needed on Stable Diffusion; the "
                   "embedded model renders its own)")
    k.add_argument("--clip-model", default=None, help="cifar10 suite: the CLIP judge")
    k.add_argument("--candidates", type=int, default=256, help="vocabulary words scored per method (default 256)")
    k.add_argument("--pairs", type=int, default=8, help="best words combined in pairs (default 8: 56 prompts)")
    k.add_argument("--renders", type=int, default=8, help="concept images the loss is measured on")
    k.add_argument("--keep", type=int, default=3, help="best search prompts generated and judged")
    k.add_argument("--inversion-steps", type=int, default=40, help="soft-token inversion steps (0: none)")
    k.add_argument("--soft-tokens", type=int, default=3)
    k.add_argument("--samples", type=int, default=8, help="images per judged prompt")
    k.add_argument("--steps", type=int, default=50, help="DDIM steps of the judged images")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--iterations", type=int, default=None, help="erasure iterations of runs the benchmark lacks (200)")
    k.add_argument("--out", default=None, help="default: BENCHMARK/attack (a rerun resumes)")
    k.set_defaults(func=_cmd_attack)

    d = sub.add_parser("demo", help="the main job on the embedded model, with a report")
    d.add_argument("--out", default="demo_out")
    d.add_argument("--samples", type=int, default=None, help="images per prompt (default 12)")
    d.add_argument("--concept", default="sun", help="toy concept to erase (default sun)")
    d.set_defaults(func=_cmd_demo)
    _check_numbers(parser)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UnguideError as exc:
        print(f"unguide: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unguide: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

