"""What ``unguide serve`` computes, without the page: prompts in, the same seeds drawn three ways out.

A :class:`Studio` holds one :class:`~unguide.generation.pipeline.UnGuidePipeline` and a :class:`RunCatalog`. For a
request it draws every prompt with the base model, with the run's adapter alone (w = 0) and with UnGuidance (the run's
gate deciding per prompt or per image), each through ``pipe.generate_to`` into a request folder (PNGs with their
settings, ``index.jsonl``), so what the page shows is what a download holds and what ``unguide generate`` would write.
Requests are checked against :class:`ServeLimits` before anything is drawn; one request draws at a time (the UNet
carries the attached adapter).
"""
from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .catalog import RunCatalog, RunEntry
from ..erasure.adapters import denoiser_kind
from ..erasure.concepts import concept_from_dict, load_preset, preset_names
from ..errors import UnguideError, check_number
from ..erasure.runs import load_run
from ..guidance.config import GATE_CHOICES, GuidanceConfig
from ..guidance.decision import Decision
from ..sampling.ddim import sampler_name
from ..io import atomic_path, write_json

VIEWS = (("base", "base model", GuidanceConfig(mode="base")),
         ("adapter", "adapter alone (w = 0)", GuidanceConfig(mode="lora")),
         ("unguidance", "UnGuidance", None))  # None: the run's own gate, or the request's


@dataclass(frozen=True)
class ServeLimits:
    """Bounds on one request and on the queue, so that no client can hold the model for long or fill the memory."""

    max_prompts: int = 8
    max_images_per_prompt: int = 4
    max_images: int = 16  # prompts x images per prompt, per view
    max_prompt_chars: int = 300
    min_steps: int = 5
    max_steps: int = 100
    queue_size: int = 64  # requests waiting; more are turned away with a message
    concurrency: int = 1  # requests drawing at once (one model, one attached adapter)
    keep_requests: int = 50  # request folders kept for download; older ones are removed


@dataclass
class PromptResult:
    prompt: str
    seeds: list[int]
    images: dict[str, list[Path]]  # view -> one PNG per seed
    w: list  # UnGuidance's weight per image
    scores: list[dict]  # UnGuidance's gate scores per image


@dataclass
class Comparison:
    request: str
    folder: Path
    run: str
    concept: str
    settings: dict
    rows: list[PromptResult] = field(default_factory=list)
    seconds: float = 0.0


def parse_prompts(text: Optional[str], limits: ServeLimits) -> list[str]:
    """One prompt a line; blank lines ignored; one clear error for each way a request can be too big or empty."""
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not prompts:
        raise UnguideError("no prompt: type one prompt a line")
    if len(prompts) > limits.max_prompts:
        raise UnguideError(f"{len(prompts)} prompts: at most {limits.max_prompts} per request")
    for i, p in enumerate(prompts, 1):
        if len(p) > limits.max_prompt_chars:
            raise UnguideError(f"prompt {i} is {len(p)} characters long: keep each prompt within "
                               f"{limits.max_prompt_chars}")
    return prompts


def check_numbers(n, seed, steps, limits: ServeLimits, prompts: int) -> tuple[int, int, int]:
    n, seed, steps = (check_number(name, value, integer=True)  # the page may send 2.0 or "2"
                      for name, value in (("images per prompt", n), ("seed", seed), ("steps", steps)))
    if not 1 <= n <= limits.max_images_per_prompt:
        raise UnguideError(f"images per prompt must be 1 to {limits.max_images_per_prompt}, not {n}")
    if prompts * n > limits.max_images:
        raise UnguideError(f"{prompts} prompts x {n} images = {prompts * n} images: at most {limits.max_images} per "
                           "request (fewer prompts or fewer images per prompt)")
    if not 0 <= seed < 2**31:
        raise UnguideError(f"seed must be 0 to {2**31 - 1}, not {seed}")
    if not limits.min_steps <= steps <= limits.max_steps:
        raise UnguideError(f"steps must be {limits.min_steps} to {limits.max_steps}, not {steps}")
    return n, seed, steps


