"""One loader for every model: a world's model (the embedded toy model, through its plug-in), a local diffusers
Stable Diffusion directory, or a hub id. Everything downstream sees only the :class:`ModelBundle` it returns.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..errors import UnguideError
from .families import ModelFamily, check_sdxl_unet, encode_sdxl, family_of, install_sdxl_conditioning, sdxl_pooled_dim
from .transformers import encode_flux, encode_sd3, install_transformer_conditioning, is_transformer
from .text import encode_text
from .prediction import Prediction, is_flow_scheduler

DEFAULT_MODEL = "toyworld"  # the embedded model, a world plug-in (unguide.models.worlds)
SAVED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
OPTIONAL_COMPONENTS = ("text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")  # SDXL's / SD3's; null otherwise
SAVED_LIBRARIES = ("diffusers", "transformers")  # the only libraries a saved directory may name for its components
PIPELINE_CLASS = "UnGuidePipeline"  # model_index.json's _class_name in a directory written by UnGuidePipeline.save_pretrained

# --dtype names -> torch dtypes: the precision the frozen model runs in (trained erasure weights stay float32)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype) -> Optional[torch.dtype]:
    """A torch dtype from a name ('bfloat16'), a torch dtype, or None (keep the weights' own, float32)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in DTYPES:
        raise UnguideError(f"unknown dtype {dtype!r}: use {', '.join(DTYPES)}")
    return DTYPES[str(dtype)]


def quiet_libraries() -> None:
    """Silence diffusers/transformers loading bars and advisory warnings: our own progress bars and one-line
    errors are what a user reads."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    for lib in (dlog, tlog):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


class LatentCodec:
    """Images in [0, 1] <-> the denoiser's normalised latents, honouring the VAE's config
    (scaling_factor, and shift_factor or per-channel latents_mean/latents_std when present)."""

    def __init__(self, vae):
        self.vae = vae
        cfg = vae.config
        self.scale = float(cfg.scaling_factor)
        self.shift = float(cfg.shift_factor) if getattr(cfg, "shift_factor", None) is not None else 0.0
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        self.mean = torch.tensor(mean).view(1, -1, 1, 1) if mean is not None else None
        self.std = torch.tensor(std).view(1, -1, 1, 1) if std is not None else None
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.channels = int(cfg.latent_channels)

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        if self.mean is not None:
            return (z - self.mean.to(z)) * self.scale / self.std.to(z)
        return (z - self.shift) * self.scale

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        if self.mean is not None:
            return latents * self.std.to(latents) / self.scale + self.mean.to(latents)
        return latents / self.scale + self.shift

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        dist = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return self.normalise(z)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.vae.decode(self.denormalise(latents).to(self.vae.dtype)).sample
        return ((x.float() + 1) / 2).clamp(0, 1)


@dataclass
class ModelBundle:
    """The components every part of unguide works with, whatever the model's origin."""

    unet: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    vae: Any
    name: str
    max_length: int
    default_guidance: float = 7.5
    image_size: int = 512
    info: dict = field(default_factory=dict)
    text_states: str = "contextual"
    text_scale: float = 1.0  # toy models: states are scaled to CLIP's token norm (see toyworld.train.export_toyworld)
    text_encoder_2: Any = None  # SDXL's and SD3's second encoder and tokenizer (models.families)
    tokenizer_2: Any = None
    zeros_for_empty: bool = False  # SDXL's force_zeros_for_empty_prompt: "" is encoded as zeros
    text_encoder_3: Any = None  # SD3's T5 and its tokenizer, read to ``t5_length`` tokens (the stock default 256)
    tokenizer_3: Any = None
    t5_length: int = 256

    def __post_init__(self):
        self.codec = LatentCodec(self.vae)
        self._text_cache: dict[str, torch.Tensor] = {}
        self._fingerprint: Optional[str] = None  # pinned by keep_fingerprint before a cast
        if is_transformer(self.unet):
            install_transformer_conditioning(self.unet, self.default_guidance)
        elif self.text_encoder_2 is not None:
            problem = check_sdxl_unet(self.unet, self.text_encoder_2)
            if problem:
                raise UnguideError(f"{self.name}: {problem} (docs/model-families.md)")
            install_sdxl_conditioning(self.unet, sdxl_pooled_dim(self.text_encoder_2), self.codec.downsample)

    @property
    def family(self) -> ModelFamily:
        """SD 1.x, SD 2.x or SDXL (models.families): recorded with every run and image."""
        return family_of(self.unet, self.scheduler, self.text_encoder_2)

    @property
    def prediction(self) -> Prediction:
        """What the denoiser's output stands for (noise or v): every reader of the output converts through it."""
        return Prediction.of(self.scheduler)

    @property
    def text_encoders(self) -> list:
        return [m for m in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if m is not None]

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token states for prompts (packed with the pooled vector where the family reads one), cached per prompt
        string (prompts repeat a lot)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            self._text_cache.update(zip(missing, self._encode(missing)))
        return torch.stack([self._text_cache[p] for p in prompts])

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        """The family's encoding, told by its text encoders (a T5 third: SD3; a T5 second: Flux; a CLIP second:
        SDXL), so it stays the same whatever denoiser is put in the bundle."""
        tokenizers = (self.tokenizer, self.tokenizer_2, self.tokenizer_3)
        if self.text_encoder_3 is not None:
            return encode_sd3(self.text_encoders, tokenizers, prompts, self.max_length, self.t5_length)
        if type(self.text_encoder_2).__name__.startswith("T5"):
            return encode_flux(self.text_encoders, tokenizers[:2], prompts, self.max_length, self.t5_length)
        if self.text_encoder_2 is not None:
            return encode_sdxl(self.text_encoders, tokenizers[:2], prompts, self.max_length, self.zeros_for_empty)
        states = encode_text(self.text_encoder, self.tokenizer, prompts, self.max_length, self.text_states)
        return states * self.text_scale if self.text_scale != 1.0 else states

    def latent_shape(self, height: Optional[int] = None, width: Optional[int] = None) -> tuple[int, int, int]:
        h, w = height or self.image_size, width or self.image_size
        f = self.codec.downsample
        if h % f or w % f:
            raise UnguideError(f"image size {h}x{w} is not a multiple of {f}: pick a height and width divisible by {f}")
        return (self.codec.channels, h // f, w // f)

    def fingerprint(self) -> str:
        """A short hash of the denoiser's weights: ties an erasure run to the base it was trained on. After a cast to
        another precision it stays the hash of the weights as loaded (see :meth:`keep_fingerprint`)."""
        if self._fingerprint is not None:
            return self._fingerprint
        h = hashlib.sha256()
        for name, p in sorted(self.unet.state_dict().items()):
            if "lora" in name:
                continue
            name = name.replace(".base_layer.", ".")  # the same weight, whether or not an adapter wraps its layer
            t = p.detach().float().flatten()
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            idx = torch.linspace(0, t.numel() - 1, steps=min(64, t.numel())).long()
            h.update(t[idx].cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def keep_fingerprint(self) -> None:
        """Pin the fingerprint to the weights as they are now, before a cast rounds them: a run erased in float32
        then attaches to the same model in bfloat16 or float16, and the other way round."""
        if self._fingerprint is None:
            self._fingerprint = self.fingerprint()

    def clear_text_cache(self) -> None:
        """Forget cached token states (they live on the old device, in the old dtype)."""
        self._text_cache.clear()

    def to(self, device=None, dtype=None) -> "ModelBundle":
        """Move and/or cast every module (dtype: a torch dtype or a name such as 'bfloat16')."""
        dtype = resolve_dtype(dtype)
        if dtype is not None and dtype != self.unet.dtype:
            self.keep_fingerprint()
        target = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for m in (self.unet, *self.text_encoders, self.vae):
            m.to(**target)
        if dtype == torch.float16 and self.family.name == "sdxl" and getattr(self.vae.config, "force_upcast", False):
            self.vae.to(dtype=torch.float32)  # SDXL's VAE overflows in float16; its stock pipeline upcasts it too
        self.clear_text_cache()
        return self


def native_image_size(unet, vae) -> int:
    """The image size a denoiser was built for: its latent sample size times the VAE's downsampling (Flux has none:
    FluxPipeline's default of 128 latent pixels)."""
    return int(getattr(unet.config, "sample_size", None) or 128) * (2 ** (len(vae.config.block_out_channels) - 1))


def normalised_scheduler(scheduler):
    """The DDIM scheduler every unguide sampler uses (no sample clipping, no final alpha of one) over a model's noise
    schedule; a scheduler that already is one is kept as it is."""
    from diffusers import DDIMScheduler

    cfg = scheduler.config
    if is_flow_scheduler(scheduler):
        return scheduler  # a flow model's own FlowMatchEulerDiscreteScheduler (sampling.ddim.make_sampler reads it)
    if isinstance(scheduler, DDIMScheduler) and not cfg.clip_sample and not cfg.set_alpha_to_one:
        return scheduler
    return ddim_scheduler(cfg)


def ddim_scheduler(scheduler_config: dict):
    """The DDIM sampler every part of unguide uses, from any SD scheduler's config."""
    from diffusers import DDIMScheduler

    cfg = dict(scheduler_config)
    cfg.update(clip_sample=False, set_alpha_to_one=False)
    return DDIMScheduler.from_config(cfg)


def _load_diffusers(name_or_path: str, kind: str = "sd") -> ModelBundle:
    """A Stable Diffusion, SDXL (``kind`` "xl"), SD3 ("sd3") or Flux ("flux") pipeline, in float32 (load_model casts, after pinning
    the fingerprint)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    if kind == "flux":
        pipe = FluxPipeline.from_pretrained(name_or_path, use_safetensors=True)
        extra = dict(text_encoder_2=pipe.text_encoder_2.eval().requires_grad_(False), tokenizer_2=pipe.tokenizer_2,
                     t5_length=512)  # FluxPipeline's default max_sequence_length
        denoiser, scheduler = pipe.transformer, pipe.scheduler
    elif kind == "sd3":
        pipe = StableDiffusion3Pipeline.from_pretrained(name_or_path, use_safetensors=True)
        extra = dict(text_encoder_2=pipe.text_encoder_2.eval().requires_grad_(False), tokenizer_2=pipe.tokenizer_2,
                     text_encoder_3=pipe.text_encoder_3.eval().requires_grad_(False), tokenizer_3=pipe.tokenizer_3)
        denoiser, scheduler = pipe.transformer, pipe.scheduler
    elif kind == "xl":
        pipe = StableDiffusionXLPipeline.from_pretrained(name_or_path, use_safetensors=True)
        extra = dict(text_encoder_2=pipe.text_encoder_2.eval().requires_grad_(False), tokenizer_2=pipe.tokenizer_2,
                     zeros_for_empty=bool(pipe.config.force_zeros_for_empty_prompt))
        denoiser, scheduler = pipe.unet, ddim_scheduler(pipe.scheduler.config)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(name_or_path, safety_checker=None, requires_safety_checker=False,
                                                       use_safetensors=True)
        extra, denoiser, scheduler = {}, pipe.unet, ddim_scheduler(pipe.scheduler.config)
    family = family_of(denoiser, scheduler, extra.get("text_encoder_2"))
    return ModelBundle(denoiser.eval(), pipe.text_encoder.eval().requires_grad_(False), pipe.tokenizer, scheduler,
                       pipe.vae.eval(), name=str(name_or_path), max_length=int(pipe.tokenizer.model_max_length),
                       default_guidance=family.default_guidance, image_size=native_image_size(denoiser, pipe.vae),
                       **extra)


def _load_saved_pipeline(path: Path) -> ModelBundle:
    """A directory written by UnGuidePipeline.save_pretrained: its components (each loaded by the diffusers or
    transformers class model_index.json names, weights from safetensors) plus the model's own settings."""
    import importlib

    index = json.loads((path / "model_index.json").read_text())
    parts = {}
    optional = [n for n in OPTIONAL_COMPONENTS if (index.get(n) or [None])[0] is not None]
    for name in (*SAVED_COMPONENTS, *optional):
        library, cls_name = index.get(name) or (None, None)
        if library not in SAVED_LIBRARIES or not str(cls_name).isidentifier():
            raise UnguideError(f"{path}/model_index.json names no loadable {name} ({library}.{cls_name}): "
                               "save the pipeline again with UnGuidePipeline.save_pretrained")
        cls = getattr(importlib.import_module(library), cls_name)
        kwargs = {} if name in ("tokenizer", "scheduler") else {"use_safetensors": True}
        parts[name] = cls.from_pretrained(str(path / name), **kwargs)
    for encoder in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if encoder in parts:
            parts[encoder].eval().requires_grad_(False)
    return ModelBundle(parts["unet"].eval(), parts["text_encoder"], parts["tokenizer"],
                       normalised_scheduler(parts["scheduler"]), parts["vae"].eval(),
                       name=str(index.get("name") or path.name), max_length=int(index["max_length"]),
                       default_guidance=float(index["default_guidance"]), image_size=int(index["image_size"]),
                       info=dict(index.get("info") or {}), text_states=str(index.get("text_states", "contextual")),
                       text_scale=float(index.get("text_scale", 1.0)), text_encoder_2=parts.get("text_encoder_2"),
                       tokenizer_2=parts.get("tokenizer_2"), zeros_for_empty=bool(index.get("zeros_for_empty", False)),
                       text_encoder_3=parts.get("text_encoder_3"), tokenizer_3=parts.get("tokenizer_3"),
                       t5_length=int(index.get("t5_length", 256)))


def _saved_class(path: Path) -> Optional[str]:
    try:
        return json.loads((path / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def _pipeline_kind(path, index: Optional[dict] = None) -> str:
    """Which loader a diffusers pipeline (a directory, or a hub id with its model_index.json given) needs: "sd"
    (SD 1.x / 2.x), "xl" (two text encoders), "sd3" (an SD3Transformer2DModel) or "flux" (FluxPipeline); refuse, in one line, what unguide
    does not run (SDXL refiners, other transformers) (docs/model-families.md)."""
    if index is None:
        try:
            index = json.loads((Path(path) / "model_index.json").read_text())
        except (OSError, ValueError):
            return "sd"  # diffusers says what is wrong with it
    name = str(index.get("_class_name", ""))
    if "transformer" in index:
        transformer = (index.get("transformer") or [None, None])[1]
        if transformer == "SD3Transformer2DModel" and "text_encoder_3" in index:
            return "sd3"
        if transformer == "FluxTransformer2DModel" and name == "FluxPipeline":
            return "flux"
        raise UnguideError(f"{path} has a transformer unguide does not run yet ({name or 'unknown pipeline'}): unguide "
                           "runs SD 1.x, SD 2.x, SDXL, SD3 / SD3.5 and Flux text-to-image pipelines (docs/model-families.md)")
    if "unet" not in index:
        raise UnguideError(f"{path} has no UNet and no transformer ({name or 'unknown pipeline'}): unguide runs SD 1.x, "
                           "SD 2.x, SDXL, SD3 / SD3.5 and Flux pipelines (docs/model-families.md)")
    xl = "text_encoder_2" in index or "XL" in name
    if xl and (index.get("text_encoder") or [None])[0] is None:
        raise UnguideError(f"{path} is an SDXL refiner ({name}; no first text encoder): unguide runs SDXL base "
                           "pipelines (docs/model-families.md)")
    return "xl" if xl else "sd"


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def load_model(name_or_path: str = DEFAULT_MODEL, device: str | torch.device = "cpu", dtype=None) -> ModelBundle:
    """Load a world's model by name (``toyworld``, the default), a local diffusers Stable Diffusion directory (or one
    saved by ``UnGuidePipeline.save_pretrained``), or a hub id. ``dtype`` ('float32', 'float16', 'bfloat16' or a torch
    dtype): the weights are loaded in float32, fingerprinted, then cast, so erasure runs attach at any precision."""
    from .worlds import get_world, world_for_directory, world_names

    quiet_libraries()
    dtype = resolve_dtype(dtype)  # a bad name fails before any loading
    name_or_path = str(name_or_path)
    if name_or_path in world_names():
        path = Path(get_world(name_or_path).default_model_dir())
    else:
        path = Path(os.path.expanduser(name_or_path))
    if path.is_dir():
        world = world_for_directory(path)
        if world is not None:
            bundle = world.load_bundle(path)
        elif (path / "model_index.json").is_file() and _saved_class(path) == PIPELINE_CLASS:
            bundle = _load_saved_pipeline(path)
        elif (path / "model_index.json").is_file():
            bundle = _load_diffusers(str(path), _pipeline_kind(path))
        else:
            raise UnguideError(f"{name_or_path} is not a diffusion pipeline directory (no model_index.json): "
                               "point `model` at a diffusers Stable Diffusion folder, a hub id, or use 'toyworld'")
        return bundle.to(device, dtype)
    if path.exists():
        raise UnguideError(f"{name_or_path} is a file, not a model: give a diffusers pipeline directory, a hub id, or 'toyworld'")
    looks_like_path = name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").replace("/", "", 1)
    if looks_like_path or not _HUB_ID.match(name_or_path):
        raise UnguideError(f"model {name_or_path!r} not found: give 'toyworld', an existing diffusers pipeline directory, "
                           "or a hub id such as CompVis/stable-diffusion-v1-4")
    try:
        from diffusers import DiffusionPipeline

        kind = _pipeline_kind(name_or_path, dict(DiffusionPipeline.load_config(name_or_path)))
        return _load_diffusers(name_or_path, kind).to(device, dtype)
    except UnguideError:
        raise
    except Exception as exc:  # hub errors come in many types; the user needs one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnguideError(f"could not load hub model {name_or_path!r} ({first}): check the id and your network, "
                           "or pass a local directory") from exc
