"""``unguide benchmark``: erase, generate and evaluate concepts on the toy world, Table-1 style.

Protocol (toy-world analogue of METHOD.md section 5), per concept:
* prompts: the target "a photo of the {class}" (erased), its synonyms (seen in training and held out),
  and the 9 other classes; ``samples`` images each, seeds ``seed .. seed+samples-1`` for every prompt;
* the split: the other classes named in the concept's ``anchors`` (for the toy presets the 4 classes after it
  in the class order) are *anchor* classes, which the selective recipe trains on and its gate is calibrated
  on; the remaining 5 are *held out*. Acc_s and the preservation metrics are computed on the held-out classes
  for every method, so all methods are compared on prompts no recipe has seen; anchor classes get a column
  of their own (Acc_anchor);
* methods: ``base`` (the model as trained), ``lora`` (reference adapter alone, plain CFG), ``unguide``
  (reference adapter + UnGuidance as in the paper: fast scorer, binary rule, d("") gate, w_keep = 2),
  ``full`` (ESD-x style fine-tune of cross-attention k/v), ``selective`` (the selective recipe's adapter
  alone) and ``selective-unguide`` (that adapter with its calibrated gate and the weights its recipe stores);
* judge: the toy classifier's softmax over its 11 labels. Acc_e / Acc_s / Acc_g are mean probabilities of
  each image's correct class (synonym images count as the erased class), H_o their harmonic combination;
  top-1 variants alongside; preservation: same-seed SSIM and pixel error vs base on held-out-class prompts,
  FID/KID of those images vs base ones on the classifier's penultimate features.

Everything is resumable: finished erasure runs and images are reused.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from .concepts import ConceptSpec, load_preset
from .erase import EraseConfig, attach_erasure, erase, read_run
from .errors import UnguideError
from .generation import PlainGuide
from .guidance import guide_for_run
from .io import write_json
from .prompts import PromptRow
from .run_generate import plan_items, run_generation

METHODS = ("base", "lora", "unguide", "full", "selective", "selective-unguide")
# method -> (erasure recipe, layer preset, run directory name, generation mode)
METHOD_RUNS = {"lora": ("reference", "object", "object", "lora"), "unguide": ("reference", "object", "object", "unguide"),
               "full": ("reference", "full", "full", "lora"), "selective": ("selective", "object", "selective", "lora"),
               "selective-unguide": ("selective", "object", "selective", "unguide")}


@dataclass
class BenchmarkConfig:
    concepts: list[str] = field(default_factory=lambda: ["sun"])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    samples: int = 32
    steps: int = 50
    seed: int = 0
    guidance: Optional[float] = None
    erase_iterations: Optional[int] = None  # None: the recipe's (200)
    erase_lr: Optional[float] = None  # reference-recipe runs only (None: 3e-5); the selective recipe keeps its own
    batch_size: int = 32
    # selective-unguide's weights under / over the calibrated gate; None: what the selective recipe stores in its runs
    selective_keep: Optional[str] = None
    selective_erase_with: Optional[str] = None

    def __post_init__(self):
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise UnguideError(f"unknown method(s) {unknown}: choose from {', '.join(METHODS)}")
        if self.samples < 1:
            raise UnguideError("--samples must be at least 1")


def concept_prompts(spec: ConceptSpec) -> list[dict]:
    """Rows of (prompt, role, class) for one toy concept. Roles: erased, synonym, heldout (held-out synonym
    words), anchor (another class the concept's anchors name) and other (a held-out class)."""
    rows = [{"prompt": spec.target, "role": "erased", "class": spec.label}]
    rows += [{"prompt": p, "role": "synonym", "class": spec.label} for p in spec.synonym_prompts(heldout=False)]
    rows += [{"prompt": p, "role": "heldout", "class": spec.label} for p in spec.synonym_prompts(heldout=True)]
    anchors = set(spec.anchors)
    for p in spec.other:
        rows.append({"prompt": p, "role": "anchor" if p in anchors else "other", "class": p.split()[-1]})
    return rows


def _canonical_prompt_order() -> dict[str, int]:
    from .toyworld.render import OBJECTS

    prompts = [r["prompt"] for name in OBJECTS for r in concept_prompts(load_preset(name))]
    return {p: i for i, p in enumerate(dict.fromkeys(prompts))}


def _load_images(out: Path) -> tuple[list[dict], torch.Tensor]:
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines() if line.strip()]
    imgs = np.stack([np.asarray(Image.open(out / r["file"]).convert("RGB")) for r in rows])
    return rows, torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0


