"""``unguide demo`` / ``make demo``: the main job on the embedded model.

Erase one concept (``sun`` by default) from ``toyworld`` twice, with the selective recipe (our default) and with
the paper's reference recipe, generate with the base model, the selective adapter alone and each adapter with
UnGuidance (the selective adapter behind its default gate, the prompt gate marking suspects for the image gate; the
paper's behind d("")), evaluate on classes neither
erasure saw, and write the HTML report. It is the benchmark on one concept
with fewer samples and methods (the paper's adapter alone is left out: with it `make demo` took 619 s here). Both
recipes are erased with the ``cached`` schedule (the selective recipe's own; the paper's recipe is the paper's
objective and settings on it), and each prompt is drawn with ten seeds, so the demo fits in five minutes on two CPU
cores; ``--schedule fresh`` erases both with ESD's schedule, the paper's protocol exactly (about four minutes more),
and ``--samples 16`` draws as many seeds as the benchmark.
"""
from __future__ import annotations

from pathlib import Path

DEMO_METHODS = ["base", "unguide", "selective", "selective-image"]


DEMO_SCHEDULE = "cached"
DEMO_SAMPLES = 10  # images per prompt: with 12, generation alone took 253 of the demo's 319 s (make demo, 2 cores)


def run_demo(out: str | Path = "demo_out", concept: str = "sun", samples: int = DEMO_SAMPLES, model: str = "toyworld",
             schedule: str = DEMO_SCHEDULE) -> dict:
    """The demo's benchmark on one concept of an embedded model (``toyworld``, or ``toyworld-flow``), every run
    erased with ``schedule``; returns its report."""
    from ..evaluation.benchmark import Benchmark, BenchmarkConfig
    from ..generation.pipeline import UnGuidePipeline

    cfg = BenchmarkConfig(concepts=[concept], methods=DEMO_METHODS, samples=samples, erase_schedule=schedule)
    return Benchmark(UnGuidePipeline.from_pretrained(model), cfg, Path(out)).run()


def headline(report: dict, concept: str, out: str | Path) -> str:
    """What the demo found, in three sentences."""
    avg = report["average"]
    ours, paper = avg["selective-image"], avg["unguide"]
    return (f"Erasing '{concept}' (selective recipe + prompt and image gates): target recognised {100 * ours['acc_e']:.1f}% "
            f"(base {100 * avg['base']['acc_e']:.1f}%), held-out synonyms {100 * ours['acc_g_heldout']:.1f}%, classes the "
            f"erasure never saw {100 * ours['acc_s']:.1f}% (base {100 * avg['base']['acc_s']:.1f}%), same-seed SSIM to base "
            f"on them {ours.get('ssim_other', float('nan')):.3f}, image gate fired on {100 * ours.get('image_flagged_other', 0):.1f}% "
            f"of them; H_o {100 * ours['h_o']:.1f}.\n"
            f"The paper's recipe ({report.get('config', {}).get('erase_schedule') or 'fresh'} schedule) on the same "
            f"prompts: target {100 * paper['acc_e']:.1f}%, unseen classes "
            f"{100 * paper['acc_s']:.1f}%, SSIM {paper.get('ssim_other', float('nan')):.3f}; H_o {100 * paper['h_o']:.1f}.\n"
            f"Report: {(Path(out) / 'report.html').resolve()} (also report.md, report.json, grids/, plots/) "
            f"in {report['seconds']:.0f} s")


def _cmd_demo(args) -> int:
    from ..evaluation.report import markdown_table

    report = run_demo(args.out, args.concept, args.samples or DEMO_SAMPLES, args.model, args.schedule)
    print(markdown_table(report, average_only=True))
    print("\n" + headline(report, args.concept, args.out))
    return 0


def add_parser(sub) -> None:
    d = sub.add_parser("demo", help="the main job on the embedded model, with a report")
    d.add_argument("--out", default="demo_out")
    d.add_argument("--samples", type=int, default=None, help=f"images per prompt (default {DEMO_SAMPLES})")
    d.add_argument("--concept", default="sun", help="toy concept to erase (default sun)")
    d.add_argument("--model", default="toyworld", choices=["toyworld", "toyworld-flow"],
                   help="the embedded model to run it on (default toyworld, the UNet; toyworld-flow: the MMDiT)")
    d.add_argument("--schedule", default=DEMO_SCHEDULE, choices=["cached", "fresh"],
                   help="erasure schedule of both recipes (default cached; fresh: ESD's, the paper's protocol exactly)")
    d.set_defaults(func=_cmd_demo)
