"""``unguide demo`` / ``make demo``: the main job on the embedded model.

Erase one concept (``sun`` by default) from ``toyworld`` with the reference protocol, generate with the base
model, the adapter alone, UnGuide and the ESD-x style full fine-tune, evaluate, and write the HTML report.
It is the benchmark on one concept with fewer samples, so it fits in about ten minutes on two CPU cores.
"""
from __future__ import annotations

from pathlib import Path


def demo_command(args) -> int:
    from .benchmark import Benchmark, BenchmarkConfig
    from .models import load_model
    from .report import markdown_table

    out = Path(args.out)
    bundle = load_model("toyworld")
    cfg = BenchmarkConfig(concepts=[args.concept], methods=["base", "lora", "unguide", "full"], samples=args.samples or 12)
    report = Benchmark(bundle, cfg, out).run()
    print(markdown_table(report, average_only=True))
    avg = report["average"]
    print(f"\nErasing '{args.concept}' with UnGuide: target recognised {100 * avg['unguide']['acc_e']:.1f}% "
          f"(base {100 * avg['base']['acc_e']:.1f}%, adapter alone {100 * avg['lora']['acc_e']:.1f}%), other classes "
          f"{100 * avg['unguide']['acc_s']:.1f}% (base {100 * avg['base']['acc_s']:.1f}%), same-seed SSIM to base on "
          f"other prompts {avg['unguide'].get('ssim_other', float('nan')):.3f} (adapter alone "
          f"{avg['lora'].get('ssim_other', float('nan')):.3f}).")
    print(f"Report: {(out / 'report.html').resolve()} (also report.md, report.json, grids/, plots/) "
          f"in {report['seconds']:.0f} s")
    return 0