class Benchmark:
    def __init__(self, bundle, cfg: BenchmarkConfig, out: str | Path):
        from .toyworld.classifier import ToyClassifier

        self.bundle, self.cfg, self.out = bundle, cfg, Path(out)
        self.specs = {name: load_preset(name) for name in cfg.concepts}
        for name, spec in self.specs.items():
            if spec.label is None or spec.attribute not in (None, "object"):
                raise UnguideError(f"concept {name!r} is not a toy-world object concept: benchmark the 10 classes (or 'all')")
        self.guidance = cfg.guidance if cfg.guidance is not None else bundle.default_guidance
        self.classifier = ToyClassifier.from_pretrained()
        self.timings: dict[str, float] = {}
        self.notes: dict[str, str] = {}  # where a guide departed from its method's rule, and why

    # -- erasure runs -------------------------------------------------------------------------------------------
    def run_dir(self, concept: str, method: str) -> Path:
        return self.out / "runs" / concept / METHOD_RUNS[method][2]

    def erase_config(self, method: str) -> EraseConfig:
        recipe, preset, _, _ = METHOD_RUNS[method]
        lr = self.cfg.erase_lr if recipe == "reference" else None
        return EraseConfig.from_recipe(recipe, preset=preset, iterations=self.cfg.erase_iterations, lr=lr)

    def ensure_run(self, concept: str, method: str) -> Path:
        run = self.run_dir(concept, method)
        try:
            read_run(run)
            return run
        except UnguideError:
            pass
        t0 = time.time()
        erase(self.bundle, self.specs[concept], run, self.erase_config(method))
        self.timings[f"erase/{concept}/{run.name}"] = round(time.time() - t0, 1)
        return run

    # -- generation ---------------------------------------------------------------------------------------------
    def _generate(self, rows: list[dict], out: Path, guide, info: dict, canonical: bool = False) -> Path:
        prompt_rows = [PromptRow(r["prompt"]) for r in rows]
        size = self.bundle.image_size
        items = plan_items(prompt_rows, self.cfg.samples, self.cfg.seed, self.guidance, size, size)
        order = _canonical_prompt_order() if canonical else {}
        for it, r in zip(items, [r for r in rows for _ in range(self.cfg.samples)]):
            it.extra = {"role": r["role"], "class": r["class"]}
            # shared base images are named by the prompt's place among all concepts' prompts, so a later run
            # with other concepts (e.g. 'all' after three) reuses them instead of regenerating
            it.prompt_index = order.get(it.prompt, it.prompt_index)
        return run_generation(self.bundle, items, out, steps=self.cfg.steps, guide=guide, batch_size=self.cfg.batch_size,
                              run_info=info)

    def generate_all(self) -> None:
        base_rows = list({r["prompt"]: r for spec in self.specs.values() for r in concept_prompts(spec)}.values())
        t0 = time.time()  # base images are always needed: they are the reference of every preservation metric
        self._generate(base_rows, self.out / "images" / "base", PlainGuide(), {"method": "base"}, canonical=True)
        self.timings["generate/base"] = round(time.time() - t0, 1)
        for name, spec in self.specs.items():
            rows = concept_prompts(spec)
            for method in self.cfg.methods:
                if method == "base":
                    continue
                run = self.ensure_run(name, method)
                target = self.out / "images" / name / method
                adapter, meta = attach_erasure(self.bundle, run)
                sel = method == "selective-unguide"
                guide = guide_for_run(adapter, meta, mode=METHOD_RUNS[method][3],
                                      keep=self.cfg.selective_keep if sel else None,
                                      erase_with=self.cfg.selective_erase_with if sel else None)
                if guide.note:
                    self.notes[f"{name}/{method}"] = guide.note
                t0 = time.time()
                try:
                    self._generate(rows, target, guide, {"method": method, "run": str(run)})
                finally:
                    adapter.remove()
                self.timings[f"generate/{name}/{method}"] = round(time.time() - t0, 1)

    # -- evaluation ---------------------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        from .metrics.erasure import harmonic_overall
        from .metrics.preservation import fid_kid, pixel_error, ssim
        from .toyworld.render import OBJECTS

        base_rows, base_imgs = _load_images(self.out / "images" / "base")
        base_key = {(r["prompt"], r["seed"]): i for i, r in enumerate(base_rows)}
        base_probs = self.classifier.predict(base_imgs)["object"]
        with torch.no_grad():
            base_feats = self.classifier.embed(base_imgs)
        results: dict = {}
        for name, spec in self.specs.items():
            roles = {r["prompt"]: r for r in concept_prompts(spec)}
            results[name] = {}
            for method in self.cfg.methods:
                if method == "base":
                    idx = [i for i, r in enumerate(base_rows) if r["prompt"] in roles]
                    rows, probs, imgs = [base_rows[i] for i in idx], base_probs[idx], base_imgs[idx]
                else:
                    rows, imgs = _load_images(self.out / "images" / name / method)
                    probs = self.classifier.predict(imgs)["object"]
                labels = torch.tensor([OBJECTS.index(roles[r["prompt"]]["class"]) for r in rows])
                p_correct = probs[torch.arange(len(rows)), labels]
                top1 = (probs.argmax(-1) == labels).float()
                role = np.array([roles[r["prompt"]]["role"] for r in rows])

                def mean(values, *which):
                    mask = torch.from_numpy(np.isin(role, which))
                    return values[mask].mean().item() if mask.any() else float("nan")

                m = {"acc_e": mean(p_correct, "erased"), "acc_s": mean(p_correct, "other"),
                     "acc_anchor": mean(p_correct, "anchor"),
                     "acc_g": mean(p_correct, "synonym", "heldout"), "acc_g_heldout": mean(p_correct, "heldout"),
                     "acc_e_top1": mean(top1, "erased"), "acc_s_top1": mean(top1, "other"),
                     "acc_g_top1": mean(top1, "synonym", "heldout")}
                m["h_o"] = harmonic_overall(m["acc_e"], m["acc_s"], m["acc_g"])
                m["h_o_top1"] = harmonic_overall(m["acc_e_top1"], m["acc_s_top1"], m["acc_g_top1"])
                other = [i for i, r in enumerate(rows) if roles[r["prompt"]]["role"] == "other"]
                if method != "base" and other:
                    ref = [base_key[(rows[i]["prompt"], rows[i]["seed"])] for i in other]
                    m["ssim_other"] = ssim(imgs[other], base_imgs[ref]).mean().item()
                    m["pixel_error_other"] = pixel_error(imgs[other], base_imgs[ref]).mean().item()
                    with torch.no_grad():
                        fk = fid_kid(base_feats[ref], self.classifier.embed(imgs[other]))
                    m.update({"fid_other": fk["fid"], "kid_other": fk["kid_mean"]})
                if method.endswith("unguide"):
                    first = {r["prompt"]: r for r in reversed(rows)}
                    m["influence"] = {p: {"role": roles[p]["role"], "w": first[p]["w"], "score": first[p].get("score"),
                                          "threshold": first[p].get("threshold"), "gate": first[p].get("gate")}
                                      for p in roles}
                    m["w_per_class"] = {roles[p]["class"] if roles[p]["role"] in ("anchor", "other") else roles[p]["role"]:
                                        first[p]["w"] for p in roles}
                if f"{name}/{method}" in self.notes:
                    m["note"] = self.notes[f"{name}/{method}"]
                m["n_images"] = len(rows)
                results[name][method] = m
        averages = {}
        for method in self.cfg.methods:
            keys = sorted({k for c in results for k, v in results[c][method].items() if isinstance(v, float)})
            averages[method] = {k: float(np.nanmean([results[c][method].get(k, np.nan) for c in results])) for k in keys}
        return {"per_concept": results, "average": averages}

    def run(self) -> dict:
        t0 = time.time()
        self.generate_all()
        report = self.evaluate()
        report.update(config=asdict(self.cfg), model=self.bundle.name, guidance=self.guidance, timings=self.timings,
                      seconds=round(time.time() - t0, 1))
        write_json(self.out / "report.json", report)
        from .report import write_report

        write_report(self.out, report, self.specs)
        return report

