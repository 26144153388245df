"""Where an erasure's training samples come from: for each iteration, which erased prompt, which point z_k of which
trajectory, which timestep t and which anchors, and how z_k is drawn.

Every choice is a pure function of (seed, iteration, sample), so a resumed run trains exactly what an uninterrupted
one does. Two schedules (``EraseConfig.schedule``):

* ``fresh`` (the reference protocol, ESD's): each sample's partial trajectory is drawn anew, k steps of CFG with the
  model being trained, from noise of its own. About 25 steps x 2 evaluations per sample on average, at the batch of
  one iteration: most of an erasure's cost, and small-batch work.
* ``cached``: the trajectories of each erased prompt (``trajectories`` noises each) are drawn all in one batch, and
  every sample reads its z_k from them: first the *base* model's (where the concept is being drawn, which is where
  the adapter must act and where the image gate looks), then, every ``refresh`` iterations, the model being trained
  draws a new set from new noises, so that later samples also lie where the erased model's own drawings go (ESD's
  reason for drawing with the model being trained), at a fraction of the cost. The training then costs little more
  than the loss's own evaluations.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal, Optional, Sequence, get_args

import numpy as np
import torch

from ..sampling.ddim import cfg_noise_fn, ddim_loop, initial_noise

Schedule = Literal["fresh", "cached"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)


@dataclass(frozen=True)
class Sample:
    """One training sample: erase ``prompt`` (0: the target) at the point ``k`` steps into a trajectory, keeping the
    ``anchors`` there. ``noise``: a fresh trajectory's start; ``trajectory``: which cached base trajectory."""

    prompt: int
    k: int
    t: float
    anchors: tuple = ()
    noise: Optional[torch.Tensor] = None
    trajectory: Optional[int] = None


def draw_point(cfg, i: int, latent_shape, b: int = 0) -> tuple[int, int, torch.Tensor]:
    """(k, t, z_T) of sample b of iteration i; sample 0 is drawn as single-sample runs always drew it."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i + b * 1_000_000_007)
    k = int(torch.randint(0, cfg.ddim_steps, (1,), generator=g))
    lo, hi = round(k / cfg.ddim_steps * 1000), round((k + 1) / cfg.ddim_steps * 1000)
    t = int(torch.randint(lo, hi, (1,), generator=g))
    z = torch.randn((1, *latent_shape), generator=g)
    return k, t, z


def _rng(cfg, i: int, stream: int, b: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, i, stream] if b == 0 else [cfg.seed, i, stream, b])


def draw_anchors(cfg, i: int, n_anchors: int, b: int = 0) -> list[int]:
    """Which anchors sample b of iteration i keeps."""
    rng = _rng(cfg, i, 1, b)
    return sorted(rng.choice(n_anchors, size=min(cfg.anchors_per_step, n_anchors), replace=False).tolist())


def draw_prompt(cfg, i: int, n_prompts: int, b: int = 0) -> int:
    """Which of the concept's prompts (0: the target) sample b of iteration i erases."""
    if not cfg.erase_synonyms or n_prompts == 1:
        return 0
    return int(_rng(cfg, i, 2, b).integers(n_prompts))


def plan_iteration(cfg, i: int, sampler, n_prompts: int, n_anchors: int, latent_shape) -> list[Sample]:
    """The ``cfg.batch`` samples of iteration i. t: the reference mapping of k to a DDPM time in
    [k*1000/N, (k+1)*1000/N) (the paper's code), the timestep z_k sits at (``aligned``), or, for a flow, sigma_k."""
    samples = []
    for b in range(cfg.batch):
        k, t, z = draw_point(cfg, i, latent_shape, b)
        if sampler.prediction.kind == "flow":  # a flow's step k is at sigma_k: the loss is taken where z_k lies
            t = float(sampler.timesteps[k])
        elif cfg.timestep_mapping == "aligned":
            t = int(sampler.timesteps[k])
        cached = cfg.schedule == "cached"
        samples.append(Sample(draw_prompt(cfg, i, n_prompts, b), k, t,
                              tuple(draw_anchors(cfg, i, n_anchors, b)) if n_anchors else (),
                              noise=None if cached else z,
                              trajectory=int(_rng(cfg, i, 3, b).integers(cfg.trajectories)) if cached else None))
    return samples


