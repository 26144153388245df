"""``unguide evaluate``: score a generated folder."""
from __future__ import annotations

import json
from pathlib import Path



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


def add_parser(sub) -> None:
    from ..evaluation.judges import judge_names

    v = sub.add_parser("evaluate", help="score a generated folder (from its index.jsonl); writes metrics.json")
    v.add_argument("--images", required=True)
    v.add_argument("--judge", default="toy", choices=judge_names())
    v.add_argument("--concept", default=None, help="preset name: adds Acc_e/Acc_s/Acc_g/H_o from its prompts")
    v.add_argument("--concept-file", default=None)
    v.add_argument("--reference", default=None, help="base-model images of the same prompts and seeds")
    v.add_argument("--labels", default=None, help="clip judge: comma-separated label set")
    v.add_argument("--clip-model", default="openai/clip-vit-base-patch32")
    v.set_defaults(func=_cmd_evaluate)
