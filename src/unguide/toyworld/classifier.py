"""The toy world's judge: a small CNN that names the object (or "nothing") and its colour.

It is trained only on renders (with blur and noise so that it is not fooled by a generator's
soft edges) and is the classifier behind every toy-world metric.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..io import load_tensors, save_tensors, tensor_metadata, write_json
from .render import CLASSES, COLOUR_NAMES, OBJECTS, render_batch

DEFAULT_PATH = Path(__file__).parent / "weights" / "classifier.safetensors"


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.MaxPool2d(2))


class ToyClassifier(nn.Module):
    """Input: images in [0, 1], shape (B, 3, 32, 32). Outputs object logits (11) and colour logits (8)."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        self.widths = tuple(widths)
        chans = (3,) + self.widths
        self.features = nn.Sequential(*[_block(a, b) for a, b in zip(chans[:-1], chans[1:])])
        self.object_head = nn.Linear(self.widths[-1], len(CLASSES))
        self.colour_head = nn.Linear(self.widths[-1], len(COLOUR_NAMES))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (used for FID/KID on the toy world)."""
        return self.features(images * 2 - 1).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(images)
        return self.object_head(h), self.colour_head(h)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Softmax probabilities for objects and colours, in eval mode."""
        self.eval()
        objs, cols = [], []
        for i in range(0, len(images), batch_size):
            o, c = self(images[i:i + batch_size].float())
            objs.append(o.softmax(-1))
            cols.append(c.softmax(-1))
        return {"object": torch.cat(objs), "colour": torch.cat(cols)}

    def save_pretrained(self, path: str | Path, info: dict | None = None) -> None:
        meta = {"widths": json.dumps(self.widths), "classes": json.dumps(CLASSES), "colours": json.dumps(COLOUR_NAMES)}
        if info:
            meta["info"] = json.dumps(info)
        save_tensors(path, self.state_dict(), metadata=meta)

    @classmethod
    def from_pretrained(cls, path: str | Path = DEFAULT_PATH) -> "ToyClassifier":
        meta = tensor_metadata(path)
        model = cls(tuple(json.loads(meta.get("widths", "[32, 64, 128]"))))
        model.load_state_dict(load_tensors(path))
        return model.eval()


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def _labels(scenes) -> tuple[torch.Tensor, torch.Tensor]:
    obj = torch.tensor([OBJECTS.index(s.obj) if s.obj else len(OBJECTS) for s in scenes])
    col = torch.tensor([COLOUR_NAMES.index(s.colour) if s.colour else -100 for s in scenes])
    return obj, col


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur, noise and slight brightness changes, like a generator's imperfect samples."""
    b = x.shape[0]
    sigma = torch.rand(b, generator=g) * 1.0
    blur_mask = torch.rand(b, generator=g) < 0.5
    if blur_mask.any():
        k = torch.arange(-2, 3, dtype=torch.float32)
        out = []
        for i in torch.nonzero(blur_mask).flatten().tolist():
            s = max(float(sigma[i]), 0.3)
            w = torch.exp(-k ** 2 / (2 * s * s))
            w = w / w.sum()
            img = x[i:i + 1]
            img = F.conv2d(F.pad(img, (2, 2, 0, 0), mode="replicate"), w.view(1, 1, 1, 5).repeat(3, 1, 1, 1), groups=3)
            img = F.conv2d(F.pad(img, (0, 0, 2, 2), mode="replicate"), w.view(1, 1, 5, 1).repeat(3, 1, 1, 1), groups=3)
            out.append((i, img))
        x = x.clone()
        for i, img in out:
            x[i:i + 1] = img
    x = x * (1 + 0.08 * (torch.rand(b, 1, 1, 1, generator=g) - 0.5))
    x = x + torch.randn(x.shape, generator=g) * (torch.rand(b, 1, 1, 1, generator=g) * 0.05)
    return x.clamp(0, 1)


@dataclass
class ClassifierTrainConfig:
    dataset_size: int = 30000
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0
    p_empty: float = 0.15


def train_classifier(out: str | Path = DEFAULT_PATH, cfg: ClassifierTrainConfig = ClassifierTrainConfig()) -> dict:
    """Train the judge on renders; returns held-out accuracies (fresh renders, another seed)."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    imgs, scenes = render_batch(cfg.seed + 1000, cfg.dataset_size, p_empty=cfg.p_empty)
    x_all, (yo_all, yc_all) = to_tensor(imgs), _labels(scenes)
    model = ToyClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps)
    model.train()
    bar = tqdm(range(cfg.steps), desc="classifier")
    for step in bar:
        idx = torch.randint(0, len(x_all), (cfg.batch_size,), generator=g)
        x = _augment(x_all[idx], g)
        lo, lc = model(x)
        loss = F.cross_entropy(lo, yo_all[idx]) + 0.5 * F.cross_entropy(lc, yc_all[idx], ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    result = evaluate_classifier(model, seed=cfg.seed + 999_999)
    result.update(train_seconds=round(time.time() - t0, 1), config=asdict(cfg))
    model.save_pretrained(out, info=result)
    write_json(Path(out).with_suffix(".json"), result)
    return result


def evaluate_classifier(model: ToyClassifier, seed: int = 12345, n: int = 5000) -> dict:
    imgs, scenes = render_batch(seed, n, p_empty=0.1)
    probs = model.predict(to_tensor(imgs))
    yo, yc = _labels(scenes)
    obj_acc = (probs["object"].argmax(-1) == yo).float().mean().item()
    has = yc >= 0
    col_acc = (probs["colour"].argmax(-1)[has] == yc[has]).float().mean().item()
    return {"heldout_object_accuracy": obj_acc, "heldout_colour_accuracy": col_acc, "heldout_n": n, "heldout_seed": seed}
