"""``unguide benchmark``: erase, generate and evaluate a suite's concepts with every method."""
from __future__ import annotations

from pathlib import Path

from ..errors import UnguideError
from .common import GATE_POSITION_HELP, IMAGE_POSITION_HELP, add_model


def _cmd_benchmark(args) -> int:
    from ..evaluation.benchmark import Benchmark, BenchmarkConfig
    from ..generation.pipeline import UnGuidePipeline
    from ..evaluation.report import markdown_table

    concepts = "all" if args.concepts == "all" else [c.strip() for c in args.concepts.split(",") if c.strip()]
    together = [c.strip() for c in args.together.split(",") if c.strip()] if args.together else None
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    cfg = BenchmarkConfig(suite=args.suite, concepts=concepts, methods=methods, samples=args.samples, steps=args.steps,
                          seed=args.seed, guidance=args.guidance, erase_iterations=args.iterations,
                          erase_lr=args.erase_lr, batch_size=args.batch_size, selective_keep=args.keep,
                          calibration_samples=args.calibration_samples, erase_schedule=args.schedule,
                          selective_erase_with=args.erase_with, selective_gate_position=args.gate_position,
                          selective_image_gate=args.image_gate, selective_image_position=args.image_gate_position,
                          prompts=args.prompts,
                          clip_model=None if args.clip_model == "none" else args.clip_model,
                          fid_reference=args.fid_reference, together=together)
    pipe = UnGuidePipeline.from_pretrained(args.model, torch_dtype=args.dtype, device=args.device)
    report = Benchmark(pipe, cfg, args.out).run()
    if report:  # the main process (the others only generate their share)
        print(markdown_table(report, average_only=True))
        print(f"report: {Path(args.out) / 'report.html'} (also report.md, report.json); {report['seconds']:.0f} s")
    return 0


def add_parser(sub) -> None:
    from ..guidance.config import ERASE_WEIGHTS, KEEP_WEIGHTS
    from ..evaluation.suites import SUITES
    from ..erasure.schedule import SCHEDULES

    b = sub.add_parser("benchmark", help="erase, generate and evaluate concepts; writes report.{json,md,html}")
    add_model(b)
    b.add_argument("--suite", choices=SUITES, default="toy",
                   help="toy (the embedded model's 10 classes), cifar10 (Stable Diffusion, the paper's Table 1, CLIP "
                   "judge) or nudity (an I2P-style --prompts CSV, NudeNet)")
    b.add_argument("--concepts", default="all",
                   help="comma-separated concepts of the suite (toy: sun,boat,...; cifar10: cat,dog,...) or 'all'")
    b.add_argument("--methods", default="base,lora,unguide,full,selective,selective-unguide,selective-image",
                   help="from base, lora, unguide, full (the paper's recipe and ESD-x), selective, selective-unguide "
                   "(its calibrated prompt gate), selective-image (its image gate)")
    b.add_argument("--together", default=None,
                   help="comma-separated concepts erased at once (sun,star,boat): their runs as one group run, each "
                   "erasing method drawn with the group too (METHOD+together); figures leave out the group's own "
                   "classes (replaces --concepts)")
    b.add_argument("--samples", type=int, default=32, help="images per prompt")
    b.add_argument("--steps", type=int, default=50)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--guidance", type=float, default=None)
    b.add_argument("--iterations", type=int, default=None, help="erasure iterations for runs that are missing (default 200)")
    b.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help="erasure schedule of missing runs (default: each recipe's own: selective cached, reference "
                   "fresh); another one keeps its runs apart (runs/CONCEPT/RUN-SCHEDULE), so both compare in one --out")
    b.add_argument("--calibration-samples", type=int, default=None,
                   help="base images per prompt the image gates of missing runs are calibrated on (default 8)")
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
                   help="selective-image: behind the calibrated prompt gate, which marks suspects (default), or the "
                   "image gate alone")
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
    add_erase_parser(sub)


def _cmd_benchmark_erase(args) -> int:
    from ..erasure.schedule import SCHEDULES
    from ..evaluation.erase_cost import erase_cost, format_erase_cost
    from ..generation.pipeline import UnGuidePipeline
    from ..io import write_json

    schedules = [s.strip() for s in args.schedules.split(",") if s.strip()]
    unknown = sorted(set(schedules) - set(SCHEDULES))
    if unknown or not schedules:
        raise UnguideError(f"unknown schedule(s) {unknown}: use a comma-separated list of {', '.join(SCHEDULES)}")
    pipe = UnGuidePipeline.from_pretrained(args.model, torch_dtype=args.dtype, device=args.device)
    result = erase_cost(pipe, args.concept, args.out, schedules, images=args.images, steps=args.steps,
                        samples=args.samples, iterations=args.iterations)
    write_json(Path(args.out) / "erase_cost.json", result)
    print("\n".join(format_erase_cost(result)))
    print(f"full result: {Path(args.out) / 'erase_cost.json'}")
    return 0


def add_erase_parser(sub) -> None:
    b = sub.add_parser("benchmark-erase", help="one erasure under each schedule, timed and counted beside drawing "
                       "a page of images, with each run's quality figures")
    add_model(b)
    b.add_argument("--concept", default="sun", help="a concept preset of the model's world (default sun)")
    b.add_argument("--schedules", default="fresh,cached",
                   help="schedules compared, the first is the baseline of the evaluation ratio (default fresh,cached)")
    b.add_argument("--images", type=int, default=128, help="base images drawn beside the erasures (default 128)")
    b.add_argument("--steps", type=int, default=50, help="sampling steps of those images and of the quality figures")
    b.add_argument("--samples", type=int, default=4,
                   help="images per prompt of each run's toy benchmark (default 4)")
    b.add_argument("--iterations", type=int, default=None,
                   help="every schedule's iterations (default: each its own; fewer: a quick check, not a comparison)")
    b.add_argument("--out", required=True,
                   help="directory: one folder per schedule (its run is retrained from scratch each time)")
    b.set_defaults(func=_cmd_benchmark_erase)
