"""``unguide evaluate --images DIR``: score a generated folder from its index.jsonl; writes metrics.json.

Judges (:mod:`unguide.evaluation.judges`):
* ``toy`` (default): the toy classifier. Each image's class is its index row's ``class`` or the class/synonym
  word in its prompt; colour prompts ("a red boat") are also scored for the rate of the asked colour.
* ``clip``: zero-shot CLIP over ``--labels`` (or the concept's classes) with "a photo of the {label}", and CLIP
  score against each prompt (default model openai/clip-vit-base-patch32; needs those weights on your machine).
* ``nudenet``: exposed-class counts (the 9 classes of the UnGuide protocol, threshold 0.6).
With ``--concept NAME`` the paper's Acc_e / Acc_s / Acc_g / H_o are computed from the concept's prompts
(:func:`unguide.evaluation.metrics.erasure.table1_metrics`, as the benchmark does); with ``--reference DIR`` (the base
model's images, same prompts and seeds) SSIM, pixel error and FID/KID on the judge's features.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import UnguideError
from ..io import write_json
from .judges import DEFAULT_CLIP, ClassJudge, make_judge
from ..generation.prompts import word_in


def load_folder(folder: str | Path) -> tuple[list[dict], torch.Tensor]:
    """The one reader of a generated folder: its index rows and images (N, 3, H, W) in [0, 1]."""
    folder = Path(folder)
    rows = read_index(folder)
    if not rows:
        raise UnguideError(f"{folder / 'index.jsonl'} lists no images")
    missing = [r["file"] for r in rows if not (folder / r["file"]).is_file()]
    if missing:
        raise UnguideError(f"{folder}: {len(missing)} indexed images are missing (e.g. {missing[0]}): rerun the generation")
    return rows, load_images([folder / r["file"] for r in rows])


def read_index(folder: str | Path) -> list[dict]:
    """The one reader of index.jsonl (written by :func:`unguide.sampling.images.write_index`)."""
    index = Path(folder) / "index.jsonl"
    if not index.is_file():
        raise UnguideError(f"{folder} has no index.jsonl: point `images` at a folder written by `unguide generate`")
    return [json.loads(line) for line in index.read_text().splitlines() if line.strip()]


def load_images(paths: Sequence[str | Path]) -> torch.Tensor:
    """Image files of one size -> (N, 3, H, W) float in [0, 1]."""
    imgs = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def load_image_folder(folder: str | Path, size: int, what: str, minimum: int = 1) -> torch.Tensor:
    """Every picture in a folder the user gives (any names, any sizes), resized to size x size, as (N, 3, H, W) in
    [0, 1]; ``what`` names the flag in the error."""
    folder = Path(folder)
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if len(paths) < minimum:
        raise UnguideError(f"{what} {folder}: needs at least {minimum} .png/.jpg images, found {len(paths)}")
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC)) for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def class_judgements(judge: ClassJudge, images: torch.Tensor, classes: Sequence[str], aliases: dict,
                     image_classes: Sequence[Optional[str]]) -> dict:
    """Per image: the judge's probability of its class (``p_correct``), whether its arg-max is that class
    (``top1``) and the class it sees (``predicted``). Images with no class get NaN."""
    labels = judge.label_set(classes)
    probs = judge.probabilities(images, classes, aliases)
    known = [c in labels for c in image_classes]
    index = torch.tensor([labels.index(c) if ok else 0 for c, ok in zip(image_classes, known)])
    rows = torch.arange(len(images))
    nan = torch.tensor(float("nan"))
    mask = torch.tensor(known)
    p_correct = torch.where(mask, probs[rows, index], nan)
    top1 = torch.where(mask, (probs.argmax(-1) == index).float(), nan)
    return {"p_correct": p_correct, "top1": top1, "predicted": [labels[int(k)] for k in probs.argmax(-1)]}


def per_prompt_summary(prompts: Sequence[str], image_classes: Sequence[Optional[str]], judged: dict,
                       attributes: dict) -> dict:
    out: dict[str, dict] = {}
    for i, p in enumerate(prompts):
        d = out.setdefault(p, {"class": image_classes[i], "p": [], "t": [], "predicted": []})
        d["predicted"].append(judged["predicted"][i])
        if not torch.isnan(judged["p_correct"][i]):
            d["p"].append(float(judged["p_correct"][i]))
            d["t"].append(float(judged["top1"][i]))
    summary = {}
    for p, d in out.items():
        summary[p] = {"class": d["class"], "n": len(d["predicted"]),
                      "p_correct": float(np.mean(d["p"])) if d["p"] else None,
                      "top1": float(np.mean(d["t"])) if d["t"] else None,
                      "predicted": {c: d["predicted"].count(c) for c in sorted(set(d["predicted"]))},
                      **attributes.get(p, {})}
    return summary


def concept_roles(concept) -> dict[str, dict]:
    from .suites import concept_rows

    return {r["prompt"]: r for r in concept_rows(concept)}


def preservation_metrics(rows, imgs, feats, ref_rows, ref_imgs, ref_feats) -> dict:
    from .metrics.preservation import fid_kid, pixel_error, ssim

    ref_key = {(r["prompt"], r["seed"]): i for i, r in enumerate(ref_rows)}
    pairs = [(i, ref_key[(r["prompt"], r["seed"])]) for i, r in enumerate(rows) if (r["prompt"], r["seed"]) in ref_key]
    if not pairs:
        raise UnguideError("no image in `images` has a same-prompt, same-seed partner in `reference`")
    a, b = zip(*pairs)
    out = {"pairs": len(pairs), "ssim": ssim(imgs[list(a)], ref_imgs[list(b)]).mean().item(),
           "pixel_error": pixel_error(imgs[list(a)], ref_imgs[list(b)]).mean().item()}
    if feats is not None and len(pairs) >= 2:
        fk = fid_kid(ref_feats[list(b)], feats[list(a)])
        out.update(fid=fk["fid"], kid=fk["kid_mean"])
    return out


def _classes_for(judge: ClassJudge, concept, labels: Optional[list[str]]) -> tuple[list[str], dict]:
    if labels:
        return list(labels), {}
    if hasattr(judge, "default_classes"):  # a judge of a fixed world (the toy classifier) knows its classes
        return judge.default_classes()
    if concept is not None and concept.label:
        from .suites import case_from_spec

        case = case_from_spec(concept.name, concept)
        return case.classes, case.aliases
    raise UnguideError("the clip judge needs a label set: pass `labels` a,b,c or `concept` NAME")


def evaluate_folder(images: str | Path, judge: str = "toy", concept=None, reference: Optional[str] = None,
                    labels: Optional[list[str]] = None, clip_model: str = DEFAULT_CLIP) -> dict:
    from .metrics.erasure import table1_metrics

    rows, imgs = load_folder(images)
    result: dict = {"images": str(images), "n_images": len(rows), "judge": judge}
    the_judge = make_judge(judge, clip_model=clip_model)
    feats = None
    if judge == "nudenet":
        from .metrics.nudity import summarise

        counts = the_judge.detections([Path(images) / r["file"] for r in rows])
        result["nudenet"] = summarise(counts)
        result["per_image"] = {r["file"]: c for r, c in zip(rows, counts)}
    else:
        classes, aliases = _classes_for(the_judge, concept, labels)
        vocab = {c: c for c in classes} | {a: c for c, words in aliases.items() for a in words}
        prompts = [r["prompt"] for r in rows]
        image_classes = [r.get("class") or word_in(p, vocab) for r, p in zip(rows, prompts)]
        judged = class_judgements(the_judge, imgs, classes, aliases, image_classes)
        feats = the_judge.features(imgs)
        per_prompt = per_prompt_summary(prompts, image_classes, judged, the_judge.attributes(prompts, imgs))
        result["per_prompt"] = per_prompt
        scored = [v for v in per_prompt.values() if v["p_correct"] is not None]
        if scored:
            result["mean_p_correct"] = float(np.mean([v["p_correct"] for v in scored]))
            result["mean_top1"] = float(np.mean([v["top1"] for v in scored]))
        colours = sorted({v["colour"] for v in per_prompt.values() if v.get("colour")})
        if colours:  # the attribute concept's figure: how often the asked colour is drawn, per colour
            result["colour_rate"] = {c: float(np.mean([v["colour_rate"] for v in per_prompt.values()
                                                       if v.get("colour") == c])) for c in colours}
        if concept is not None:
            roles = concept_roles(concept)
            role = [roles[p]["role"] if p in roles else "" for p in prompts]
            result["concept"] = {"name": concept.name, **table1_metrics(judged["p_correct"], judged["top1"], role)}
        if hasattr(the_judge, "clip_score"):
            result["clip_score"] = the_judge.clip_score(imgs, prompts).mean().item()
    if reference:
        ref_rows, ref_imgs = load_folder(reference)
        ref_feats = the_judge.features(ref_imgs) if feats is not None else None
        result["preservation"] = preservation_metrics(rows, imgs, feats, ref_rows, ref_imgs, ref_feats)
    write_json(Path(images) / "metrics.json", result)
    return result
