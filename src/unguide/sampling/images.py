"""Image generation over prompts: batching, per-image seeds, PNGs with metadata, grids, resume.

What the denoiser does at each step is a *guide* (plain classifier-free guidance here, UnGuidance
in :mod:`unguide.guidance.unguidance`); the loop itself is :func:`unguide.sampling.ddim.ddim_loop`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from tqdm.auto import tqdm

from ..errors import check_number
from ..io import atomic_path, write_text
from .ddim import StepFn, cfg_noise_fn, ddim_loop, initial_noise, make_scheduler


@dataclass
class Item:
    """One image to generate: everything needed to reproduce it."""

    prompt: str
    seed: int
    guidance: float
    height: int
    width: int
    prompt_index: int = 0
    sample_index: int = 0
    extra: dict = field(default_factory=dict)
    negative_prompt: str = ""  # the unconditional side of classifier-free guidance ("" as in the paper)
    noise: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)  # initial latent; None: from seed

    def __post_init__(self):
        """Every image passes here, whichever command or call planned it: its numbers are checked once."""
        check_number("seed", self.seed, low=0, integer=True)
        check_number("guidance scale", self.guidance, low=0)
        check_number("height", self.height, low=1, integer=True)
        check_number("width", self.width, low=1, integer=True)

    @property
    def filename(self) -> str:
        return f"{self.prompt_index:05d}_{self.sample_index:03d}.png"


class PlainGuide:
    """Classifier-free guidance with the model as it is (what Stable Diffusion does)."""

    name = "base"

    def prepare(self, bundle, items: Sequence[Item]) -> list[dict]:
        return [{} for _ in items]

    def noise_fn(self, bundle, cond, uncond, scale, infos: Sequence[dict]):
        return cfg_noise_fn(bundle.unet, cond, uncond, scale)


@torch.no_grad()
def sample_latents(bundle, items: Sequence[Item], steps: int, guide, infos: Sequence[dict],
                   on_step: Optional[StepFn] = None) -> torch.Tensor:
    """Denoise one batch of items that share a size (from each item's seed, or the initial noise it carries)."""
    shape = bundle.latent_shape(items[0].height, items[0].width)
    x = initial_noise(shape, [it.seed for it in items], device=bundle.device, dtype=bundle.unet.dtype)
    for k, it in enumerate(items):
        if it.noise is not None:
            x[k] = it.noise.to(device=x.device, dtype=x.dtype)
    cond = bundle.encode_prompts([it.prompt for it in items])
    uncond = bundle.encode_prompts([it.negative_prompt for it in items])
    scale = torch.tensor([it.guidance for it in items], dtype=x.dtype, device=x.device)
    sched = make_scheduler(bundle, steps)
    x = x * sched.init_noise_sigma
    return ddim_loop(sched, x, guide.noise_fn(bundle, cond, uncond, scale, infos), on_step=on_step)


@torch.no_grad()
def sample_images(bundle, items: Sequence[Item], steps: int = 50, guide=None, batch_size: int = 32,
                  progress: bool = True, on_batch: Optional[Callable] = None, on_step: Optional[StepFn] = None,
                  decode: bool = True) -> tuple[torch.Tensor, list[dict]]:
    """Generate images (N, 3, H, W) in [0, 1] for items (``decode=False``: their final latents); also returns each
    item's guide info (e.g. w, scores). ``on_step`` watches the first drawing of each batch, not an image gate's
    redraws."""
    steps = check_number("number of inference steps", steps, low=1, integer=True)
    batch_size = check_number("batch size", batch_size, low=1, integer=True)
    guide = guide or PlainGuide()
    images, infos_all = [None] * len(items), [None] * len(items)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault((it.height, it.width), []).append(i)
    bar = tqdm(total=len(items), desc=f"generate ({guide.name})", disable=not progress, unit="img")
    for idxs in groups.values():
        for b in range(0, len(idxs), batch_size):
            chunk = idxs[b:b + batch_size]
            batch = [items[i] for i in chunk]
            infos = guide.prepare(bundle, batch)
            latents = sample_latents(bundle, batch, steps, guide, infos, on_step=on_step)
            if hasattr(guide, "review"):  # an image gate looks at what was drawn and may redraw some of it
                latents, infos = guide.review(bundle, batch, latents, infos,
                                              lambda rows, new: sample_latents(bundle, [batch[r] for r in rows], steps,
                                                                               guide, new))
            imgs = bundle.codec.decode(latents).cpu() if decode else latents.cpu()
            for j, i in enumerate(chunk):
                images[i], infos_all[i] = imgs[j], infos[j]
            if on_batch is not None:
                on_batch(batch, imgs, infos)
            bar.update(len(chunk))
    bar.close()
    return torch.stack(images) if images else torch.empty(0), infos_all


@torch.no_grad()
def sample_latents_batched(bundle, items: Sequence[Item], steps: int = 50, guide=None, batch_size: int = 32,
                           progress: bool = False, desc: str = "sample") -> torch.Tensor:
    """Final latents of items that share a size, in batches, without decoding (what a detector reads)."""
    steps = check_number("number of inference steps", steps, low=1, integer=True)
    batch_size = check_number("batch size", batch_size, low=1, integer=True)
    guide = guide or PlainGuide()
    out = []
    with tqdm(total=len(items), desc=desc, unit="img", disable=not progress) as bar:
        for b in range(0, len(items), batch_size):
            batch = list(items[b:b + batch_size])
            out.append(sample_latents(bundle, batch, steps, guide, guide.prepare(bundle, batch)))
            bar.update(len(batch))
    return torch.cat(out)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


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


def item_metadata(item: Item, steps: int, model: str, info: dict, extra: Optional[dict] = None) -> dict:
    meta = {"prompt": item.prompt, "seed": item.seed, "guidance": item.guidance, "steps": steps, "sampler": "ddim",
            "eta": 0.0, "height": item.height, "width": item.width, "model": model,
            "prompt_index": item.prompt_index, "sample_index": item.sample_index}
    if item.negative_prompt:
        meta["negative_prompt"] = item.negative_prompt
    if item.noise is not None:
        meta["initial_noise"] = "given (latents=)"
    meta.update(item.extra)
    meta.update(info)
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

