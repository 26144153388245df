"""``unguide benchmark``: erase, generate and evaluate concepts, Table-1 style, on any suite.

A suite (:mod:`unguide.evaluation.suites`) says which concepts are erased, which prompts measure them (with roles) and which
judge looks at the images: ``toy`` (the embedded model's 10 classes, toy classifier), ``cifar10`` (Stable
Diffusion, the 10 ``sd-*`` presets, zero-shot CLIP) or ``nudity`` (an I2P-style CSV, NudeNet, CLIP score, FID).
Per concept of an object suite:
* prompts: the target (erased), its synonyms (seen in training and held out), and the other classes; ``samples``
  images each, seeds ``seed .. seed+samples-1`` for every prompt (CSV rows: their own seed + j);
* the split: the other classes named in the concept's ``anchors`` (for the toy presets the 4 classes after it
  in the class order) are *anchor* classes, which the selective recipe trains on and its gate is calibrated
  on; the remaining ones are *held out*. Acc_s and the preservation metrics are computed on the held-out classes
  for every method, so all methods are compared on prompts no recipe has seen; anchor classes get a column
  of their own (Acc_anchor);
* methods: ``base`` (the model as trained), ``lora`` (reference adapter alone, plain CFG), ``unguide``
  (reference adapter + UnGuidance as in the paper: fast scorer, binary rule, d("") gate, w_keep = 2),
  ``full`` (ESD-x style fine-tune of cross-attention k/v), ``selective`` (the selective recipe's adapter
  alone) and ``selective-unguide`` (that adapter with its calibrated gate and the weights its recipe stores);
* metrics: :func:`unguide.evaluation.metrics.erasure.table1_metrics` on the judge's probabilities (Acc_e / Acc_s / Acc_g,
  H_o, top-1 variants); preservation: same-seed SSIM and pixel error vs base on held-out-class prompts, FID/KID of
  those images vs base ones on the judge's features. Nudity suite: NudeNet exposed counts per class, CLIP score,
  FID against a reference folder.

Everything is resumable: finished erasure runs and images are reused. Under ``accelerate launch`` the processes
share the generation (the same files as one process); erasure and evaluation run on the main process.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..erasure.adapters import denoiser_kind
from ..erasure.runs import read_run
from ..erasure.training import EraseConfig, erase
from ..errors import UnguideError
from .evaluate import class_judgements, load_folder, load_image_folder
from ..guidance.config import ERASE_WEIGHTS, KEEP_WEIGHTS, check_position
from ..guidance.decision import Decision
from ..io import output_lock, write_json
from .judges import DEFAULT_CLIP, make_judge
from ..generation.prompts import PromptRow
from ..generation.pipeline import as_pipeline
from .methods import METHODS, GuideOverrides, get_method, schedule_suffix
from .report import TOGETHER, method_folder
from .suites import SUITES, Suite, SuiteName, load_suite


@dataclass
class BenchmarkConfig:
    suite: SuiteName = "toy"
    concepts: list[str] | str = field(default_factory=lambda: ["sun"])  # or "all"
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    samples: int = 32
    steps: int = 50
    seed: int = 0
    guidance: Optional[float] = None
    erase_iterations: Optional[int] = None  # None: the recipe's (200)
    erase_lr: Optional[float] = None  # reference-recipe runs only (None: 3e-5); the selective recipe keeps its own
    batch_size: int = 32
    calibration_samples: Optional[int] = None  # base images per prompt the image gates are calibrated on (None: 8)
    # the erasure schedule of every run (None: each recipe's own); runs of a schedule other than their recipe's are
    # kept in folders of their own (runs/<concept>/<run>-<schedule>), so both can be compared in one directory
    erase_schedule: Optional[str] = None
    # selective-unguide's weights under / over the calibrated gate; None: what the selective recipe stores in its runs
    selective_keep: Optional[str] = None
    selective_erase_with: Optional[str] = None
    selective_gate_position: Optional[float] = None  # None: each run's stored threshold
    selective_image_gate: Optional[str] = None  # selective-image: "calibrated+image" (default) or "image"
    selective_image_position: Optional[float] = None  # selective-image: the image threshold's position (None: stored)
    prompts: Optional[str] = None  # nudity suite: the I2P-style CSV
    clip_model: Optional[str] = DEFAULT_CLIP  # cifar10 judge; nudity CLIP score and FID features (None: skip them)
    fid_reference: Optional[str] = None  # nudity suite: a folder of reference images (e.g. COCO) for FID
    # several concepts erased together (their single runs as one group run): the concepts benchmarked are these; each
    # erasing method is also drawn with the group ("METHOD+together"), and every method is scored on the classes no
    # member erases (the members' own classes leave the preservation figures)
    together: Optional[list[str]] = None

    def __post_init__(self):
        if self.suite not in SUITES:
            raise UnguideError(f"unknown suite {self.suite!r}: use {', '.join(SUITES)}")
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise UnguideError(f"unknown method(s) {unknown}: choose from {', '.join(METHODS)}")
        if not self.methods:
            raise UnguideError("`methods` is empty: name at least one of " + ", ".join(METHODS))
        if self.samples < 1:
            raise UnguideError("`samples` must be at least 1")
        if self.steps < 1:
            raise UnguideError("`steps` must be at least 1")
        if self.selective_keep not in (None, *KEEP_WEIGHTS):
            raise UnguideError(f"unknown keep {self.selective_keep!r}: use {' or '.join(KEEP_WEIGHTS)}")
        if self.selective_erase_with not in (None, *ERASE_WEIGHTS):
            raise UnguideError(f"unknown erase_with {self.selective_erase_with!r}: use {' or '.join(ERASE_WEIGHTS)}")
        if self.selective_gate_position is not None:
            check_position("gate_position", self.selective_gate_position)
        if self.selective_image_gate not in (None, "image", "calibrated+image"):
            raise UnguideError(f"unknown image gate {self.selective_image_gate!r}: use image or calibrated+image")
        if self.fid_reference and not Path(self.fid_reference).is_dir():
            raise UnguideError(f"`fid_reference` {self.fid_reference}: not a folder of images")
        if self.together is not None:
            if len(self.together) < 2 or len(set(self.together)) != len(self.together):
                raise UnguideError("`together` needs two or more different concepts (e.g. sun,star,boat)")
            self.concepts = list(self.together)
        if self.suite == "nudity" and self.fid_reference and not self.clip_model:
            raise UnguideError("FID needs image features: give `clip_model` (FID is computed on CLIP image features)")


    def overrides(self) -> GuideOverrides:
        return GuideOverrides(self.selective_keep, self.selective_erase_with, self.selective_gate_position,
                              self.selective_image_gate, self.selective_image_position)


def base_method(name: str) -> str:
    return name.removesuffix(TOGETHER)


class Benchmark:
    def __init__(self, model, cfg: BenchmarkConfig, out: str | Path, suite: Optional[Suite] = None):
        """``model``: an :class:`UnGuidePipeline` (or a loaded bundle, wrapped in one): every image is drawn through it."""
        self.pipe = as_pipeline(model)
        self.bundle, self.cfg, self.out = self.pipe.bundle, cfg, Path(out)
        self.suite = suite or load_suite(cfg.suite, cfg.concepts, bundle=self.bundle, prompts=cfg.prompts)
        self.specs = {name: case.spec for name, case in self.suite.cases.items()}
        self.guidance = cfg.guidance if cfg.guidance is not None else self.bundle.default_guidance
        self.timings: dict[str, float] = {}
        self.notes: dict[str, str] = {}  # where a guide departed from its method's rule, and why
        self.group = list(self.suite.cases) if cfg.together else None  # the suite's names (cat -> sd-cat)
        self.group_classes = {self.suite.cases[n].spec.label for n in self.group} if self.group else set()

    @property
    def methods(self) -> list[str]:
        """The methods scored: each configured one, and with a group each erasing one drawn with the group too."""
        extra = [m + TOGETHER for m in self.cfg.methods if self.group and get_method(m).erases]
        return list(self.cfg.methods) + extra

    def group_dir(self, method: str) -> Path:
        folder = get_method(method).run_dir + schedule_suffix(method, self.cfg.erase_schedule)
        return self.out / "runs" / ("together-" + "+".join(self.group)) / folder


    # -- erasure runs -------------------------------------------------------------------------------------------
    def run_dir(self, concept: str, method: str) -> Path:
        return self.out / "runs" / concept / (get_method(method).run_dir + schedule_suffix(method,
                                                                                         self.cfg.erase_schedule))

    def erase_config(self, method: str, concept: str) -> EraseConfig:
        """The run's settings for this model's kind of denoiser; its image gate is never calibrated on drawings of
        more steps than the benchmark draws with (the recipe's own calibration steps otherwise)."""
        cfg = get_method(method).erase_config(self.specs[concept], self.cfg.erase_iterations, self.cfg.erase_lr,
                                              calibration_samples=self.cfg.calibration_samples,
                                              schedule=self.cfg.erase_schedule, denoiser=denoiser_kind(self.bundle.unet))
        return replace(cfg, calibration_steps=min(cfg.calibration_steps, self.cfg.steps))

    def ensure_run(self, concept: str, method: str) -> Path:
        """The erasure run of a method, trained by the main process if it is missing (the others wait for it)."""
        from accelerate import PartialState

        state, run = PartialState(), self.run_dir(concept, method)
        if state.is_main_process:
            try:
                read_run(run)
            except UnguideError:
                t0 = time.time()
                erase(self.bundle, self.specs[concept], run, self.erase_config(method, concept))
                self.timings[f"erase/{concept}/{run.name}"] = round(time.time() - t0, 1)
        state.wait_for_everyone()
        return run

    # -- generation ---------------------------------------------------------------------------------------------
    def _generate(self, rows: list[dict], out: Path, guide, info: dict, canonical: bool = False) -> Path:
        info = {**info, "guide": guide.settings()}  # a folder drawn under other settings is refused, not reused
        prompt_rows = [PromptRow(r["prompt"], seed=r.get("seed"), guidance=r.get("guidance"), width=r.get("width"),
                                 height=r.get("height")) for r in rows]
        items = self.pipe.plan(prompt_rows, self.cfg.samples, self.cfg.seed, self.guidance,
                               num_inference_steps=self.cfg.steps)
        order = self.suite.canonical_order() if canonical else {}
        for it, r in zip(items, [r for r in rows for _ in range(self.cfg.samples)]):
            it.extra = {"role": r["role"], "class": r["class"]}
            # shared base images are named by the prompt's place among all concepts' prompts, so a later run
            # with other concepts (e.g. 'all' after three) reuses them instead of regenerating
            it.prompt_index = order.get(it.prompt, it.prompt_index)
        return self.pipe.generate_to(items, out, num_inference_steps=self.cfg.steps, guide=guide,
                                     batch_size=self.cfg.batch_size, run_info=info)

    def generate_all(self) -> None:
        base_rows = list({r["prompt"]: r for case in self.suite.cases.values() for r in case.rows}.values())
        t0 = time.time()  # base images are always needed: they are the reference of every preservation metric
        self.pipe.unload_erasure()
        self._generate(base_rows, self.out / "images" / "base", self.pipe.guide(), {"method": "base"}, canonical=True)
        self.timings["generate/base"] = round(time.time() - t0, 1)
        for name, case in self.suite.cases.items():
            for method in self.cfg.methods:
                if not get_method(method).erases:
                    continue
                run = self.ensure_run(name, method)
                target = method_folder(self.out, name, method, schedule=self.cfg.erase_schedule)
                self.pipe.load_erasure(run)
                guide = self.pipe.guide(get_method(method).guidance_config(self.cfg.overrides()))
                if guide.note:
                    self.notes[f"{name}/{method}"] = guide.note
                t0 = time.time()
                try:
                    self._generate(case.rows, target, guide, {"method": method, "run": str(run)})
                finally:
                    self.pipe.unload_erasure()
                self.timings[f"generate/{name}/{method}"] = round(time.time() - t0, 1)
        if self.group:
            self._generate_group()

    def ensure_group(self, method: str) -> Path:
        """The group run of a method: its members' single runs (trained if missing) joined as one run."""
        from accelerate import PartialState

        from ..erasure.groups import write_group

        members = {n: self.ensure_run(n, method) for n in self.group}
        if PartialState().is_main_process:
            write_group(self.group_dir(method), members, self.bundle)
        PartialState().wait_for_everyone()
        return self.group_dir(method)

    def _generate_group(self) -> None:
        """Each erasing method's members' runs as one group run, drawing the union of the members' prompts once."""
        rows = list({r["prompt"]: r for n in self.group for r in self.suite.cases[n].rows}.values())
        for method in self.cfg.methods:
            if not get_method(method).erases:
                continue
            self.pipe.load_erasure(self.ensure_group(method))
            guide = self.pipe.guide(get_method(method).guidance_config(self.cfg.overrides()))
            t0 = time.time()
            try:
                folder = method_folder(self.out, "", method + TOGETHER, self.group, self.cfg.erase_schedule)
                self._generate(rows, folder, guide, {"method": method + TOGETHER, "run": str(self.group_dir(method))})
            finally:
                self.pipe.unload_erasure()
            self.timings[f"generate/together/{method}"] = round(time.time() - t0, 1)

    # -- evaluation ---------------------------------------------------------------------------------------------
    def _images(self, name: str, method: str) -> tuple[list[dict], torch.Tensor, Path]:
        folder = method_folder(self.out, name, method, self.group, self.cfg.erase_schedule)
        rows, imgs = self._load(folder)
        if method == "base" or method.endswith(TOGETHER):  # shared folders hold several concepts' prompts: keep this concept's
            wanted = {r["prompt"] for r in self.suite.cases[name].rows}
            idx = [i for i, r in enumerate(rows) if r["prompt"] in wanted]
            rows, imgs = [rows[i] for i in idx], imgs[idx]
        return rows, imgs, folder

    def _load(self, folder: Path) -> tuple[list[dict], torch.Tensor]:
        """A folder's images, the first ``samples`` per prompt: a folder may hold more from an earlier, larger run."""
        rows, imgs = load_folder(folder)
        idx = [i for i, r in enumerate(rows) if r.get("sample_index", 0) < self.cfg.samples]
        return ([rows[i] for i in idx], imgs[idx]) if len(idx) < len(rows) else (rows, imgs)

    def evaluate(self) -> dict:
        judge = make_judge(self.suite.judge, clip_model=self.cfg.clip_model or DEFAULT_CLIP, device=self.bundle.device)
        if self.suite.metrics == "nudity":
            results = {name: {m: self._nudity_metrics(judge, name, m) for m in self.methods}
                       for name in self.suite.cases}
        else:
            results = self._table1_results(judge)
        averages = {}
        for method in self.methods:
            keys = sorted({k for c in results for k, v in results[c][method].items() if isinstance(v, float)})
            averages[method] = {k: float(np.nanmean([results[c][method].get(k, np.nan) for c in results])) for k in keys}
        return {"per_concept": results, "average": averages}

    def _table1_results(self, judge) -> dict:
        from .metrics.erasure import table1_metrics
        from .metrics.preservation import fid_kid, pixel_error, ssim

        base_rows, base_imgs = self._load(self.out / "images" / "base")
        base_key = {(r["prompt"], r["seed"]): i for i, r in enumerate(base_rows)}
        base_feats = judge.features(base_imgs)
        base_judged: dict = {}  # per class set: a fixed-label judge (toy) scores the base images once
        results: dict = {}
        for name, case in self.suite.cases.items():
            roles = {r["prompt"]: r for r in case.rows}
            results[name] = {}
            key = (tuple(judge.label_set(case.classes)), repr(sorted(case.aliases.items())))
            for method in self.methods:
                if method == "base":
                    if key not in base_judged:
                        base_judged[key] = class_judgements(judge, base_imgs, case.classes, case.aliases,
                                                            [r.get("class") for r in base_rows])
                    idx = [i for i, r in enumerate(base_rows) if r["prompt"] in roles]
                    rows = [base_rows[i] for i in idx]
                    judged = {k: base_judged[key][k][idx] for k in ("p_correct", "top1")}
                    imgs = base_imgs[idx]
                else:
                    rows, imgs, _ = self._images(name, method)
                    judged = class_judgements(judge, imgs, case.classes, case.aliases,
                                              [roles[r["prompt"]]["class"] for r in rows])
                if self.group:  # the group's own classes are erased by it: they leave the preservation figures
                    keep = [i for i, r in enumerate(rows) if not self._members_class(roles[r["prompt"]])]
                    rows, imgs = [rows[i] for i in keep], imgs[keep]
                    judged = {k: judged[k][keep] for k in ("p_correct", "top1")}
                role = [roles[r["prompt"]]["role"] for r in rows]
                m = table1_metrics(judged["p_correct"], judged["top1"], role)
                other = [i for i, r in enumerate(rows) if roles[r["prompt"]]["role"] == "other"]
                if method != "base" and other:
                    ref = [base_key[(rows[i]["prompt"], rows[i]["seed"])] for i in other]
                    m["ssim_other"] = ssim(imgs[other], base_imgs[ref]).mean().item()
                    m["pixel_error_other"] = pixel_error(imgs[other], base_imgs[ref]).mean().item()
                    feats = judge.features(imgs[other])
                    if feats is not None and base_feats is not None and len(other) >= 2:
                        fk = fid_kid(base_feats[ref], feats)
                        m.update({"fid_other": fk["fid"], "kid_other": fk["kid_mean"]})
                if get_method(base_method(method)).scores_prompts:
                    m.update(self._influence(rows, roles))
                if get_method(base_method(method)).image_gated:
                    for r_name in ("erased", "synonym", "heldout", "other", "anchor"):
                        flags = [Decision.from_record(r).redrawn for r in rows if roles[r["prompt"]]["role"] == r_name]
                        if flags:
                            m[f"image_flagged_{r_name}"] = float(np.mean(flags))
                if f"{name}/{method}" in self.notes:
                    m["note"] = self.notes[f"{name}/{method}"]
                m["n_images"] = len(rows)
                results[name][method] = m
        return results

    def _members_class(self, role: dict) -> bool:
        """A prompt of another group member's class (it is erased by the group, not kept)."""
        return role["role"] in ("other", "anchor") and role["class"] in self.group_classes

    @staticmethod
    def _influence(rows: list[dict], roles: dict) -> dict:
        """What the guide decided per prompt (w, score, threshold), for the report's influence plots."""
        first = {r["prompt"]: Decision.from_record(r) for r in reversed(rows)}
        return {"influence": {p: {"role": roles[p]["role"], "w": first[p].w, "score": first[p].score,
                                  "threshold": first[p].threshold, "gate": first[p].gate}
                              for p in roles if p in first},
                "w_per_class": {roles[p]["class"] if roles[p]["role"] in ("anchor", "other") else roles[p]["role"]:
                                first[p].w for p in roles if p in first}}

    def _nudity_metrics(self, judge, name: str, method: str) -> dict:
        from .metrics.nudity import EXPOSED_CLASSES, summarise

        rows, imgs, folder = self._images(name, method)
        summary = summarise(judge.detections([folder / r["file"] for r in rows]))
        m: dict = {f"exposed_{c.lower()}": float(summary["per_class"][c]) for c in EXPOSED_CLASSES}
        m.update(exposed_total=float(summary["total"]), images_with_exposed=float(summary["images_with_exposed"]),
                 n_images=len(rows))
        if self.cfg.clip_model:
            clip = self._clip()
            m["clip_score"] = clip.clip_score(imgs, [r["prompt"] for r in rows]).mean().item()
            if self.cfg.fid_reference:
                from .metrics.preservation import fid_kid

                fk = fid_kid(self._reference_features(clip), clip.features(imgs))
                m.update(fid=fk["fid"], kid=fk["kid_mean"])
        if method.endswith("unguide"):
            first = {r["prompt"]: r for r in reversed(rows)}
            m["to_adapter"] = float(sum(1 for r in first.values() if Decision.from_record(r).w < 1))
        return m

    def _together_summary(self) -> dict:
        """The group, the classes left when its own are taken out, and which of them some member's anchors saw."""
        anchored = sorted({r["class"] for n in self.group for r in self.suite.cases[n].rows
                           if r["role"] == "anchor" and r["class"] not in self.group_classes})
        remaining = sorted({r["class"] for n in self.group for r in self.suite.cases[n].rows
                            if r["role"] in ("other", "anchor") and r["class"] not in self.group_classes})
        return {"concepts": self.group, "remaining_classes": remaining, "anchored_by_the_group": anchored,
                "held_out_from_every_member": [c for c in remaining if c not in anchored],
                "note": "per concept, Acc_s is on its held-out classes and Acc_anchor on its anchor classes, "
                        "both without the group's own classes"}

    def _clip(self):
        if not hasattr(self, "_clip_judge"):
            self._clip_judge = make_judge("clip", clip_model=self.cfg.clip_model, device=self.bundle.device)
        return self._clip_judge

    def _reference_features(self, clip) -> torch.Tensor:
        if not hasattr(self, "_ref_feats"):
            imgs = load_image_folder(self.cfg.fid_reference, self.bundle.image_size, "`fid_reference` (FID)", minimum=2)
            self._ref_feats = clip.features(imgs)
        return self._ref_feats

    def run(self) -> dict:
        from accelerate import PartialState

        from .report import write_report

        t0 = time.time()
        with output_lock(self.out, "a benchmark"):
            self.generate_all()
            if not PartialState().is_main_process:
                return {}
            report = self.evaluate()
            if self.group:
                report["together"] = self._together_summary()
            report.update(suite=self.suite.name, description=self.suite.description, config=asdict(self.cfg),
                          model=self.bundle.name, guidance=self.guidance, timings=self.timings,
                          seconds=round(time.time() - t0, 1))
            write_json(self.out / "report.json", report)
            write_report(self.out, report, self.suite)
        return report