class Studio:
    """One model, the runs it may attach, and a folder of finished requests."""

    def __init__(self, pipe, runs: RunCatalog, out: str | Path, limits: ServeLimits = ServeLimits(),
                 model_name: str = "toyworld"):
        self.pipe, self.catalog, self.limits, self.model_name = pipe, runs, limits, model_name
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # the page queues one request at a time; Python callers get the same

    # ------------------------------------------------------------------------------------------------------ runs
    def run_names(self) -> list[str]:
        return self.catalog.refresh()

    def describe(self, name: str) -> dict:
        """What the page says about a run: its concept, recipe and stored gate."""
        entry = self.catalog.get(name)
        run = load_run(entry.path)
        first = next(iter(run.members.values()))
        return {"name": entry.name, "concept": entry.concept, "recipe": entry.recipe, "model": entry.model,
                "gate": "each concept's own" if run.is_group else first.defaults.gate,
                "threshold": None if run.is_group else first.calibration.prompt.get("threshold"),
                "image_threshold": None if run.is_group else (first.calibration.image or {}).get("threshold"),
                "members": sorted(run.members) if run.is_group else []}

    def neighbour_prompts(self, name: str) -> list[tuple[str, str]]:
        """(kind, prompt) for the run's concept: its target, synonyms (trained and never-trained), then neighbours
        it must keep (its anchors and listed unrelated prompts), within one request's image bound."""
        specs = [concept_from_dict(m.concept, "the run's erasure.json")
                 for m in load_run(self.catalog.get(name).path).members.values()]
        rows: list[tuple[str, str]] = []
        for spec in specs:
            rows += [("target", spec.target)]
            rows += [("synonym", p) for p in spec.synonym_prompts(heldout=False)[:2]]
            rows += [("unseen synonym", p) for p in spec.synonym_prompts(heldout=True)[:2]]
        for spec in specs:
            rows += [("neighbour", p) for p in (spec.anchors + spec.other) if p.strip()][:3]
        seen, unique = set(), []
        for kind, prompt in rows:
            if prompt not in seen:
                seen.add(prompt)
                unique.append((kind, prompt))
        return unique[:min(self.limits.max_prompts, self.limits.max_images)]

    def presets(self) -> list[str]:
        """Concept presets written for the loaded model's family (toy classes for toyworld, sd-* for SD)."""
        world = "toyworld" if self.pipe.config.name == "toyworld" else "sd"
        names = []
        for name in preset_names():
            spec = load_preset(name)
            if spec.model in (None, world):
                names.append(name)
        return names

    def erase(self, preset: str, recipe: str = "selective", iterations: int = 200, progress: bool = False,
              **settings) -> str:
        """Train a run for a preset into ``runs/<preset>/<recipe>`` (resumed if it was interrupted); returns its name.
        ``settings`` go to :class:`~unguide.erasure.training.EraseConfig` (the page sends none)."""
        from ..erasure.training import RECIPES, EraseConfig, erase

        if preset not in self.presets():
            raise UnguideError(f"unknown preset {str(preset)[:40]!r}: choose one of {', '.join(self.presets())}")
        if recipe not in RECIPES:
            raise UnguideError(f"unknown recipe {str(recipe)[:40]!r}: use {' or '.join(RECIPES)}")
        iterations = check_number("iterations", iterations, integer=True)
        if not 1 <= iterations <= 2000:
            raise UnguideError(f"iterations must be 1 to 2000, not {iterations}")
        name = f"{preset}/{recipe}" + ("" if iterations == 200 else f"-{iterations}")
        spec = load_preset(preset)
        with self._lock:
            self.pipe.unload_erasure()
            erase(self.pipe.bundle, spec, self.catalog.new_run_path(name),
                  EraseConfig.for_concept(recipe, spec, denoiser_kind(self.pipe.bundle.unet), iterations=iterations,
                                          **settings), progress=progress)
        self.catalog.refresh()
        return name

    # -------------------------------------------------------------------------------------------------- drawing
    def compare(self, run: str, prompts: str | list[str], n: int = 1, seed: int = 0, steps: int = 50,
                gate: Optional[str] = None, progress: bool = False) -> Comparison:
        """Every prompt drawn by the base model, the adapter alone and UnGuidance, for the same seeds."""
        texts = parse_prompts("\n".join(prompts) if isinstance(prompts, list) else prompts, self.limits)
        n, seed, steps = check_numbers(n, seed, steps, self.limits, len(texts))
        if gate not in (None, "", "run's own") and gate not in GATE_CHOICES:
            raise UnguideError(f"unknown gate {str(gate)[:40]!r}: use the run's own or one of {', '.join(GATE_CHOICES)}")
        unguidance = GuidanceConfig(gate=gate) if gate in GATE_CHOICES else None
        entry = self.catalog.get(run)
        request = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        folder = self.out / "requests" / request
        items = self.pipe.plan(texts, n, seed, num_inference_steps=steps)
        t0 = time.time()
        with self._lock:
            self._attach(entry)
            for view, label, config in VIEWS:
                guide = self.pipe.guide(config if config is not None else unguidance)
                self.pipe.generate_to(items, folder / view, num_inference_steps=steps, guide=guide,
                                      run_info={"view": label, "erasure": self.pipe.erasure_info(guide)},
                                      progress=progress)
        settings = {"model": self.model_name, "run": entry.name, "concept": entry.concept, "recipe": entry.recipe,
                    "gate": gate or "run's own", "prompts": texts, "images_per_prompt": n, "seed": seed,
                    "steps": steps, "guidance_scale": self.pipe.config.default_guidance,
                    "sampler": sampler_name(self.pipe.bundle),
                    "views": {view: label for view, label, _ in VIEWS}, "request": request}
        write_json(folder / "settings.json", settings)
        comparison = Comparison(request, folder, entry.name, entry.concept, settings, seconds=time.time() - t0)
        comparison.rows = _read_rows(folder, texts)
        self._forget_old_requests()
        return comparison

    def archive(self, comparison: Comparison) -> Path:
        """A zip of the request folder (images with their metadata, index.jsonl, settings.json), written atomically."""
        target = comparison.folder.parent / f"unguide-{comparison.request}.zip"
        if not target.exists():
            with atomic_path(target) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
                for path in sorted(comparison.folder.rglob("*")):
                    if path.is_file() and not path.name.startswith("."):
                        zf.write(path, Path(comparison.request) / path.relative_to(comparison.folder))
        return target

    def _attach(self, entry: RunEntry) -> None:
        if self.pipe.erasure_dir != str(entry.path):
            self.pipe.load_erasure(entry.path)

    def _forget_old_requests(self) -> None:
        folders = sorted((p for p in (self.out / "requests").iterdir() if p.is_dir()), key=lambda p: p.name)
        for old in folders[:-self.limits.keep_requests]:
            shutil.rmtree(old, ignore_errors=True)
            (old.parent / f"unguide-{old.name}.zip").unlink(missing_ok=True)


def _read_rows(folder: Path, prompts: list[str]) -> list[PromptResult]:
    by_view = {view: [json.loads(line) for line in (folder / view / "index.jsonl").read_text().splitlines()]
               for view, _, _ in VIEWS}
    rows = []
    for i, prompt in enumerate(prompts):
        mine = {view: sorted((r for r in recs if r["prompt_index"] == i), key=lambda r: r["sample_index"])
                for view, recs in by_view.items()}
        guided = mine["unguidance"]
        rows.append(PromptResult(
            prompt=prompt, seeds=[r["seed"] for r in guided],
            images={view: [folder / view / r["file"] for r in recs] for view, recs in mine.items()},
            w=[r.get("w") for r in guided],
            scores=[{**Decision.from_record(r).scores(), **{k: r[k] for k in ("gate", "note") if k in r}}
                    for r in guided]))
    return rows
