"""``unguide demo`` / ``make demo``: the main job on the embedded model."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .generation import Item, sample_images, save_grid
from .io import write_json


def base_grid(bundle, out: Path, samples: int = 8, seed: int = 0, steps: int = 50) -> dict:
    """One row per toy class of base-model samples, and the classifier's accuracy on them."""
    from .toyworld.classifier import ToyClassifier
    from .toyworld.render import OBJECTS

    items = [Item(f"a photo of the {c}", seed + j, bundle.default_guidance, bundle.image_size, bundle.image_size)
             for c in OBJECTS for j in range(samples)]
    imgs, _ = sample_images(bundle, items, steps=steps)
    pred = ToyClassifier.from_pretrained().predict(imgs)["object"].argmax(-1)
    labels = torch.tensor([OBJECTS.index(c) for c in OBJECTS for _ in range(samples)])
    per_class = {c: (pred[labels == i] == i).float().mean().item() for i, c in enumerate(OBJECTS)}
    save_grid(out / "base_grid.png", imgs, ncol=samples, scale=3)
    return {"per_class_accuracy": per_class, "mean_accuracy": sum(per_class.values()) / len(per_class)}


def demo_command(args) -> int:
    from .models import load_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    bundle = load_model("toyworld")
    result = base_grid(bundle, out, samples=args.samples or 8)
    result["seconds"] = round(time.time() - t0, 1)
    write_json(out / "base_grid.json", result)
    print(f"base-model grid (one row per class): {out / 'base_grid.png'}")
    print(f"classifier accuracy of those samples: {result['mean_accuracy']:.1%} "
          + ", ".join(f"{c} {a:.0%}" for c, a in result["per_class_accuracy"].items()))
    return 0
