"""The one DDIM sampling loop of unguide.

Erasure training runs it for partial trajectories, influence scoring for the first steps of a
base-model trajectory, and generation for whole ones; only the noise-prediction function differs.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

# eps_fn(x, t, step_index) -> predicted noise for the whole batch x
NoiseFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
# on_step(step_index, t, x) -> None, or a replacement for x (diffusers' callback_on_step_end, one batch at a time)
StepFn = Callable[[int, torch.Tensor, torch.Tensor], Optional[torch.Tensor]]


def make_scheduler(bundle, num_steps: int = 50):
    """A fresh DDIM scheduler (eta 0 at step time) with the bundle's noise schedule."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(bundle.scheduler.config)
    sched.set_timesteps(num_steps)
    return sched


def initial_noise(shape: Sequence[int], seeds: Sequence[int], device="cpu", dtype=torch.float32) -> torch.Tensor:
    """One independent N(0, I) latent per seed: an image's noise never depends on its batch-mates."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(
        device=device, dtype=dtype)


def ddim_loop(scheduler, x: torch.Tensor, eps_fn: NoiseFn, start: int = 0, stop: Optional[int] = None,
              progress: bool = False, on_step: Optional[StepFn] = None) -> torch.Tensor:
    """Run DDIM (eta 0) from step index ``start`` up to (not including) ``stop`` of the scheduler's timesteps;
    ``on_step`` sees the latents after each step and may replace them."""
    timesteps = scheduler.timesteps[start:stop]
    for offset, t in enumerate(tqdm(timesteps, desc="denoise", leave=False, disable=not progress)):
        eps = eps_fn(x, t, start + offset)
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
        if on_step is not None:
            replaced = on_step(start + offset, t, x)
            x = x if replaced is None else replaced
    return x


def unet_eps(unet, x: torch.Tensor, t, states: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return unet(x, t, encoder_hidden_states=states).sample


def cfg_eps(unet, x: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor, scale) -> torch.Tensor:
    """Classifier-free guidance, conditional and unconditional in one batched forward (2 evals per image).
    ``scale`` is a float or a per-sample tensor."""
    both = unet_eps(unet, torch.cat([x, x]), t, torch.cat([uncond, cond]))
    e_uncond, e_cond = both.chunk(2)
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    if scale.ndim == 1:
        scale = scale.view(-1, 1, 1, 1)
    return e_uncond + scale * (e_cond - e_uncond)


def cfg_noise_fn(unet, cond: torch.Tensor, uncond: torch.Tensor, scale) -> NoiseFn:
    return lambda x, t, i: cfg_eps(unet, x, t, cond, uncond, scale)
