"""``unguide benchmark-erase``: what one erasure costs under each schedule, beside drawing a page of images, measured
side by side in one run: wall time and UNet image-evaluations (training and gate calibration apart), then, on an
embedded model, each run's quality figures (the toy benchmark on that concept, same seeds for every schedule).

Every run is trained from scratch (its folder under ``out`` is cleared first): a timing of a run that was already
finished would measure nothing.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

from ..erasure.concepts import load_preset
from ..erasure.training import EraseConfig, erase
from ..sampling.ddim import EvalCounter
from ..sampling.images import Item, PlainGuide
from .benchmark import Benchmark, BenchmarkConfig
from .cost import timed_generation

QUALITY_METHODS = ("base", "selective", "selective-image")
QUALITY_KEYS = ("h_o", "acc_e", "acc_s", "acc_g", "ssim_other")


def _benchmark(pipe, concept: str, schedule: str, out: Path, samples: int, steps: int,
               iterations: Optional[int]) -> Benchmark:
    cfg = BenchmarkConfig(concepts=[concept], methods=list(QUALITY_METHODS), samples=max(samples, 1), steps=steps,
                          erase_schedule=schedule, erase_iterations=iterations)
    return Benchmark(pipe, cfg, out / schedule)


def erase_cost(pipe, concept: str, out: str | Path, schedules: Sequence[str] = ("fresh", "cached"),
               images: int = 128, steps: int = 50, batch_size: int = 32, samples: int = 4,
               iterations: Optional[int] = None, progress: bool = True) -> dict:
    """Erase ``concept`` (a preset) with the selective recipe under each schedule, time it, draw ``images`` base
    images of its target prompt beside it, then (``samples`` > 0) benchmark each run on the model's toy suite.
    ``iterations``: every schedule's (None: each its own; fewer make a quick check, not a comparison)."""
    bundle, out = pipe.bundle, Path(out)
    spec = load_preset(concept)
    result: dict = {"concept": concept, "recipe": "selective", "steps": steps, "schedules": {}}
    benches = {name: _benchmark(pipe, concept, name, out, samples, steps, iterations) for name in schedules}
    for name, bench in benches.items():
        run_dir = bench.run_dir(concept, "selective")
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg: EraseConfig = bench.erase_config("selective", concept)
        counter = EvalCounter(bundle.unet)
        t0 = time.perf_counter()
        try:
            run = erase(bundle, bench.specs[concept], run_dir, cfg, progress=progress)
        finally:
            counter.close()
        result["schedules"][name] = {"seconds": round(time.perf_counter() - t0, 2), "evals": counter.count,
                                     "iterations": cfg.iterations, "batch": cfg.batch, "run": str(run_dir), **run.cost}
    size = bundle.image_size
    items = [Item(spec.target, seed, bundle.default_guidance, size, size, sample_index=seed) for seed in range(images)]
    seconds, evals, _ = timed_generation(bundle, items, PlainGuide(), steps, batch_size)
    result["generate"] = {"images": images, "seconds": round(seconds, 2), "evals": evals}
    first = result["schedules"][schedules[0]]
    for r in result["schedules"].values():
        r["x_generate"] = round(r["seconds"] / seconds, 2)
        r["evals_vs_" + schedules[0]] = round(r["evals"] / first["evals"], 3)
    if samples > 0:
        for name, bench in benches.items():
            report = bench.run()
            result["schedules"][name]["quality"] = {
                m: {k: report["average"][m].get(k) for k in QUALITY_KEYS} for m in QUALITY_METHODS if m != "base"}
            result["schedules"][name]["quality_samples"] = samples
    return result


def format_erase_cost(result: dict) -> list[str]:
    g = result["generate"]
    lines = [f"erasing '{result['concept']}' ({result['recipe']} recipe, gates calibrated) beside drawing "
             f"{g['images']} images of {result['steps']} steps: {g['seconds']:.1f} s, {g['evals']} UNet evaluations"]
    for name, r in result["schedules"].items():
        lines.append(f"  {name:7s}: {r['seconds']:7.1f} s (x{r['x_generate']:.2f} the {g['images']} images), "
                     f"{r['evals']} evaluations (training {r['train_evals']} in {r['train_seconds']:.1f} s, calibration "
                     f"{r['calibration_evals']} in {r['calibration_seconds']:.1f} s); {r['iterations']} steps of "
                     f"{r['batch']}")
        for method, q in r.get("quality", {}).items():
            lines.append(f"           {method}: H_o {100 * q['h_o']:.2f}, Acc_e {100 * q['acc_e']:.2f}, Acc_s "
                         f"{100 * q['acc_s']:.2f}, Acc_g {100 * q['acc_g']:.2f}, SSIM others {q['ssim_other']:.3f} "
                         f"({r['quality_samples']} samples)")
    return lines