@torch.no_grad()
def trajectory_points(unet, sampler, guidance: float, noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                      stops: Sequence[Sequence[int]]) -> dict:
    """{(row, k): z_k}: the points ``k`` steps into each row's CFG trajectory from ``noise`` (the shared sampling
    loop, run once to the furthest k asked for); only the points asked for are kept."""
    x = noise * sampler.init_noise_sigma
    points = {(r, 0): x[r] for r, ks in enumerate(stops) if 0 in ks}
    wanted: dict[int, list[int]] = {}
    for r, ks in enumerate(stops):
        for k in ks:
            if k > 0:
                wanted.setdefault(k, []).append(r)

    def keep(index, t, x_after):
        for r in wanted.get(index + 1, ()):
            points[(r, index + 1)] = x_after[r].clone()

    last = max((k for ks in stops for k in ks), default=0)
    if last > 0:
        ddim_loop(sampler, x, cfg_noise_fn(unet, cond, uncond.expand(len(cond), -1, -1), guidance), stop=last,
                  on_step=keep)
    return points


def fresh_points(unet, sampler, cfg, samples: Sequence[Sample], erased: Sequence[torch.Tensor],
                 empty: torch.Tensor) -> torch.Tensor:
    """z_k of each sample, drawn now with the model as it is being trained (the ``fresh`` schedule)."""
    noise = torch.cat([s.noise for s in samples]).to(device=empty.device, dtype=empty.dtype)
    cond = torch.cat([erased[s.prompt] for s in samples])
    points = trajectory_points(unet, sampler, cfg.start_guidance, noise, cond, empty, [[s.k] for s in samples])
    return torch.stack([points[(r, s.k)] for r, s in enumerate(samples)])


class TrajectoryPool:
    """One window's trajectories of every erased prompt (the ``cached`` schedule): window w serves iterations
    [w * refresh, (w + 1) * refresh) and is drawn by the base model (w = 0) or by the model being trained at its first
    iteration. Only the points its samples use are kept, so memory grows with the iterations, not with the steps."""

    def __init__(self, points: dict, window: int):
        self.points, self.window = points, window

    @staticmethod
    def window_of(cfg, i: int) -> int:
        return i // cfg.refresh if cfg.refresh else 0

    @classmethod
    def draw(cls, bundle, adapter, sampler, cfg, erased: Sequence[torch.Tensor], empty: torch.Tensor,
             plans: Sequence[Sequence[Sample]], window: int = 0, batch_size: int = 16) -> "TrajectoryPool":
        rows = [(p, j) for p in range(len(erased)) for j in range(cfg.trajectories)]
        stops = {row: set() for row in rows}
        for plan in plans:
            for s in plan:
                stops[(s.prompt, s.trajectory)].add(s.k)
        seeds = [cfg.seed * 1_000_003 + 500_000_009 + window * 7_919_993 + p * 10_007 + j for p, j in rows]
        noise = initial_noise(bundle.latent_shape(), seeds, device=bundle.device, dtype=bundle.unet.dtype)
        points: dict = {}
        with adapter.base() if window == 0 else nullcontext():
            for b in range(0, len(rows), batch_size):
                chunk = rows[b:b + batch_size]
                cond = torch.cat([erased[p] for p, _ in chunk])
                got = trajectory_points(bundle.unet, sampler, cfg.start_guidance, noise[b:b + len(chunk)], cond, empty,
                                        [sorted(stops[row]) for row in chunk])
                points.update({(chunk[r], k): z for (r, k), z in got.items()})
        return cls(points, window)

    def take(self, samples: Sequence[Sample]) -> torch.Tensor:
        return torch.stack([self.points[((s.prompt, s.trajectory), s.k)] for s in samples])

    def state(self) -> dict[str, torch.Tensor]:
        """Its points as checkpoint tensors: a run resumed inside a window drawn by the model being trained cannot
        redraw it (that model is gone), so it reads them back."""
        return {f"pool.{self.window}.{p}.{j}.{k}": z.contiguous() for ((p, j), k), z in self.points.items()}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor]) -> Optional["TrajectoryPool"]:
        points, window = {}, None
        for name, z in tensors.items():
            if name.startswith("pool."):
                window, p, j, k = (int(x) for x in name.split(".")[1:])
                points[((p, j), k)] = z
        return cls(points, window) if points else None
