"""Choose how the prompt gate and the image gate combine, on fresh words (scripts/fresh_words.tsv), never on
benchmark prompts.

For every erasure run under RUNS (one per toy concept, e.g. a benchmark's runs/), the base model draws each fresh
word 8 times (seeds 0-7) and the toy classifier judges each image; every run then scores the words with its prompt
gate (fast scorer) and the images with its image gate's detector. From those scores, each rule's decision per image
follows without drawing again:

* ``image q``: flagged when the detector's score is under the image gate's threshold at position q (0.8 today);
* ``cap a``: position 0.8, but never past the a-quantile of the anchors' calibration scores (a bound on the
  false alarms where the concept's calibration images overlap the anchors', e.g. a concept the base model draws badly);
* ``below b``: position 0.8, but never above the score b (at 0 an image is flagged only when one of the concept's
  prompts explains it better than every anchor does);
* ``suspect-below p/q/b``: ``suspect p/q`` with the usual threshold capped at b, as in ``below b``;
* ``suspect-at p/q/u``: ``suspect p/q`` with the usual threshold at position u instead of 0.8;
* ``front p``: the prompt gate at position p in front (``calibrated+image`` today): over it -> erased, else the image
  gate judges;
* ``suspect p/q``: the prompt gate at position p marks a prompt *suspect*; a suspect prompt's image is flagged under
  a more lenient image threshold (position q > 0.8, towards and past the anchors' calibration images), others
  under the usual one: the prompt's words raise the image gate's suspicion, never erase on their own.

Per run: recall = the run's own words' images judged its concept that the rule erases or flags; false positives =
the other words' images (judged any other class) it erases or flags. The criterion, as in the thirteenth session:
mean over runs of the harmonic mean of recall and 1 - false positives.

    .venv/bin/python scripts/gate_fresh.py work/bench35/runs work/s43
    .venv/bin/python scripts/gate_fresh.py work/flow46/runs work/g46 toyworld-flow   # the flow model's runs
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from unguide.erasure.runs import read_run
from unguide.evaluation.judges import make_judge
from unguide.generation.pipeline import UnGuidePipeline
from unguide.guidance.config import ScorerConfig
from unguide.guidance.image_gate import ImageGate, calibration_scores, image_threshold
from unguide.guidance.prompt_gate import gate_threshold, influence_scores
from unguide.sampling.images import Item, sample_latents_batched
from unguide.toyworld.plugin import ALIASES, OBJECTS

SEEDS = range(8)


def fresh_words(path: Path) -> list[tuple[str, str]]:
    rows = [ln.split("\t") for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return [(f"a photo of the {w.strip()}", c.strip()) for w, c in rows]


def base_images(pipe, words, out: Path):
    """Base latents of every fresh word and the class the judge sees in each (cached in ``out``)."""
    path = out / "fresh_base.safetensors"
    labels = make_judge("toy").label_set(list(OBJECTS))  # the toy classifier's own columns (its "nothing" among them)
    if path.is_file():
        t = load_file(path)
        return t["latents"], [labels[i] for i in t["predicted"].tolist()]
    bundle = pipe.bundle
    size = bundle.image_size
    items = [Item(p, s, bundle.default_guidance, size, size, prompt_index=i, sample_index=s)
             for i, (p, _) in enumerate(words) for s in SEEDS]
    latents = sample_latents_batched(bundle, items, 50, batch_size=32, progress=True, desc="fresh words (base)")
    images = bundle.codec.decode(latents).cpu()
    probs = make_judge("toy").probabilities(images, list(OBJECTS), ALIASES)
    predicted = probs.argmax(-1)
    save_file({"latents": latents.contiguous(), "predicted": predicted.contiguous()}, str(path))
    return latents, [labels[i] for i in predicted.tolist()]


def run_scores(pipe, run_dir: Path, words, latents, out: Path) -> dict:
    path = out / f"scores_{run_dir.parent.name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    run = pipe.load_erasure(run_dir)
    bundle = pipe.bundle
    prompts = [p for p, _ in words]
    prompt_scores = influence_scores(bundle, pipe.adapter, prompts, ScorerConfig(), bundle.default_guidance).tolist()
    gate = ImageGate.from_stored(run.calibration.image)
    seeds = [s for _ in words for s in SEEDS]
    image_scores = gate.scores(bundle, pipe.adapter, latents, seeds).tolist()
    pipe.unload_erasure()
    result = {"prompt_scores": prompt_scores, "image_scores": image_scores,
              "prompt_calibration": run.calibration.prompt, "image_calibration": run.calibration.image}
    path.write_text(json.dumps(result))
    return result


def thresholds(scores: dict, p: float, q: float) -> tuple[float, float]:
    cal = scores["prompt_calibration"]
    prompt = gate_threshold(max(cal["anchor_scores"].values()), min(cal["concept_scores"].values()), p)
    return prompt, image_threshold(*calibration_scores(scores["image_calibration"]), q, ceiling=None)  # rules cap below


def decide(scores: dict, words, rule: str, p: float, q: float, b: float = 0.0) -> list[bool]:
    """Per image: erased or flagged under ``rule``."""
    if p is None:  # the run's own stored position
        p = scores["prompt_calibration"].get("position", 0.5)
    usual = thresholds(scores, p, 0.8)[1]
    prompt_t, lenient = thresholds(scores, p, q)
    calibration = calibration_scores(scores["image_calibration"])
    # the threshold a rule puts on images that are no suspects (computed once per run, not per image)
    other = usual
    if rule == "cap":  # never past the anchors' q-quantile
        other = min(usual, float(np.quantile(calibration[1], q)))
    elif rule in ("below", "suspect-below"):  # never above the score q (below) or b (suspects at q)
        other = image_threshold(*calibration, 0.8, ceiling=q if rule == "below" else b)
    elif rule == "suspect-at":  # suspects at q, the others at position b
        other = thresholds(scores, p, b)[1]
    out = []
    for i, _ in enumerate(words):
        over = scores["prompt_scores"][i] > prompt_t
        for k, _ in enumerate(SEEDS):
            s = scores["image_scores"][i * len(SEEDS) + k]
            if rule == "image":  # the image gate alone at position q
                out.append(s < lenient)
            elif rule in ("cap", "below"):
                out.append(s < other)
            elif rule == "front":
                out.append(over or s < usual)
            elif rule in ("suspect", "suspect-below", "suspect-at"):
                out.append(s < (lenient if over else other))
            elif rule == "prompt":
                out.append(over)
    return out


def table(all_scores: dict, words, predicted, rules) -> list[dict]:
    rows = []
    for name, rule, p, q, *b in rules:
        per = {}
        for concept, scores in all_scores.items():
            acted = decide(scores, words, rule, p, q, *b)
            own = [a for (w, c), a, pr in zip([wc for wc in words for _ in SEEDS], acted, predicted)
                   if c == concept and pr == concept]
            other = [a for (w, c), a, pr in zip([wc for wc in words for _ in SEEDS], acted, predicted)
                     if c != concept and pr != concept]
            recall, fp = sum(own) / max(len(own), 1), sum(other) / max(len(other), 1)
            hm = 2 * recall * (1 - fp) / max(recall + 1 - fp, 1e-9)
            per[concept] = (sum(own), len(own), sum(other), len(other), hm)
        mean_hm = sum(v[4] for v in per.values()) / len(per)
        rows.append({"rule": name, "per": per, "hm": mean_hm,
                     "caught": sum(v[0] for v in per.values()), "own": sum(v[1] for v in per.values()),
                     "fp": sum(v[2] for v in per.values()), "other": sum(v[3] for v in per.values())})
    return rows


def main(runs: str, out: str, model: str = "toyworld"):
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    words = fresh_words(Path(__file__).with_name("fresh_words.tsv"))
    pipe = UnGuidePipeline.from_pretrained(model)
    latents, predicted = base_images(pipe, words, out_dir)
    run_dirs = sorted(d for d in Path(runs).glob("*/selective") if (d / "erasure.json").is_file())
    all_scores = {d.parent.name: run_scores(pipe, d, words, latents, out_dir) for d in run_dirs}
    rules = [(f"image ({q})", "image", None, q) for q in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)]
    rules += [(f"cap: 0.8, at most q{a} of anchors", "cap", None, a) for a in (0.0, 0.02, 0.05, 0.1)]
    rules += [(f"below: 0.8, at most {b}", "below", None, b) for b in (0.0, -0.02, -0.05, -0.1)]
    rules += [(f"suspect-below p={p} q={q} b={b}", "suspect-below", p, q, b) for p in (None, 0.5) for q in (0.8, 1.0, 1.5, 2.0)
              for b in (0.0, -0.02, -0.03, -0.05, -0.07, -0.1)]
    rules += [(f"suspect-at p={p} q={q} u={u}", "suspect-at", p, q, u) for p in (None,) for q in (1.0, 2.0)
              for u in (0.4, 0.5, 0.6, 0.7)]
    rules += [("prompt alone (run's p)", "prompt", None, 0.8),
             ("front, run's p (calibrated+image today)", "front", None, 0.8)]
    rules += [(f"front p={p}", "front", p, 0.8) for p in (0.5, 0.7, 0.8, 0.9)]
    rules += [(f"suspect p={p} q={q}", "suspect", p, q) for p in (None, 0.0, 0.5) for q in (1.0, 1.25, 1.5, 2.0, 2.5, 3.0)]
    rows = table(all_scores, words, predicted, rules)
    concepts = list(all_scores)
    print("| rule | own images caught | others' images altered | mean harmonic mean | " + " | ".join(concepts) + " |")
    print("|---" * (4 + len(concepts)) + "|")
    for r in rows:
        cells = " | ".join(f"{r['per'][c][0]}/{r['per'][c][1]}, {r['per'][c][2]}/{r['per'][c][3]}" for c in concepts)
        print(f"| {r['rule']} | {r['caught']}/{r['own']} | {r['fp']}/{r['other']} | {100 * r['hm']:.2f} | {cells} |")
    (out_dir / "gate_fresh.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:4])
