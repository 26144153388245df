"""``unguide benchmark-scorer``: the influence scorers' and gates' cost and decisions."""
from __future__ import annotations


from ..errors import UnguideError
from .common import add_model


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
                  f"{c['erased']} erased, {c['suspects']} suspects of the prompt gate, {c['image_flagged']} flagged by "
                  f"the image gate, {c['substituted']} drawn "
                  f"from the reference prompt; wall clock "
                  f"x{c['ratio_gated_to_base']:.2f}")
    return 0


def _cost_groups(meta: dict, prompts: list[str]) -> dict:
    """The cost report's prompt groups: those that carry the concept (its target, synonyms or label) and those that
    name none of the concept's words nor any class its anchors name (the held-out kind)."""
    import re

    runs = list(meta.members.values())  # a group: every member's words
    words = {w.lower() for m in runs for w in [m.concept.get("label") or "", *m.concept.get("synonyms", []),
                                               *m.concept.get("heldout_synonyms", [])] if w}
    anchor_words = {a.split()[-1].lower() for m in runs for a in m.anchors or [] if a.startswith("a photo of the ")}

    def has(p: str, vocab: set) -> bool:
        return any(re.search(rf"\b{re.escape(w)}\b", p.lower()) for w in vocab)

    return {"concept prompts": [p for p in prompts if has(p, words)],
            "held-out prompts": [p for p in prompts if not has(p, words) and not has(p, anchor_words)]}


def _cmd_benchmark_scorer(args) -> int:
    from ..erasure.concepts import load_preset
    from ..evaluation.cost import run_gate_cost, scorer_benchmark
    from ..erasure.runs import load_run
    from ..io import write_json
    from ..models.loading import load_model
    from ..models.worlds import world_of
    from ..generation.prompts import read_prompts

    bundle = load_model(args.model, device=args.device, dtype=args.dtype)
    meta = load_run(args.erasure)
    adapter = meta.attach(bundle)
    names = list(meta.members)
    if args.prompts:
        prompts = [r.prompt for r in read_prompts(args.prompts)]
    elif world_of(bundle) is not None:
        prompts = list(dict.fromkeys(p for n in names for p in world_of(bundle).decision_prompts(load_preset(n))))
    else:
        raise UnguideError("give --prompts FILE: the default prompt set exists for the embedded model's concepts only")
    guidance = args.guidance if args.guidance is not None else bundle.default_guidance
    image_gate = any(m.calibration.image for m in meta.members.values())
    if meta.is_group and not args.gates_only:
        raise UnguideError(f"{args.erasure} is a group run: its cost is measured with --gates-only")
    if args.gates_only:
        if not image_gate:
            raise UnguideError(f"{args.erasure} has no image gate: drop --gates-only, or rerun `unguide erase` on it")
        return _print_image_gate_cost(bundle, adapter, meta, prompts, guidance, args, {"erasure": str(args.erasure)})
    result = scorer_benchmark(bundle, adapter, prompts, guidance, steps=args.steps, reference_draws=args.reference_draws,
                              timing_prompts=args.timing_prompts)
    result["erasure"] = str(args.erasure)
    stored_default = meta.defaults.gate
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


def add_parser(sub) -> None:

    s = sub.add_parser("benchmark-scorer", help="fast vs reference influence scorer: decisions, cost, wall clock")
    add_model(s)
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
