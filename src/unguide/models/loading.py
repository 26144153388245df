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
from .prediction import Prediction

DEFAULT_MODEL = "toyworld"  # the embedded model, a world plug-in (unguide.models.worlds)
SAVED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
OPTIONAL_COMPONENTS = ("text_encoder_2", "tokenizer_2")  # SDXL's, null in other families' model_index.json
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


# How token states are formed. "contextual": the encoder's own output at every position (Stable Diffusion's
# CLIP states). The toy model's options make its bidirectional BERT behave more like SD's causal CLIP:
# "causal_eos_pad" gives each token the state of its prefix alone (so a shared template like "a photo of the"
# has the same states in every prompt) and pads with repeated end tokens that see the whole prompt, as CLIP
# pads with EOS; "causal_zero_pad" zeroes the padding instead; "contextual_zero_pad" only zeroes the padding.
TEXT_STATES = ("contextual", "contextual_zero_pad", "causal_zero_pad", "causal_eos_pad")


def _causal_states(text_encoder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """State of token i computed from tokens 0..i only, for every i (one batched pass over all prefixes)."""
    b, n = ids.shape
    prefix = torch.tril(torch.ones(n, n, dtype=mask.dtype, device=mask.device))  # row i keeps keys 0..i
    seq_mask = (prefix[None] * mask[:, None, :]).reshape(b * n, n)
    seq_mask[:, 0] = 1  # every row sees at least the first token
    states = text_encoder(ids.repeat_interleave(n, dim=0), attention_mask=seq_mask)[0]
    return states.reshape(b, n, n, -1).diagonal(dim1=1, dim2=2).permute(0, 2, 1)


@torch.no_grad()
def encode_text(text_encoder, tokenizer, prompts: Sequence[str], max_length: int,
                states: str = "contextual") -> torch.Tensor:
    """Token states (B, max_length, D) of the prompts: what the denoiser's cross-attention reads."""
    if states not in TEXT_STATES:
        raise UnguideError(f"unknown text state mode {states!r}: choose one of {', '.join(TEXT_STATES)}")
    tok = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    device = next(text_encoder.parameters()).device
    ids, full_mask = tok.input_ids.to(device), tok.attention_mask.to(device)
    if states == "causal_eos_pad":
        out = _causal_states(text_encoder, ids.masked_fill(full_mask == 0, tokenizer.sep_token_id),
                             torch.ones_like(full_mask))
    elif states == "causal_zero_pad":
        out = _causal_states(text_encoder, ids, full_mask)
    else:
        mask = full_mask if getattr(text_encoder.config, "use_attention_mask", False) else None
        out = text_encoder(ids, attention_mask=mask)[0]
    if states.endswith("zero_pad"):
        out = out * full_mask[..., None].to(out.dtype)
    return out


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
    text_encoder_2: Any = None  # SDXL's second encoder and tokenizer (models.families)
    tokenizer_2: Any = None
    zeros_for_empty: bool = False  # SDXL's force_zeros_for_empty_prompt: "" is encoded as zeros

    def __post_init__(self):
        self.codec = LatentCodec(self.vae)
        self._text_cache: dict[str, torch.Tensor] = {}
        self._fingerprint: Optional[str] = None  # pinned by keep_fingerprint before a cast
        if self.text_encoder_2 is not None:
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
        return [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token states for prompts, cached per prompt string (prompts repeat a lot)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing and self.text_encoder_2 is not None:
            states = encode_sdxl((self.text_encoder, self.text_encoder_2), (self.tokenizer, self.tokenizer_2), missing,
                                 self.max_length, self.zeros_for_empty)
            self._text_cache.update(zip(missing, states))
        elif missing:
            states = encode_text(self.text_encoder, self.tokenizer, missing, self.max_length, self.text_states)
            if self.text_scale != 1.0:
                states = states * self.text_scale
            self._text_cache.update(zip(missing, states))
        return torch.stack([self._text_cache[p] for p in prompts])

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
    """The image size a denoiser was built for: its latent sample size times the VAE's downsampling."""
    return int(unet.config.sample_size) * (2 ** (len(vae.config.block_out_channels) - 1))


def normalised_scheduler(scheduler):
    """The DDIM scheduler every unguide sampler uses (no sample clipping, no final alpha of one) over a model's noise
    schedule; a scheduler that already is one is kept as it is."""
    from diffusers import DDIMScheduler

    cfg = scheduler.config
    if isinstance(scheduler, DDIMScheduler) and not cfg.clip_sample and not cfg.set_alpha_to_one:
        return scheduler
    return ddim_scheduler(cfg)


def ddim_scheduler(scheduler_config: dict):
    """The DDIM sampler every part of unguide uses, from any SD scheduler's config."""
    from diffusers import DDIMScheduler

    cfg = dict(scheduler_config)
    cfg.update(clip_sample=False, set_alpha_to_one=False)
    return DDIMScheduler.from_config(cfg)


def _load_diffusers(name_or_path: str, xl: bool = False) -> ModelBundle:
    """A Stable Diffusion (or, ``xl``, SDXL) pipeline, in float32 (load_model casts, after pinning the fingerprint)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if xl:
        pipe = StableDiffusionXLPipeline.from_pretrained(name_or_path, use_safetensors=True)
        extra = dict(text_encoder_2=pipe.text_encoder_2.eval().requires_grad_(False), tokenizer_2=pipe.tokenizer_2,
                     zeros_for_empty=bool(pipe.config.force_zeros_for_empty_prompt))
    else:
        pipe = StableDiffusionPipeline.from_pretrained(name_or_path, safety_checker=None, requires_safety_checker=False,
                                                       use_safetensors=True)
        extra = {}
    family = family_of(pipe.unet, pipe.scheduler, extra.get("text_encoder_2"))
    return ModelBundle(pipe.unet.eval(), pipe.text_encoder.eval().requires_grad_(False), pipe.tokenizer,
                       ddim_scheduler(pipe.scheduler.config), pipe.vae.eval(), name=str(name_or_path),
                       max_length=int(pipe.tokenizer.model_max_length), default_guidance=family.default_guidance,
                       image_size=native_image_size(pipe.unet, pipe.vae), **extra)


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
    for encoder in ("text_encoder", "text_encoder_2"):
        if encoder in parts:
            parts[encoder].eval().requires_grad_(False)
    return ModelBundle(parts["unet"].eval(), parts["text_encoder"], parts["tokenizer"],
                       normalised_scheduler(parts["scheduler"]), parts["vae"].eval(),
                       name=str(index.get("name") or path.name), max_length=int(index["max_length"]),
                       default_guidance=float(index["default_guidance"]), image_size=int(index["image_size"]),
                       info=dict(index.get("info") or {}), text_states=str(index.get("text_states", "contextual")),
                       text_scale=float(index.get("text_scale", 1.0)), text_encoder_2=parts.get("text_encoder_2"),
                       tokenizer_2=parts.get("tokenizer_2"), zeros_for_empty=bool(index.get("zeros_for_empty", False)))


def _saved_class(path: Path) -> Optional[str]:
    try:
        return json.loads((path / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def _is_xl(path, index: Optional[dict] = None) -> bool:
    """Whether a diffusers pipeline (a directory, or a hub id with its model_index.json given) is SDXL (two text
    encoders); refuse, in one line, the families unguide does not run (SD3, Flux; SDXL refiners)
    (docs/model-families.md)."""
    if index is None:
        try:
            index = json.loads((Path(path) / "model_index.json").read_text())
        except (OSError, ValueError):
            return False  # diffusers says what is wrong with it
    name = str(index.get("_class_name", ""))
    if "unet" not in index:
        raise UnguideError(f"{path} has no UNet ({name or 'unknown pipeline'}; SD3 and Flux use a transformer): unguide "
                           "runs SD 1.x, SD 2.x and SDXL pipelines (docs/model-families.md)")
    xl = "text_encoder_2" in index or "XL" in name
    if xl and (index.get("text_encoder") or [None])[0] is None:
        raise UnguideError(f"{path} is an SDXL refiner ({name}; no first text encoder): unguide runs SDXL base "
                           "pipelines (docs/model-families.md)")
    return xl


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
            bundle = _load_diffusers(str(path), xl=_is_xl(path))
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

        xl = _is_xl(name_or_path, dict(DiffusionPipeline.load_config(name_or_path)))
        return _load_diffusers(name_or_path, xl=xl).to(device, dtype)
    except UnguideError:
        raise
    except Exception as exc:  # hub errors come in many types; the user needs one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnguideError(f"could not load hub model {name_or_path!r} ({first}): check the id and your network, "
                           "or pass a local directory") from exc
