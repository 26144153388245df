"""``unguide generate``: images from prompts, with or without an erasure run."""
from __future__ import annotations

import sys

from .common import GATE_POSITION_HELP, IMAGE_POSITION_HELP, add_model


def _cmd_generate(args) -> int:
    """``unguide generate``: the same UnGuidePipeline as the Python API, writing into a folder."""
    from ..errors import UnguideError
    from ..guidance.config import GuidanceConfig, decision_settings
    from ..generation.pipeline import UnGuidePipeline
    from ..generation.prompts import PromptRow, check_request, read_prompts

    rows = [PromptRow(p) for p in args.prompt] if args.prompt else read_prompts(args.prompts)
    check_request(rows, args.n, args.steps)
    asked = {k: getattr(args, k) for k in GUIDE_FLAGS if getattr(args, k) is not None}
    if asked and not args.erasure:
        raise UnguideError(f"{', '.join(GUIDE_FLAGS[k] for k in asked)} need(s) --erasure RUN (an erasure run directory)")
    config = GuidanceConfig(**{k: v for k, v in asked.items() if k not in ("scorer", "weighting")},
                            **decision_settings(args.scorer, args.weighting))  # checked before any model is loaded
    pipe = UnGuidePipeline.from_pretrained(args.model, torch_dtype=args.dtype, device=args.device)
    if args.erasure:
        pipe.load_erasure(args.erasure)
    guide = pipe.guide(config if args.erasure else None)
    if getattr(guide, "note", None):
        print(f"unguide: note: {guide.note}", file=sys.stderr)
    items = pipe.plan(rows, args.n, args.seed, args.guidance, args.height, args.width, args.steps)
    guidance = args.guidance if args.guidance is not None else pipe.bundle.default_guidance
    info = {"model": pipe.bundle.name, "steps": args.steps, "n": args.n, "seed": args.seed, "guidance": guidance,
            "prompts": args.prompts or args.prompt, "guide": guide.name, "erasure": pipe.erasure_info(guide)}
    if args.dtype not in (None, "float32"):
        info["dtype"] = args.dtype  # float32 (the default) goes unrecorded, as in runs made before --dtype
    out = pipe.generate_to(items, args.out, num_inference_steps=args.steps, guide=guide, batch_size=args.batch_size,
                           run_info=info)
    n_files = sum(1 for it in items if (out / it.filename).exists())
    print(f"{n_files} images in {out} (index: {out / 'index.jsonl'}, grid: {out / 'grid.png'})")
    return 0


# the flags that describe how an erasure run guides (GuidanceConfig's fields, the scorer and the weighting rule)
GUIDE_FLAGS = {"mode": "--mode", "w": "--w", "gate": "--gate", "keep": "--keep", "erase_with": "--erase-with",
               "gate_position": "--gate-position", "image_gate_position": "--image-gate-position",
               "scorer": "--scorer", "weighting": "--weighting"}


def add_parser(sub) -> None:
    from typing import get_args
    from ..guidance.config import ERASE_WEIGHTS, KEEP_WEIGHTS, SCORERS, Weighting

    WEIGHTINGS = get_args(Weighting)

    g = sub.add_parser("generate", help="generate images (base model, or with an erasure run)")
    add_model(g)
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
                   "detector and redrawn with the erasure if it shows the concept) or calibrated+image (as image, "
                   "but a prompt over the calibrated prompt gate is a suspect: its image is checked under a more "
                   "lenient threshold); default: the run's recipe's")
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
