"""Drawing images: one :class:`Item` per image (its seed or initial noise), batches, and the guide's part in each.

What the denoiser does at each step is a *guide* (:class:`Guide`: plain classifier-free guidance here, UnGuidance in
:mod:`unguide.guidance.unguidance`); the loop itself is :func:`unguide.sampling.ddim.ddim_loop`. Writing images to
folders is :mod:`unguide.generation.folders`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import check_number
from .ddim import NoiseFn, StepFn, cfg_noise_fn, ddim_loop, initial_noise, make_sampler


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


class Guide(Protocol):
    """What the sampler asks of a guide, for each batch: ``prepare`` (one decision per image, e.g. UnGuidance's w, or
    None), ``noise_fn`` (the denoiser output at every step under those decisions), ``review`` (look at the finished
    latents and redraw some; the image gate), and for the record ``name``, ``note`` and ``settings()``."""

    name: str
    note: Optional[str]

    def prepare(self, bundle, items: Sequence["Item"]) -> list: ...

    def noise_fn(self, bundle, cond, uncond, scale, decisions: Sequence) -> NoiseFn: ...

    def review(self, bundle, items, latents: torch.Tensor, decisions: list, redraw) -> tuple[torch.Tensor, list]: ...

    def settings(self) -> dict: ...


class PlainGuide:
    """Classifier-free guidance with the model as it is (what Stable Diffusion does): no decisions, no review."""

    name = "base"
    note = None

    def prepare(self, bundle, items: Sequence[Item]) -> list:
        return [None for _ in items]

    def noise_fn(self, bundle, cond, uncond, scale, decisions: Sequence):
        return cfg_noise_fn(bundle.unet, cond, uncond, scale)

    def review(self, bundle, items, latents: torch.Tensor, decisions: list, redraw) -> tuple[torch.Tensor, list]:
        return latents, decisions

    def settings(self) -> dict:
        return {}


@torch.no_grad()
def sample_latents(bundle, items: Sequence[Item], steps: int, guide: Guide, decisions: Sequence,
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
    sampler = make_sampler(bundle, steps, shape)  # Flux shifts its sigmas by the image's size
    x = x * sampler.init_noise_sigma
    return ddim_loop(sampler, x, guide.noise_fn(bundle, cond, uncond, scale, decisions), on_step=on_step)


@torch.no_grad()
def sample_images(bundle, items: Sequence[Item], steps: int = 50, guide=None, batch_size: int = 32,
                  progress: bool = True, on_batch: Optional[Callable] = None, on_step: Optional[StepFn] = None,
                  decode: bool = True) -> tuple[torch.Tensor, list[dict]]:
    """Generate images (N, 3, H, W) in [0, 1] for items (``decode=False``: their final latents); also returns each
    item's decision (:class:`~unguide.guidance.decision.Decision`, None without an erasure run). ``on_step`` watches the first drawing of each batch, not an image gate's
    redraws."""
    steps = check_number("number of inference steps", steps, low=1, integer=True)
    batch_size = check_number("batch size", batch_size, low=1, integer=True)
    guide = guide or PlainGuide()
    images, decisions_all = [None] * len(items), [None] * len(items)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault((it.height, it.width), []).append(i)
    bar = tqdm(total=len(items), desc=f"generate ({guide.name})", disable=not progress, unit="img")
    for idxs in groups.values():
        for b in range(0, len(idxs), batch_size):
            chunk = idxs[b:b + batch_size]
            batch = [items[i] for i in chunk]
            latents, decisions = draw_batch(bundle, batch, steps, guide, on_step)
            imgs = bundle.codec.decode(latents).cpu() if decode else latents.cpu()
            for j, i in enumerate(chunk):
                images[i], decisions_all[i] = imgs[j], decisions[j]
            if on_batch is not None:
                on_batch(batch, imgs, decisions)
            bar.update(len(chunk))
    bar.close()
    return torch.stack(images) if images else torch.empty(0), decisions_all


def draw_batch(bundle, batch: Sequence[Item], steps: int, guide: Guide, on_step: Optional[StepFn] = None,
               redraw=None) -> tuple[torch.Tensor, list]:
    """One batch as every command draws it: the guide decides, the loop draws, the guide reviews (redrawing from the
    same noise through ``redraw(rows, decisions)``, by default :func:`sample_latents` on those rows)."""
    decisions = guide.prepare(bundle, batch)
    latents = sample_latents(bundle, batch, steps, guide, decisions, on_step=on_step)
    redraw = redraw or (lambda rows, new: sample_latents(bundle, [batch[r] for r in rows], steps, guide, new))
    return guide.review(bundle, batch, latents, decisions, redraw)


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
