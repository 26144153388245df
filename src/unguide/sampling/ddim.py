"""The one sampling loop of unguide: DDIM over a diffusion model's noise schedule, Euler over a flow's sigmas.

Erasure training runs it for partial trajectories, influence scoring for the first steps of a
base-model trajectory, and generation for whole ones; only the denoiser-output function differs, and only the
:class:`Sampler`'s step knows which kind of model it integrates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..models.prediction import Prediction
from ..models.transformers import guidance_distilled, is_flux

# eps_fn(x, t, step_index) -> the denoiser's output (noise or v, as the model predicts) for the whole batch x
NoiseFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
# on_step(step_index, t, x) -> None, or a replacement for x (diffusers' callback_on_step_end, one batch at a time)
StepFn = Callable[[int, torch.Tensor, torch.Tensor], Optional[torch.Tensor]]


@dataclass(frozen=True, eq=False)
class Sampler:
    """DDIM (eta 0) over a model's noise schedule, or Euler over a rectified flow's sigmas. DDIM steps in noise space
    (``prediction`` converts the denoiser's output, noise or v, to it); Euler steps along the predicted velocity
    ``x_{i+1} = x_i + (s_{i+1} - s_i) v``, as diffusers' FlowMatchEulerDiscreteScheduler does."""

    scheduler: Any
    prediction: Prediction

    def step(self, output: torch.Tensor, t, x: torch.Tensor, index: int) -> torch.Tensor:
        """The latents after step ``index`` (whose timestep is ``t``) given the denoiser's output there."""
        if self.prediction.kind == "flow":
            sigmas = self.scheduler.sigmas
            dt = float(sigmas[index + 1] - sigmas[index])
            return (x.float() + dt * output.float()).to(output.dtype)
        return self.scheduler.step(self.prediction.noise(output, x, t), t, x, eta=0.0).prev_sample

    @property
    def timesteps(self) -> torch.Tensor:
        return self.scheduler.timesteps

    @property
    def init_noise_sigma(self) -> float:
        """How far N(0, I) noise is scaled to start: 1 for DDIM and for a flow (x_1 is the noise itself)."""
        return getattr(self.scheduler, "init_noise_sigma", 1.0)


def sampler_name(bundle) -> str:
    """What an image records as its sampler: DDIM (eta 0) or, for a rectified flow, Euler over its sigmas."""
    return "flow-euler" if bundle.prediction.kind == "flow" else "ddim"


def make_sampler(bundle, num_steps: int = 50, latent_shape: Optional[Sequence[int]] = None) -> Sampler:
    """A fresh sampler of ``num_steps`` steps: DDIM with the bundle's noise schedule, or, for a flow, the model's own
    FlowMatchEulerDiscreteScheduler sigmas (shifted as its config says; Flux's shift follows the image's token count,
    from ``latent_shape``)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if bundle.prediction.kind == "flow":
        sched = FlowMatchEulerDiscreteScheduler.from_config(bundle.scheduler.config)
        extra = _flow_shift(sched, latent_shape or bundle.latent_shape())
        if is_flux(bundle.unet):  # FluxPipeline's own sigmas: 1 down to 1/N (SD3's: the scheduler's default)
            extra["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)
        sched.set_timesteps(num_steps, **extra)
        return Sampler(sched, bundle.prediction)
    sched = DDIMScheduler.from_config({**bundle.scheduler.config, "prediction_type": "epsilon"})
    sched.set_timesteps(num_steps)
    return Sampler(sched, bundle.prediction)


def _flow_shift(sched, latent_shape: Sequence[int]) -> dict:
    """``mu`` for a scheduler whose shift depends on the image (Flux: linear in the number of 2x2 latent patches
    between ``base_image_seq_len`` and ``max_image_seq_len``, as FluxPipeline computes it); nothing otherwise."""
    cfg = sched.config
    if not cfg.get("use_dynamic_shifting", False):
        return {}
    tokens = (latent_shape[-2] // 2) * (latent_shape[-1] // 2)
    slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    return {"mu": tokens * slope + cfg.base_shift - slope * cfg.base_image_seq_len}


def initial_noise(shape: Sequence[int], seeds: Sequence[int], device="cpu", dtype=torch.float32) -> torch.Tensor:
    """One independent N(0, I) latent per seed: an image's noise never depends on its batch-mates."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(
        device=device, dtype=dtype)


def ddim_loop(sampler: Sampler, x: torch.Tensor, eps_fn: NoiseFn, start: int = 0, stop: Optional[int] = None,
              progress: bool = False, on_step: Optional[StepFn] = None) -> torch.Tensor:
    """Run the sampler from step index ``start`` up to (not including) ``stop`` of its timesteps; ``eps_fn`` returns
    the denoiser's output (noise, v or a velocity: the sampler reads it as the model predicts); ``on_step`` sees the latents after each step
    and may replace them."""
    timesteps = sampler.timesteps[start:stop]
    for offset, t in enumerate(tqdm(timesteps, desc="denoise", leave=False, disable=not progress)):
        x = sampler.step(eps_fn(x, t, start + offset), t, x, start + offset)
        if on_step is not None:
            replaced = on_step(start + offset, t, x)
            x = x if replaced is None else replaced
    return x


def model_output(unet, x: torch.Tensor, t, states: torch.Tensor, **extra) -> torch.Tensor:
    """The denoiser's raw output (noise, v or a velocity, as the model predicts): read it through the bundle's
    :class:`~unguide.models.prediction.Prediction` wherever its meaning matters. ``extra``: a distilled Flux's
    ``guidance``."""
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return unet(x, t, encoder_hidden_states=states, **extra).sample


def cfg_output(unet, x: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor, scale) -> torch.Tensor:
    """Classifier-free guidance, conditional and unconditional in one batched forward (2 evals per image).
    ``scale`` is a float or a per-sample tensor. Flux is guided as FluxPipeline does: one conditional forward, with
    ``scale`` as the guidance embedding of a distilled model (dev) or no guidance at all (schnell); 1 eval per image,
    ``uncond`` not read."""
    if is_flux(unet):
        scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
        extra = {"guidance": scale.expand(x.shape[0]) if scale.ndim == 0 else scale} if guidance_distilled(unet) else {}
        return model_output(unet, x, t, cond, **extra)
    both = model_output(unet, torch.cat([x, x]), t, torch.cat([uncond, cond]))
    e_uncond, e_cond = both.chunk(2)
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    if scale.ndim == 1:
        scale = scale.view(-1, 1, 1, 1)
    return e_uncond + scale * (e_cond - e_uncond)


def cfg_noise_fn(unet, cond: torch.Tensor, uncond: torch.Tensor, scale) -> NoiseFn:
    return lambda x, t, i: cfg_output(unet, x, t, cond, uncond, scale)


class EvalCounter:
    """Counts UNet image-evaluations (batch rows through the denoiser), for cost reports."""

    def __init__(self, unet):
        self.count = 0
        self._handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        self.count += int(sample.shape[0])

    def close(self) -> None:
        self._handle.remove()
