"""The toy world as a plug-in: its judge, its benchmark suite and its prompt sets.

The library reaches this module only through the world registry (:mod:`unguide.models.worlds`, which finds it by the
``unguide.worlds`` entry point), so the core (evaluation, benchmark, cost) works the same on Stable Diffusion and never
imports the toy world itself.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from ..evaluation.judges import ClassJudge
from .captions import HELDOUT_SYNONYMS, SCENE_WORDS, TRAIN_SYNONYMS
from .classifier import ToyClassifier
from .render import CLASSES, COLOUR_NAMES, OBJECTS

from .model import MARKER, NAME, default_model_dir, load_bundle  # noqa: F401  (the plug-in's model side)

LOG = logging.getLogger("unguide")  # the CLI shows INFO lines; a library caller can silence them

CONCEPTS = OBJECTS  # the toy suite's concepts: one preset per class, same names
ALIASES = {o: list(TRAIN_SYNONYMS[o] + HELDOUT_SYNONYMS[o]) for o in OBJECTS}


class ToyJudge(ClassJudge):
    """The toy classifier: softmax over its own 11 labels (the 10 classes and "nothing"), whatever classes a suite
    names; features: its 128-d penultimate layer (FID/KID); extra: the rate of the colour a prompt asks for."""

    name = "toy"

    def __init__(self):
        self.classifier = ToyClassifier.from_pretrained()

    def label_set(self, classes: Sequence[str] = ()) -> list[str]:
        unknown = sorted(set(classes) - set(CLASSES))
        if unknown:
            raise ValueError(f"the toy classifier knows no class {unknown}")
        return list(CLASSES)

    def default_classes(self) -> tuple[list[str], dict[str, list[str]]]:
        return list(OBJECTS), ALIASES

    def probabilities(self, images, classes=(), aliases=None):
        return self.classifier.predict(images)["object"]

    def features(self, images):
        with torch.no_grad():
            return self.classifier.embed(images)

    def attributes(self, prompts, images) -> dict:
        """Per prompt that names a colour ("a red boat"): the colour and how often the classifier sees it drawn."""
        from ..generation.prompts import word_in

        colours = self.classifier.predict(images)["colour"].argmax(-1)
        hits: dict[str, list[float]] = {}
        asked: dict[str, str] = {}
        for i, prompt in enumerate(prompts):
            colour = word_in(prompt, {c: c for c in COLOUR_NAMES})
            if colour:
                asked[prompt] = colour
                hits.setdefault(prompt, []).append(float(int(colours[i]) == COLOUR_NAMES.index(colour)))
        return {p: {"colour": asked[p], "colour_rate": sum(h) / len(h)} for p, h in hits.items()}



JUDGES = {"toy": ToyJudge}

def default_anchors() -> list[str]:
    """Anchors for a custom concept on the toy model whose spec lists none: every class's plain prompt and the
    empty prompt (the concept's own words are left out by the caller)."""
    return ["", *(f"a photo of the {name}" for name in OBJECTS)]


def suite(concepts: Sequence[str]):
    """The toy benchmark: the 10 object presets; 4 anchor classes each, 5 held out (docs/protocol.md)."""
    from ..erasure.concepts import load_preset
    from ..evaluation.suites import Suite, case_from_spec

    cases = {name: case_from_spec(name, load_preset(name), classes=list(OBJECTS)) for name in concepts}
    every = [case_from_spec(o, load_preset(o), classes=list(OBJECTS)) for o in OBJECTS]
    return Suite(name="toy", cases=cases, judge="toy", metrics="table1", canonical_from=every,
                 description="judge: the toy classifier (mean probability of each image's correct class; synonym "
                             "images count as the erased class)")


def concept_images(spec, n: int, seed: int = 0) -> torch.Tensor:
    """n renders of the concept's class (random colours and scenes): what the attack measures its loss on."""
    from .classifier import to_tensor
    from .render import render_batch

    images, _ = render_batch(seed + 7, n, p_empty=0.0, obj=spec.label)
    return to_tensor(images)


def decision_prompts(spec) -> list[str]:
    """>= 100 prompts around a toy concept: target, synonyms, other classes, colour and scene variations."""
    prompts = [spec.target] + spec.synonym_prompts() + list(spec.other)
    for obj in OBJECTS:
        for colour in COLOUR_NAMES[:7]:
            prompts.append(f"a photo of a {colour} {obj}")
        for scene in ("grass", "sand"):
            prompts.append(f"a {obj} on the {SCENE_WORDS[scene]}")
    for scene in SCENE_WORDS.values():
        prompts.append(f"a photo of the {scene}")
    return list(dict.fromkeys(prompts))


def train(out, stage: str = "all", classifier_steps: int = 1500, vae_steps: int = 700, unet: Optional[dict] = None,
          max_minutes: Optional[float] = None, device: str = "cpu", mmdit: Optional[dict] = None) -> None:
    """``unguide train-toy``: the embedded models' stages (classifier, VAE, UNet, export; ``mmdit`` and
    ``export-mmdit`` for toyworld-flow); ``unet`` / ``mmdit``: UNetConfig / FlowConfig fields."""
    from pathlib import Path

    from ..errors import UnguideError
    from .classifier import ClassifierTrainConfig, train_classifier
    from .train import UNetConfig, VAEConfig, export_toyworld, train_unet, train_vae
    from .train_flow import FlowConfig, export_flow, train_flow

    out, cfg = Path(out), UNetConfig(**(unet or {}))
    if stage in ("classifier", "all"):
        LOG.info(train_classifier(out / "classifier.safetensors", ClassifierTrainConfig(steps=classifier_steps)))
    if stage in ("vae", "all"):
        train_vae(out, VAEConfig(steps=vae_steps))
    if stage in ("unet", "all"):
        if not (out / "vae").is_dir():
            raise UnguideError(f"no trained VAE in {out}/vae: run `unguide train-toy --stage vae --out {out}` first")
        LOG.info(f"toyworld model written to {train_unet(out, cfg, max_minutes=max_minutes, device=device)}")
    if stage == "mmdit":
        path = train_flow(out, FlowConfig(**(mmdit or {})), max_minutes=max_minutes, device=device)
        LOG.info(f"toyworld-flow model written to {path}")
    if stage == "export":
        LOG.info(export_toyworld(out, cfg))  # the architecture and text side come from the checkpoint
    if stage == "export-mmdit":
        LOG.info(export_flow(out))


def quality(bundle, **kw) -> dict:
    """``unguide toy-quality``: per-class accuracy of a toy model's samples."""
    from .quality import toy_quality

    return toy_quality(bundle, **kw)
