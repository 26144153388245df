"""``unguide attack``: try to bring erased concepts back."""
from __future__ import annotations

from pathlib import Path

from .common import add_model


def _cmd_attack(args) -> int:
    from ..attack.harness import AttackConfig, attack_benchmark
    from ..generation.pipeline import UnGuidePipeline

    cfg = AttackConfig(candidates=args.candidates, pairs=args.pairs, renders=args.renders, keep=args.keep,
                       inversion_steps=args.inversion_steps, soft_tokens=args.soft_tokens, samples=args.samples,
                       steps=args.steps, seed=args.seed, gate_images=args.gate_images)
    concepts = "all" if args.concepts == "all" else [c.strip() for c in args.concepts.split(",") if c.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    together = [c.strip() for c in args.together.split(",") if c.strip()] if args.together else None
    pipe = UnGuidePipeline.from_pretrained(args.model, torch_dtype=args.dtype, device=args.device)
    report = attack_benchmark(pipe, args.benchmark, concepts, methods, cfg, out=args.out, images=args.images,
                              suite_name=args.suite, clip_model=args.clip_model, erase_iterations=args.iterations,
                              calibration_samples=args.calibration_samples, together=together,
                              image_gate=args.image_gate)
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


def add_parser(sub) -> None:
    from ..evaluation.suites import SUITES

    k = sub.add_parser("attack", help="try to bring erased concepts back (word search + soft-token inversion), "
                       "per method, against the runs of a benchmark directory")
    add_model(k)
    k.add_argument("--benchmark", required=True, help="a benchmark directory (its runs are attacked; missing runs are "
                   "trained as `unguide benchmark` would)")
    k.add_argument("--suite", choices=SUITES, default="toy")
    k.add_argument("--concepts", default="sun", help="comma-separated concepts or 'all' (default sun)")
    k.add_argument("--methods", default="base,lora,unguide,full,selective,selective-unguide,selective-image")
    k.add_argument("--together", default=None, help="comma-separated concepts erased as one group run (as benchmark "
                   "--together; replaces --concepts): each erasing method is also attacked as METHOD+together, every "
                   "member through the group's decision")
    k.add_argument("--image-gate", choices=["image", "calibrated+image"], default=None,
                   help="selective-image: behind the calibrated prompt gate, which marks suspects (default), or the "
                   "image gate alone")
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
    k.add_argument("--calibration-samples", type=int, default=None,
                   help="base images per prompt the image gates of runs it trains are calibrated on (default 8)")
    k.add_argument("--out", default=None, help="default: BENCHMARK/attack (a rerun resumes)")
    k.set_defaults(func=_cmd_attack)
