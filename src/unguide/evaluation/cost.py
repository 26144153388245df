"""``unguide benchmark-scorer``: decisions and cost of the fast scorer against the reference scorer,
and the wall-clock ratio of UnGuide generation to plain generation, measured side by side in one run.

Cost is counted in UNet image-evaluations (rows of a batch through the denoiser) per generated image, when
every prompt gets one image (the I2P case), decision included.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

from ..sampling.images import Item, PlainGuide, sample_images
from ..guidance.config import GuidanceConfig, ScorerConfig
from ..guidance.unguidance import UnGuide
from ..sampling.ddim import EvalCounter


def timed_generation(bundle, items, guide, steps, batch_size):
    """(seconds, UNet image-evaluations, decisions) of drawing ``items`` with ``guide``."""
    counter = EvalCounter(bundle.unet)
    t0 = time.perf_counter()
    try:
        _, infos = sample_images(bundle, items, steps=steps, guide=guide, batch_size=batch_size, progress=False)
    finally:
        counter.close()
    return time.perf_counter() - t0, counter.count, infos


def scorer_benchmark(bundle, adapter, prompts: Sequence[str], guidance: float, steps: int = 50, batch_size: int = 32,
                     reference_draws: int = 30, seed: int = 0, timing_prompts: Optional[int] = 32) -> dict:
    """Agreement of fast vs reference decisions, evaluations per image for each, and timing ratios."""
    result: dict = {"prompts": len(prompts), "steps": steps, "guidance": guidance}
    decisions = {}
    for name, cfg in (("reference", ScorerConfig.reference(draws=reference_draws)), ("fast", ScorerConfig())):
        guide = UnGuide(adapter, scorer=cfg)
        counter = EvalCounter(bundle.unet)
        t0 = time.perf_counter()
        infos = guide.decide(bundle, list(prompts), guidance)
        seconds = time.perf_counter() - t0
        counter.close()
        decisions[name] = infos
        result[name] = {"decision_evals_total": counter.count, "decision_evals_per_prompt": counter.count / len(prompts),
                        "decision_seconds": seconds, "config": cfg.__dict__,
                        "evals_per_image_one_image_per_prompt": counter.count / len(prompts) + 4 * steps,
                        "erase_decisions": sum(d.w < 1 for d in infos)}
    agree = [a.w == b.w for a, b in zip(decisions["reference"], decisions["fast"])]
    result["agreement"] = sum(agree) / len(agree)
    result["disagreements"] = [{"prompt": p, "reference": r.record(), "fast": f.record()} for p, r, f, ok in
                               zip(prompts, decisions["reference"], decisions["fast"], agree) if not ok]
    result["decisions"] = [{"prompt": p, "w_reference": r.w, "w_fast": f.w, "score_reference": r.score,
                            "score_fast": f.score} for p, r, f in zip(prompts, decisions["reference"], decisions["fast"])]
    result["empty_scores"] = {"reference": decisions["reference"][0].score_empty, "fast": decisions["fast"][0].score_empty}
    if timing_prompts:
        # side by side, one image per prompt: plain base CFG, then UnGuide with a fresh fast scorer (decision included)
        size = bundle.image_size
        items = [Item(p, seed, guidance, size, size, prompt_index=i) for i, p in enumerate(prompts[:timing_prompts])]
        t_base, n_base, _ = timed_generation(bundle, items, PlainGuide(), steps, batch_size)
        t_ug, n_ug, _ = timed_generation(bundle, items, UnGuide(adapter), steps, batch_size)
        t_ref, n_ref, _ = timed_generation(bundle, items, UnGuide(adapter, scorer=ScorerConfig.reference(draws=reference_draws)),
                                 steps, batch_size)
        result["timing"] = {"images": len(items), "base_seconds": t_base, "unguide_fast_seconds": t_ug,
                            "unguide_reference_seconds": t_ref, "ratio_fast_to_base": t_ug / t_base,
                            "ratio_reference_to_base": t_ref / t_base, "evals_per_image_base": n_base / len(items),
                            "evals_per_image_unguide_fast": n_ug / len(items),
                            "evals_per_image_unguide_reference": n_ref / len(items)}
    return result


def run_gate_cost(bundle, adapter, meta, prompts: Sequence[str], guidance: float, steps: int = 50,
                  batch_size: int = 32, seed: int = 0, gate: Optional[str] = None) -> dict:
    """The run's own gate (its recipe's defaults) on prompts it keeps, one image each, side by side with plain
    generation: UNet evaluations per image (decision included), wall clock, and same-seed SSIM to the base image."""
    from .metrics.preservation import ssim

    guide = meta.guide(adapter, GuidanceConfig(gate=gate))
    decisions = guide.decide(bundle, list(prompts), guidance)
    kept = [p for p, d in zip(prompts, decisions) if d.w == guide.rule.w_keep]
    result = {"gate": guide.settings()["gate"], "keep_w": guide.rule.w_keep, "prompts": len(prompts), "kept": len(kept),
              "sent_to_adapter": [p for p, d in zip(prompts, decisions) if d.w != guide.rule.w_keep]}
    if not kept:
        return result
    size = bundle.image_size
    items = [Item(p, seed, guidance, size, size, prompt_index=i) for i, p in enumerate(kept)]
    with adapter.base():
        t_base, n_base, _ = timed_generation(bundle, items, PlainGuide(), steps, batch_size)
        base_imgs, _ = sample_images(bundle, items, steps=steps, guide=PlainGuide(), batch_size=batch_size, progress=False)
    fresh = meta.guide(adapter, GuidanceConfig(gate=gate))  # nothing cached but what the run stores
    t_gate, n_gate, _ = timed_generation(bundle, items, fresh, steps, batch_size)
    gated_imgs, _ = sample_images(bundle, items, steps=steps, guide=fresh, batch_size=batch_size, progress=False)
    result.update(evals_per_image_base=n_base / len(items), evals_per_image_gated=n_gate / len(items),
                  base_seconds=t_base, gated_seconds=t_gate, ratio_gated_to_base=t_gate / t_base,
                  ssim_to_base_min=float(ssim(gated_imgs, base_imgs).min()),
                  identical_to_base=int(sum(bool((a == b).all()) for a, b in zip(gated_imgs, base_imgs))))
    return result


def gate_cost_by_group(bundle, adapter, meta, groups: dict, guidance: float, gate: Optional[str] = None,
                       steps: int = 50, batch_size: int = 32, seed: int = 0) -> dict:
    """UNet evaluations per image, decision and image gate included, for each named group of prompts (one image per
    prompt, a fresh guide per group so nothing is cached but what the run stores), beside plain generation; how many
    images the gates sent to the erasure."""
    result = {}
    size = bundle.image_size
    for name, prompts in groups.items():
        if not prompts:
            continue
        items = [Item(p, seed, guidance, size, size, prompt_index=i) for i, p in enumerate(prompts)]
        guide = meta.guide(adapter, GuidanceConfig(gate=gate))
        with adapter.base():
            t_base, n_base, _ = timed_generation(bundle, items, PlainGuide(), steps, batch_size)
        t_gate, n_gate, infos = timed_generation(bundle, items, guide, steps, batch_size)
        result[name] = {"prompts": len(prompts), "evals_per_image_base": n_base / len(items),
                        "evals_per_image_gated": n_gate / len(items), "ratio_gated_to_base": t_gate / t_base,
                        "erased": sum(1 for d in infos if d.w != guide.rule.w_keep or d.redrawn),
                        "image_flagged": sum(1 for d in infos if d.redrawn),
                        "suspects": sum(1 for d in infos if d.suspects),
                        "substituted": sum(1 for d in infos if d.substituted)}
    first = next(iter(meta.members.values())).guide(adapter, GuidanceConfig(gate=gate))
    result["gate"] = first.gate.kind + ("+image" if guide.image_gates else "")
    if meta.is_group:
        result["gate"] += f" x {len(meta.members)} concepts"
    return result
