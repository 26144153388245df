"""A diffusers-style pipeline around the bundle, an erasure run and UnGuidance.

    pipe = UnGuidePipeline.from_pretrained("toyworld")
    pipe.load_erasure("runs/sun")
    out = pipe(["a photo of the sun", "a photo of the boat"], num_images_per_prompt=4, seed=0)
    out.images[0], out.w, out.scores

The gate and the weight of kept prompts default to what the run's recipe recommends (``gate="calibrated"``,
``keep="base"`` for selective runs; the paper's ``gate="empty"``, ``keep="paper"`` for reference runs).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image

from .generation import Item, PlainGuide, sample_images, to_uint8
from .guidance import ScorerConfig, WeightRule, guide_for_run
from .models import ModelBundle, load_model


@dataclass
class UnGuideOutput:
    images: list  # PIL images, prompt-major: all images of prompt 0, then prompt 1, ...
    prompts: list[str]
    seeds: list[int]
    w: list[Optional[float]] = field(default_factory=list)  # per image (equal for images of one prompt)
    scores: list[dict] = field(default_factory=list)  # per image: {"score": d(c), "threshold": the gate's}


class UnGuidePipeline:
    def __init__(self, bundle: ModelBundle):
        self.bundle = bundle
        self.adapter = None
        self.erasure: Optional[dict] = None

    @classmethod
    def from_pretrained(cls, name_or_path: str = "toyworld", device: str = "cpu", dtype=None) -> "UnGuidePipeline":
        return cls(load_model(name_or_path, device=device, dtype=dtype))

    def load_erasure(self, run_dir: str | Path) -> dict:
        from .erase import attach_erasure

        if self.adapter is not None:
            self.adapter.remove()
        self.adapter, self.erasure = attach_erasure(self.bundle, run_dir)
        return self.erasure

    def unload_erasure(self) -> None:
        if self.adapter is not None:
            self.adapter.remove()
        self.adapter, self.erasure = None, None

    @torch.no_grad()
    def __call__(self, prompts: str | Sequence[str], num_images_per_prompt: int = 1, seed: int = 0,
                 generator: Optional[torch.Generator] = None, guidance_scale: Optional[float] = None,
                 num_inference_steps: int = 50, mode: str = "unguide", w: Optional[float] = None,
                 gate: Optional[str] = None, keep: Optional[str] = None, erase_with: Optional[str] = None,
                 scorer: ScorerConfig = ScorerConfig(), rule: WeightRule = WeightRule(),
                 height: Optional[int] = None, width: Optional[int] = None, batch_size: int = 32,
                 progress: bool = True) -> UnGuideOutput:
        """Generate; image j of every prompt uses seed+j (``generator``, if given, draws the base seed)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if generator is not None:
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        scale = guidance_scale if guidance_scale is not None else self.bundle.default_guidance
        h, wd = height or self.bundle.image_size, width or self.bundle.image_size
        items = [Item(p, seed + j, scale, h, wd, prompt_index=i, sample_index=j)
                 for i, p in enumerate(prompts) for j in range(num_images_per_prompt)]
        if self.adapter is None:
            guide = PlainGuide()
        else:
            guide = guide_for_run(self.adapter, self.erasure, mode="fixed" if w is not None else mode, gate=gate, keep=keep,
                                  erase_with=erase_with, scorer=scorer, rule=rule, fixed_w=w)
        imgs, infos = sample_images(self.bundle, items, steps=num_inference_steps, guide=guide, batch_size=batch_size,
                                    progress=progress)
        return UnGuideOutput(images=[Image.fromarray(to_uint8(im)) for im in imgs], prompts=[it.prompt for it in items],
                             seeds=[it.seed for it in items], w=[i.get("w") for i in infos],
                             scores=[{k: i[k] for k in ("score", "threshold", "score_empty") if k in i} for i in infos])
