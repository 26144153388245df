"""The one DDIM sampling loop of unguide.

Erasure training runs it for partial trajectories, influence scoring for the first steps of a
base-model trajectory, and generation for whole ones; only the noise-prediction function differs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..models.prediction import Prediction

# eps_fn(x, t, step_index) -> the denoiser's output (noise or v, as the model predicts) for the whole batch x
NoiseFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
# on_step(step_index, t, x) -> None, or a replacement for x (diffusers' callback_on_step_end, one batch at a time)
StepFn = Callable[[int, torch.Tensor, torch.Tensor], Optional[torch.Tensor]]


@dataclass(frozen=True, eq=False)
class Sampler:
    """DDIM (eta 0) over a model's noise schedule: the scheduler steps in noise space, and ``prediction`` converts the
    denoiser's output (noise or v) to it, so no caller reads the output in the wrong space."""

    scheduler: Any
    prediction: Prediction

    @property
    def timesteps(self) -> torch.Tensor:
        return self.scheduler.timesteps

    @property
    def init_noise_sigma(self) -> float:
        return self.scheduler.init_noise_sigma


def make_sampler(bundle, num_steps: int = 50) -> Sampler:
    """A fresh DDIM sampler of ``num_steps`` steps with the bundle's noise schedule."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config({**bundle.scheduler.config, "prediction_type": "epsilon"})
    sched.set_timesteps(num_steps)
    return Sampler(sched, bundle.prediction)


def initial_noise(shape: Sequence[int], seeds: Sequence[int], device="cpu", dtype=torch.float32) -> torch.Tensor:
    """One independent N(0, I) latent per seed: an image's noise never depends on its batch-mates."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(
        device=device, dtype=dtype)


def ddim_loop(sampler: Sampler, x: torch.Tensor, eps_fn: NoiseFn, start: int = 0, stop: Optional[int] = None,
              progress: bool = False, on_step: Optional[StepFn] = None) -> torch.Tensor:
    """Run DDIM (eta 0) from step index ``start`` up to (not including) ``stop`` of the sampler's timesteps;
    ``eps_fn`` returns the denoiser's output (converted to noise here); ``on_step`` sees the latents after each step
    and may replace them."""
    timesteps = sampler.timesteps[start:stop]
    for offset, t in enumerate(tqdm(timesteps, desc="denoise", leave=False, disable=not progress)):
        eps = sampler.prediction.noise(eps_fn(x, t, start + offset), x, t)
        x = sampler.scheduler.step(eps, t, x, eta=0.0).prev_sample
        if on_step is not None:
            replaced = on_step(start + offset, t, x)
            x = x if replaced is None else replaced
    return x


def model_output(unet, x: torch.Tensor, t, states: torch.Tensor) -> torch.Tensor:
    """The denoiser's raw output (noise or v, as the model predicts): read it through the bundle's
    :class:`~unguide.models.prediction.Prediction` wherever its meaning matters."""
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return unet(x, t, encoder_hidden_states=states).sample


def cfg_output(unet, x: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor, scale) -> torch.Tensor:
    """Classifier-free guidance, conditional and unconditional in one batched forward (2 evals per image).
    ``scale`` is a float or a per-sample tensor."""
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
        sample = args[0] if args else kwargs["sample"]
        self.count += int(sample.shape[0])

    def close(self) -> None:
        self._handle.remove()
