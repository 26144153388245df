"""Generation into a folder (``unguide generate``, benchmarks, attacks, the page): PNGs with their prompt, seed,
settings and decision in the metadata, ``index.jsonl`` rebuilt from them, and a grid. One writer
(:class:`ImageFolder`) and one reader (:func:`read_png_metadata`, the index) of the format."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from ..errors import UnguideError
from ..io import atomic_path, write_json, write_text
from ..sampling.images import Item, to_uint8


class ImageFolder:
    """An output folder: which items are still to draw, each finished batch saved as PNGs, then index and grid."""

    def __init__(self, out: str | Path, steps: int, model: str, extra: Optional[dict] = None):
        self.out, self.steps, self.model, self.extra = Path(out), steps, model, dict(extra or {})
        self.out.mkdir(parents=True, exist_ok=True)

    def todo(self, items: Sequence[Item]) -> list[Item]:
        return [it for it in items if not (self.out / it.filename).exists()]

    def check_guide(self, info: Optional[dict]) -> None:
        """Refuse to add to a folder whose images were drawn under other guidance settings (``info["guide"]``, as
        recorded in its run.json): resuming it would mix two gates in one set of images."""
        stored = self.out / "run.json"
        if not info or "guide" not in info or not stored.is_file():
            return
        before = json.loads(stored.read_text()).get("guide")
        if before is not None and before != json.loads(json.dumps(info["guide"])):
            raise UnguideError(f"{self.out} holds images drawn with other guidance settings (gate, thresholds or "
                               "weights) than asked for now: use another output folder, or delete it to redraw it")

    def write_run_info(self, info: dict) -> None:
        write_json(self.out / "run.json", info)

    def save(self, batch: Sequence[Item], images: torch.Tensor, decisions: Sequence) -> None:
        for it, img, decision in zip(batch, images, decisions):
            save_png(self.out / it.filename, img, image_metadata(it, self.steps, self.model, decision, self.extra))

    def finish(self, items: Sequence[Item], grid_rows: int = 16) -> Path:
        write_index(self.out)
        _write_grid(self.out, items, grid_rows)
        return self.out


def _write_grid(out: Path, items: Sequence[Item], grid_rows: int) -> None:
    n = max(it.sample_index for it in items) + 1
    shown = [it for it in items if it.prompt_index < grid_rows]
    sizes = {(it.height, it.width) for it in shown}
    if len(sizes) != 1:
        return  # mixed sizes: no grid
    h, w = sizes.pop()
    blank = np.full((h, w, 3), 255, np.uint8)
    tiles = [np.asarray(Image.open(out / it.filename).convert("RGB")) if (out / it.filename).exists() else blank for it in shown]
    save_grid(out / "grid.png", tiles, ncol=n, scale=max(1, 128 // w))


def save_png(path: str | Path, image: torch.Tensor, metadata: dict) -> None:
    """PNG with the prompt, seed and settings in its text chunks; written atomically."""
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(key, json.dumps(value))  # JSON even for strings, so a prompt "123" reads back as a string
    with atomic_path(path) as tmp:
        Image.fromarray(to_uint8(image)).save(tmp, format="PNG", pnginfo=info)


def read_png_metadata(path: str | Path) -> dict:
    with Image.open(path) as im:
        text = dict(im.text)
    out = {}
    for k, v in text.items():
        try:
            out[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):  # written by another tool
            out[k] = v
    return out


def make_grid(images: Sequence[np.ndarray] | torch.Tensor, ncol: int, pad: int = 2, scale: int = 1) -> Image.Image:
    """Tile uint8 HxWx3 arrays (or a [0,1] tensor batch) into one image, row-major."""
    if torch.is_tensor(images):
        images = [to_uint8(im) for im in images]
    h, w = images[0].shape[:2]
    nrow = math.ceil(len(images) / ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for k, im in enumerate(images):
        r, c = divmod(k, ncol)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = im
    img = Image.fromarray(grid)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def save_grid(path: str | Path, images, ncol: int, scale: int = 1) -> None:
    with atomic_path(path) as tmp:
        make_grid(images, ncol, scale=scale).save(tmp, format="PNG")


def image_metadata(item: Item, steps: int, model: str, decision=None, extra: Optional[dict] = None) -> dict:
    """What a PNG records: the item (prompt, seed, guidance, size, ...), the sampler, the image's decision
    (:meth:`~unguide.guidance.decision.Decision.record`; none without an erasure run) and the run's ``extra``."""
    meta = {"prompt": item.prompt, "seed": item.seed, "guidance": item.guidance, "steps": steps, "sampler": "ddim",
            "eta": 0.0, "height": item.height, "width": item.width, "model": model,
            "prompt_index": item.prompt_index, "sample_index": item.sample_index}
    if item.negative_prompt:
        meta["negative_prompt"] = item.negative_prompt
    if item.noise is not None:
        meta["initial_noise"] = "given (latents=)"
    meta.update(item.extra)
    meta.update(decision.record() if decision is not None else {})
    if extra:
        meta.update(extra)
    return meta


def write_index(out: str | Path) -> Path:
    """Rebuild index.jsonl from the PNGs' own metadata (so reruns and several processes never duplicate rows)."""
    out = Path(out)
    rows = [dict(file=p.name, **read_png_metadata(p)) for p in sorted(out.glob("[0-9]*_[0-9]*.png"))]
    target = out / "index.jsonl"
    write_text(target, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return target

