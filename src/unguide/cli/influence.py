"""``unguide influence``: each prompt's influence score and weight under an erasure run."""
from __future__ import annotations

import sys

from .common import GATE_POSITION_HELP, add_model


def _concept_prompts(meta) -> list[tuple[str, str]]:
    """(role, prompt) for the prompts an erasure run's own concept spec names."""
    from ..erasure.concepts import concept_from_dict
    from ..evaluation.suites import concept_rows

    spec = concept_from_dict(meta.concept, "of the erasure run")
    spec.anchors = list(meta.anchors or spec.anchors)
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
    from ..erasure.runs import read_run
    from ..guidance.config import decision_settings
    from ..guidance.unguidance import guide_for_run
    from ..io import write_json
    from ..models.loading import load_model
    from ..generation.prompts import read_prompts

    bundle = load_model(args.model, device=args.device, dtype=args.dtype)
    meta = read_run(args.erasure)
    adapter = meta.attach(bundle)
    own_concept = not (args.prompt or args.prompts)
    if own_concept:
        named = _concept_prompts(meta)
    else:
        named = [("", p) for p in (list(args.prompt) if args.prompt else [r.prompt for r in read_prompts(args.prompts)])]
    gate = args.gate or meta.defaults.gate
    if gate in ("image", "calibrated+image"):
        print(f"unguide: note: the {gate} gate decides on drawn images, which `influence` does not draw: shown is the "
              "run's calibrated prompt gate (`unguide generate` records each image's detector score)", file=sys.stderr)
        gate = "calibrated"
    guide = guide_for_run(adapter, meta, gate=gate, keep=args.keep, erase_with=args.erase_with,
                          gate_position=args.gate_position, **decision_settings(args.scorer, args.weighting))
    guidance = args.guidance if args.guidance is not None else bundle.default_guidance
    infos = guide.decide(bundle, [p for _, p in named], guidance)
    rows = [{"prompt": p, "role": role, **d.record()} for (role, p), d in zip(named, infos)]
    source = {"empty": 'd("")', "calibrated": "the run's calibration", "value": "given"}[guide.gate.kind]
    print(f"gate: {guide.gate.kind} (threshold {infos[0].threshold:.4g} = {source}); prompts above it get "
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


def add_parser(sub) -> None:
    from typing import get_args
    from ..guidance.config import ERASE_WEIGHTS, KEEP_WEIGHTS, SCORERS, Weighting

    WEIGHTINGS = get_args(Weighting)

    f = sub.add_parser("influence", help="influence scores and UnGuidance weights of prompts for an erasure run")
    add_model(f)
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
