"""How well a toy-world model draws what it is asked (``unguide toy-quality``): per-class classifier
accuracy for "a photo of the {class}" and for the held-out synonyms, plus seconds per image."""
from __future__ import annotations

import time
from typing import Optional

import torch

from ..sampling.images import Item, sample_images
from .captions import HELDOUT_SYNONYMS
from .classifier import ToyClassifier
from .render import OBJECTS


def generate_for_classes(bundle, prompts_by_class: dict[str, list[str]], samples: int, guidance: float, steps: int = 50,
                         seed: int = 0, batch_size: int = 32):
    """Images for every (class, prompt), seeds seed..seed+samples-1; returns (items, images, seconds)."""
    items = [Item(p, seed + j, guidance, bundle.image_size, bundle.image_size, extra={"class": cls})
             for cls, prompts in prompts_by_class.items() for p in prompts for j in range(samples)]
    t0 = time.time()
    imgs, _ = sample_images(bundle, items, steps=steps, batch_size=batch_size)
    return items, imgs, time.time() - t0


def class_accuracy(items, imgs: torch.Tensor, seconds: float, classifier: Optional[ToyClassifier] = None) -> dict:
    classifier = classifier or ToyClassifier.from_pretrained()
    pred = classifier.predict(imgs)["object"].argmax(-1)
    labels = torch.tensor([OBJECTS.index(it.extra["class"]) for it in items])
    classes = list(dict.fromkeys(it.extra["class"] for it in items))
    per_class = {c: (pred[labels == OBJECTS.index(c)] == OBJECTS.index(c)).float().mean().item() for c in classes}
    per_prompt = {}
    for p in dict.fromkeys(it.prompt for it in items):
        mask = torch.tensor([it.prompt == p for it in items])
        per_prompt[p] = (pred[mask] == labels[mask]).float().mean().item()
    return {"per_class": per_class, "mean": sum(per_class.values()) / len(per_class), "per_prompt": per_prompt,
            "seconds_per_image": seconds / len(items), "images": len(items)}


def toy_quality(bundle, samples: int = 32, guidance: Optional[float] = None, steps: int = 50, seed: int = 0) -> dict:
    guidance = guidance if guidance is not None else bundle.default_guidance
    base = generate_for_classes(bundle, {c: [f"a photo of the {c}"] for c in OBJECTS}, samples, guidance, steps, seed)
    held = generate_for_classes(bundle, {c: [f"a photo of the {s}" for s in HELDOUT_SYNONYMS[c]] for c in OBJECTS},
                                samples, guidance, steps, seed)
    return {"guidance": guidance, "steps": steps, "samples_per_prompt": samples, "class_prompts": class_accuracy(*base),
            "heldout_synonyms": class_accuracy(*held)}
