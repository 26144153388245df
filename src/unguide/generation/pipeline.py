"""A diffusers pipeline around the bundle, an erasure run and UnGuidance.

    pipe = UnGuidePipeline.from_pretrained("toyworld")  # or a Stable Diffusion directory / hub id; torch_dtype=...
    pipe.load_erasure("runs/sun")
    out = pipe(["a photo of the sun", "a photo of the boat"], num_images_per_prompt=4, seed=0)
    out.images[0], out.w, out.scores
    pipe.save_pretrained("my_model")  # the base model and its settings; UnGuidePipeline.from_pretrained("my_model")

The components (unet, vae, text_encoder, tokenizer, scheduler; SDXL's text_encoder_2 and tokenizer_2) are registered as in any diffusers pipeline, and the
model's own settings (name, max_length, default_guidance, image_size, text_states, text_scale, info) are stored in its
config, so a saved toy model loads back as itself. The rest of unguide works on the :class:`~unguide.models.loading.ModelBundle`
the pipeline derives from its components (``pipe.bundle``). ``unguide generate`` runs through the same pipeline
(:meth:`UnGuidePipeline.generate_to`): one way from prompts to images, whether from Python or the command line.

How the run guides is a :class:`~unguide.guidance.unguidance.GuidanceConfig` (``pipe(..., unguidance=GuidanceConfig(gate=
"empty"))``); what it leaves unset defaults to what the run's recipe recommends (the image gate with ``keep="base"``
for selective runs; the paper's ``gate="empty"``, ``keep="paper"`` for reference runs).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from ..errors import UnguideError
from ..io import output_lock
from ..sampling.ddim import sampler_name
from ..sampling.images import Item, PlainGuide, sample_images, to_uint8
from ..guidance.config import GuidanceConfig
from .folders import ImageFolder
from .prompts import PromptRow, check_request, plan_items
from ..models.loading import DEFAULT_MODEL, ModelBundle, load_model, native_image_size, normalised_scheduler

COMPONENTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler", "text_encoder_2", "tokenizer_2", "text_encoder_3",
              "tokenizer_3")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class UnGuideOutput(BaseOutput):
    images: Any  # prompt-major (all images of prompt 0, then prompt 1, ...): PIL images, or (N, H, W, 3) array / (N, 3, H, W) tensor in [0, 1], or (N, C, h, w) latents
    prompts: list = field(default_factory=list)
    seeds: list = field(default_factory=list)
    w: list = field(default_factory=list)  # per image (equal for images of one prompt); None without an erasure run
    scores: list = field(default_factory=list)  # per image: {"score": d(c), "threshold": the gate's, ...}; a group run adds
    # "concepts" (those the image was erased for) and each member's scores ("members", "image_scores")
    decisions: list = field(default_factory=list)  # per image: its Decision (unguide.guidance.decision), None without a run


class UnGuidePipeline(DiffusionPipeline):
    """Stable-Diffusion-style components plus an optional erasure run; generation is :func:`sample_images`."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->unet->vae"
    # SDXL's and SD3's second encoder, SD3's T5 (models.families); ``unet`` is the denoiser (an MMDiT for SD3)
    _optional_components = ["text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"]

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, name: Optional[str] = None,
                 max_length: Optional[int] = None, default_guidance: float = 7.5, image_size: Optional[int] = None,
                 text_states: str = "contextual", text_scale: float = 1.0, info: Optional[dict] = None,
                 text_encoder_2=None, tokenizer_2=None, zeros_for_empty: bool = False, text_encoder_3=None,
                 tokenizer_3=None, t5_length: int = 256):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              scheduler=normalised_scheduler(scheduler), text_encoder_2=text_encoder_2,
                              tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
        self.register_to_config(name=str(name or getattr(unet.config, "_name_or_path", "") or "model"),
                                max_length=int(max_length or tokenizer.model_max_length),
                                default_guidance=float(default_guidance),
                                image_size=int(image_size or native_image_size(unet, vae)),
                                text_states=str(text_states), text_scale=float(text_scale), info=dict(info or {}),
                                zeros_for_empty=bool(zeros_for_empty), t5_length=int(t5_length))
        self._bundle: Optional[ModelBundle] = None
        self.adapter = None
        self.erasure = None  # the attached run (unguide.erasure.runs: ErasureRun or GroupRun)
        self.erasure_dir: Optional[str] = None

    # ----------------------------------------------------------------------------------------------- loading, saving
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike = DEFAULT_MODEL, torch_dtype=None,
                        device: str | torch.device = "cpu", **kwargs) -> "UnGuidePipeline":
        """``toyworld``, a Stable Diffusion directory or hub id, or a directory written by :meth:`save_pretrained`,
        through :func:`unguide.models.loading.load_model` (``torch_dtype``: a torch dtype or 'float16'/'bfloat16'/'float32')."""
        if kwargs:
            raise UnguideError(f"UnGuidePipeline.from_pretrained takes torch_dtype and device, not {', '.join(kwargs)}")
        return cls.from_bundle(load_model(pretrained_model_name_or_path, device=device, dtype=torch_dtype))

    @classmethod
    def from_bundle(cls, bundle: ModelBundle) -> "UnGuidePipeline":
        """The pipeline over a loaded bundle's components (the bundle itself, with its fingerprint, is kept)."""
        pipe = cls(vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer, unet=bundle.unet,
                   scheduler=bundle.scheduler, name=bundle.name, max_length=bundle.max_length,
                   default_guidance=bundle.default_guidance, image_size=bundle.image_size,
                   text_states=bundle.text_states, text_scale=bundle.text_scale, info=bundle.info,
                   text_encoder_2=bundle.text_encoder_2, tokenizer_2=bundle.tokenizer_2,
                   zeros_for_empty=bundle.zeros_for_empty, text_encoder_3=bundle.text_encoder_3,
                   tokenizer_3=bundle.tokenizer_3, t5_length=bundle.t5_length)
        bundle.scheduler = pipe.scheduler
        pipe._bundle = bundle
        return pipe

    @property
    def bundle(self) -> ModelBundle:
        """What the rest of unguide consumes; rebuilt when a component is replaced (``pipe.unet = ...``)."""
        b = self._bundle
        if b is None or any(getattr(b, k) is not getattr(self, k) for k in COMPONENTS):
            c = self.config
            for m in (self.text_encoder, self.text_encoder_2, self.text_encoder_3, self.vae):
                if m is not None:
                    m.requires_grad_(False)
            b = ModelBundle(self.unet, self.text_encoder, self.tokenizer, self.scheduler, self.vae, name=c.name,
                            max_length=c.max_length, default_guidance=c.default_guidance, image_size=c.image_size,
                            info=dict(c.info), text_states=c.text_states, text_scale=c.text_scale,
                            text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
                            zeros_for_empty=bool(c.get("zeros_for_empty", False)),
                            text_encoder_3=self.text_encoder_3, tokenizer_3=self.tokenizer_3,
                            t5_length=int(c.get("t5_length", 256)))
            self._bundle = b
        return b

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Save the base model and its settings (safetensors), replacing ``save_directory`` atomically. An attached
        erasure run is not baked in: it stays in its run directory and is attached again after saving."""
        if kwargs.pop("safe_serialization", True) is not True:
            raise UnguideError("unguide saves weights as safetensors only (safe_serialization=True)")
        run = self.erasure_dir
        self.unload_erasure()
        try:
            with _atomic_dir(save_directory) as tmp:
                super().save_pretrained(str(tmp), safe_serialization=True, **kwargs)
        finally:
            if run is not None:
                self.load_erasure(run)

    def to(self, *args, **kwargs) -> "UnGuidePipeline":
        """diffusers' ``to(device)`` / ``to(dtype)``; the bundle follows (its text cache is dropped, and a cast keeps
        the fingerprint of the weights as they were, so erasure runs still attach)."""
        dtype = kwargs.get("dtype", next((a for a in args if isinstance(a, torch.dtype)), None))
        if dtype is not None and dtype != self.unet.dtype:
            self.bundle.keep_fingerprint()
        super().to(*args, **kwargs)
        self.bundle.clear_text_cache()
        return self

    # ------------------------------------------------------------------------------------------------ memory habits
    def enable_vae_slicing(self) -> None:
        """Decode a batch one image at a time (less memory for large batches)."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        self.vae.disable_slicing()

    def enable_vae_tiling(self) -> None:
        """Decode large images tile by tile."""
        self.vae.enable_tiling()

    def disable_vae_tiling(self) -> None:
        self.vae.disable_tiling()

    def enable_model_cpu_offload(self, *args, **kwargs):
        raise UnguideError("UnGuidePipeline samples with all components on one device: use pipe.to('cuda') "
                           "(and torch_dtype=torch.float16 to save memory) instead of CPU offload")

    enable_sequential_cpu_offload = enable_model_cpu_offload

    # ---------------------------------------------------------------------------------------------------- erasure
    def load_erasure(self, run_dir: str | os.PathLike):
        """Attach a finished ``unguide erase`` run, one concept or a group (replacing any attached one); returns the
        run (:class:`~unguide.erasure.runs.ErasureRun` or :class:`~unguide.erasure.runs.GroupRun`)."""
        from ..erasure.runs import load_run

        self.unload_erasure()
        run = load_run(run_dir)
        self.adapter, self.erasure = run.attach(self.bundle), run
        self.erasure_dir = str(run_dir)
        return self.erasure

    def unload_erasure(self) -> None:
        """Back to the base model."""
        if self.adapter is not None:
            self.adapter.remove()
        self.adapter, self.erasure, self.erasure_dir = None, None, None

    def guide(self, config: Optional[GuidanceConfig] = None):
        """What the denoiser does at each step: plain classifier-free guidance without an erasure run; with one,
        the guide ``config`` describes (None: the run's recipe's defaults, UnGuidance with its stored gate)."""
        if self.adapter is None:
            if config is not None and not config.is_default:
                raise UnguideError("UnGuidance settings need an erasure run: call pipe.load_erasure(RUN_DIR) first")
            return PlainGuide()
        return self.erasure.guide(self.adapter, config)

    def erasure_info(self, guide) -> Optional[dict]:
        """The attached run and the guide's settings, as recorded with generated images (None without a run)."""
        if self.adapter is None:
            return None
        return {"run": self.erasure_dir, "concept": self.erasure.name, "preset": self.erasure.preset,
                **guide.settings(), "note": guide.note}

    # -------------------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str], num_images_per_prompt: int = 1, seed: int = 0,
                 generator: Optional[torch.Generator] = None, guidance_scale: Optional[float] = None,
                 num_inference_steps: int = 50, unguidance: Optional[GuidanceConfig] = None,
                 height: Optional[int] = None, width: Optional[int] = None, batch_size: int = 32,
                 progress: Optional[bool] = None, output_type: str = "pil", return_dict: bool = True,
                 negative_prompt: Optional[str | Sequence[str]] = None, latents: Optional[torch.Tensor] = None,
                 callback_on_step_end: Optional[Callable] = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",)):
        """Generate, with diffusers' conventions: image j of every prompt uses seed+j (``generator``, if given, draws
        the base seed), or the initial noise in ``latents`` ((prompts x num_images_per_prompt, C, h, w), prompt-major);
        ``negative_prompt`` replaces "" on the unconditional side of guidance; ``callback_on_step_end(pipe, step,
        timestep, {"latents": ...})`` runs after every step of each batch and may return replaced latents;
        ``output_type`` "pil", "np", "pt" or "latent"; ``unguidance`` how an attached erasure run guides (None: its
        recipe's defaults). ``progress`` defaults to the pipeline's
        ``set_progress_bar_config(disable=...)``."""
        if output_type not in OUTPUT_TYPES:
            raise UnguideError(f"unknown output_type {output_type!r}: use {', '.join(OUTPUT_TYPES)}")
        unknown = set(callback_on_step_end_tensor_inputs) - {"latents"}
        if unknown:
            raise UnguideError(f"callback_on_step_end_tensor_inputs may name only 'latents' (got {sorted(unknown)})")
        if generator is not None:
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        items = self.plan(prompt, num_images_per_prompt, seed, guidance_scale, height, width, num_inference_steps)
        self._attach_inputs(items, num_images_per_prompt, negative_prompt, latents)
        guide = self.guide(unguidance)
        if getattr(guide, "note", None):
            warnings.warn(guide.note, stacklevel=2)
        if progress is None:
            progress = not getattr(self, "_progress_bar_config", {}).get("disable", False)
        def on_step(i, t, x):  # diffusers' callback_on_step_end over one batch's latents
            returned = callback_on_step_end(self, i, t, {"latents": x})
            return (returned or {}).get("latents")

        imgs, decisions = sample_images(self.bundle, items, steps=num_inference_steps, guide=guide,
                                        batch_size=batch_size, progress=progress,
                                        on_step=on_step if callback_on_step_end else None, decode=output_type != "latent")
        if output_type == "pil":
            from PIL import Image

            images: Any = [Image.fromarray(to_uint8(im)) for im in imgs]
        else:
            images = imgs.permute(0, 2, 3, 1).numpy() if output_type == "np" else imgs
        out = UnGuideOutput(images=images, prompts=[it.prompt for it in items], seeds=[it.seed for it in items],
                            w=[d.w if d is not None else None for d in decisions],
                            scores=[d.scores() if d is not None else {} for d in decisions], decisions=decisions)
        return out if return_dict else out.to_tuple()

    def plan(self, prompt, num_images_per_prompt: int = 1, seed: int = 0, guidance_scale: Optional[float] = None,
             height: Optional[int] = None, width: Optional[int] = None, num_inference_steps: int = 50) -> list[Item]:
        """The images a request draws, checked before any work: one :class:`~unguide.sampling.images.Item` per
        image, prompt-major, image j of a prompt with seed+j (a :class:`~unguide.generation.prompts.PromptRow`'s own
        seed, guidance and size where it has them). ``prompt``: a string, strings or prompt rows."""
        prompts = [prompt] if isinstance(prompt, (str, PromptRow)) else list(prompt)
        rows = [p if isinstance(p, PromptRow) else PromptRow(p) for p in prompts]
        check_request(rows, num_images_per_prompt, num_inference_steps)
        scale = guidance_scale if guidance_scale is not None else self.config.default_guidance
        size = self.config.image_size
        items = plan_items(rows, num_images_per_prompt, seed, scale, size if height is None else height,
                           size if width is None else width)
        for it in items:
            self.bundle.latent_shape(it.height, it.width)  # sizes the model can draw, before any work
        return items

    def _attach_inputs(self, items, per_prompt: int, negative_prompt, latents) -> None:
        """Per-image negative prompts and initial noise, checked against the request's shape."""
        n_prompts = len(items) // per_prompt
        if negative_prompt is not None:
            negatives = [negative_prompt] * n_prompts if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) != n_prompts or not all(isinstance(n, str) for n in negatives):
                raise UnguideError(f"negative_prompt must be a string or one string per prompt ({n_prompts})")
            for it in items:
                it.negative_prompt = negatives[it.prompt_index]
        if latents is not None:
            want = (len(items), *self.bundle.latent_shape(items[0].height, items[0].width))
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != want:
                got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
                raise UnguideError(f"latents must be a tensor of shape {want} (prompts x num_images_per_prompt, "
                                   f"channels, height/8, width/8), got {got}")
            if not torch.isfinite(latents).all():
                raise UnguideError("latents hold NaN or infinite values")
            for it, noise in zip(items, latents):
                it.noise = noise

    def generate_to(self, items, out: str | os.PathLike, num_inference_steps: int = 50, guide=None,
                    batch_size: int = 32, run_info: Optional[dict] = None, progress: bool = True) -> Path:
        """Draw items into a folder (:class:`~unguide.generation.folders.ImageFolder`: PNGs with metadata,
        index.jsonl, a grid); resumable (finished images are kept), one job per folder, and split across processes
        under ``accelerate launch`` (what ``unguide generate``, the benchmark, the attack and the page do)."""
        from accelerate import PartialState

        guide = guide or self.guide()
        state = PartialState()
        extra = {"guide": guide.name, "sampler": sampler_name(self.bundle),
                 **{k: run_info[k] for k in ("erasure", "dtype") if run_info and run_info.get(k)}}
        with output_lock(out, "a generation"):
            folder = ImageFolder(out, num_inference_steps, self.bundle.name, extra)
            folder.check_guide(run_info)
            if state.is_main_process and run_info is not None:
                folder.write_run_info(run_info)
            todo = folder.todo(list(items)[state.process_index::state.num_processes])
            if todo:
                sample_images(self.bundle, todo, steps=num_inference_steps, guide=guide, batch_size=batch_size,
                              progress=progress and state.is_main_process, on_batch=folder.save)
            state.wait_for_everyone()
            if state.is_main_process:
                folder.finish(items)
        return Path(out)


def as_pipeline(model) -> UnGuidePipeline:
    """``model`` itself if it is an :class:`UnGuidePipeline`, else the pipeline over a loaded
    :class:`~unguide.models.loading.ModelBundle`: what the benchmark, the attack and the demo draw through."""
    return model if isinstance(model, UnGuidePipeline) else UnGuidePipeline.from_bundle(model)


@contextmanager
def _atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; swap it in for ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
