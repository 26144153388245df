"""The threat model of ``unguide attack``: the defended model (:class:`Defence`), what a candidate prompt meets under it
(:class:`Exposure`: the gates' decision, and against an image gate how often its drawings are flagged), and the
attacker's judge of a prompt (:func:`prompt_losses` on a :class:`Probe`: the defended model's denoising loss on images
of the concept, read as noise through the model's own output conversion).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..errors import UnguideError
from ..guidance.decision import Decision
from ..guidance.mixing import mix_by_weight
from ..sampling.ddim import model_output
from ..sampling.images import Item, draw_batch, sample_latents


@dataclass(frozen=True)
class AttackConfig:
    """Budget and settings. Defaults keep one concept and method under 10 minutes on two CPU cores (toy world)."""

    candidates: int = 256  # vocabulary words scored (the concept's synonyms come on top)
    pairs: int = 8  # the best words are combined in pairs: pairs * (pairs - 1) more prompts
    renders: int = 8  # concept images the loss is measured on
    draws: int = 2  # noise draws (timestep, noise) per image
    t_low: int = 100
    t_high: int = 900
    keep: int = 3  # best search prompts that are generated and judged
    inversion_steps: int = 40
    soft_tokens: int = 3  # token states the inversion optimises
    inversion_lr: float = 0.05  # Adam step, relative to the RMS of the initial token states
    gate_every: int = 10  # inversion steps between two gate decisions for the current soft prompt
    gate_images: int = 2  # against an image gate: images per candidate the attacker draws to see the gate's decision
    samples: int = 8  # images per judged prompt (seeds seed .. seed+samples-1)
    steps: int = 50  # DDIM steps of those images
    seed: int = 0
    template: str = "a photo of the {}"
    start: Optional[str] = None  # the inversion starts from this prompt (default: the word search's best)
    batch_size: int = 64

    def __post_init__(self):
        positive = ("renders", "draws", "keep", "soft_tokens", "samples", "steps", "gate_every", "batch_size",
                    "gate_images")
        for name in positive:
            if getattr(self, name) < 1:
                raise UnguideError(f"attack setting {name} must be at least 1 (got {getattr(self, name)})")
        if self.candidates < 0 or self.pairs < 0 or self.inversion_steps < 0:
            raise UnguideError("`candidates`, `pairs` and `inversion_steps` must be >= 0")
        if not 0 <= self.t_low < self.t_high <= 1000:
            raise UnguideError("the attack's timesteps must satisfy 0 <= t_low < t_high <= 1000")
        if "{}" not in self.template:
            raise UnguideError(f"`template` {self.template!r} needs a {{}} where the word goes")


@dataclass(frozen=True)
class Exposure:
    """What a candidate prompt meets under the defence: the gate's :class:`Decision` for it and, against an image gate,
    the share of the attacker's own draws of it that the gate flags (``flag_rate``; those are redrawn with weight
    ``w_erased``) and, of those, the share flagged again after the redraw (``substitute_rate``: drawn from the
    concept's reference prompt)."""

    decision: Decision
    flag_rate: Optional[float] = None
    substitute_rate: Optional[float] = None
    w_erased: Optional[float] = None

    @property
    def w(self) -> float:
        return self.decision.w


class Defence:
    """The model under attack: base model (w = 1), adapter alone (w = 0) or UnGuidance (w from the run's gates).
    Against a group run, ``member`` is the concept attacked: the group decides every prompt, and where it erases, the
    member's adapter is the one that draws it (the group draws a prompt flagged for one concept with that one's)."""

    def __init__(self, bundle, guide=None, adapter=None, gate_images: int = 2, steps: int = 50, seed: int = 0,
                 member: Optional[str] = None):
        self.bundle, self.guide, self.adapter, self.member = bundle, guide, adapter, member
        self.guidance = bundle.default_guidance
        self.gate_images, self.steps, self.seed = gate_images, steps, seed
        gates = guide.image_gates if guide is not None else {}
        # the reference prompt a substituted drawing shows: what the attacker's tokens cannot change
        key = member if member in gates else next(iter(gates), None)
        self.reference = guide.substitute_for(key) if key is not None else None

    @property
    def image_gated(self) -> bool:
        return self.guide is not None and bool(self.guide.image_gates)

    def exposures(self, prompts: Sequence[str]) -> list[Exposure]:
        """Each prompt's decision as the pipeline would make it; against an image gate, the attacker draws
        ``gate_images`` images of each kept prompt (other seeds than the judged ones) through the pipeline's own
        decision sequence (:func:`~unguide.sampling.images.draw_batch`: prompt gate, drawing, image gate's review) and
        counts what the review did to them."""
        if self.guide is None:
            return [Exposure(Decision(1.0)) for _ in prompts]
        decisions = self.guide.decide(self.bundle, list(prompts), self.guidance)
        kept = [i for i, d in enumerate(decisions) if d.w == self.guide.keep_w] if self.image_gated else []
        if not kept:
            return [Exposure(d) for d in decisions]
        size = self.bundle.image_size
        seeds = [self.seed + 50_000 + j for j in range(self.gate_images)]  # never the judged images' seeds
        items = [Item(prompts[i], s, self.guidance, size, size) for i in kept for s in seeds]
        looked = []
        for b in range(0, len(items), 32):
            _, reviewed = draw_batch(self.bundle, items[b:b + 32], self.steps, self.guide,
                                     redraw=self._redraw(items[b:b + 32]))
            looked += reviewed
        out = [Exposure(d) for d in decisions]
        for n, i in enumerate(kept):
            mine = looked[n * len(seeds):(n + 1) * len(seeds)]
            hit = [d for d in mine if d.redrawn]
            out[i] = Exposure(decisions[i], len(hit) / len(mine), sum(d.substituted for d in hit) / len(hit) if hit
                              and self.reference is not None else None, self.guide.rule.w_erase)
        return out

    def _redraw(self, batch: Sequence[Item]):
        """Redraw flagged rows as the pipeline does; a substitute's drawing is never looked at (its loss is the
        reference prompt's), so it is not drawn."""
        def redraw(rows, decisions):
            if all(d.substituted for d in decisions):
                return torch.zeros(len(rows), *self.bundle.latent_shape(), device=self.bundle.device,
                                   dtype=self.bundle.unet.dtype)
            return sample_latents(self.bundle, [batch[r] for r in rows], self.steps, self.guide, decisions)

        return redraw

    def losses(self, probe: "Probe", states: torch.Tensor, exposures: Sequence[Exposure], batch_size: int,
               grad: bool = False) -> torch.Tensor:
        """The loss each prompt meets: at its decided w, or against an image gate the mix of kept, erased and
        substituted according to how often its images are flagged (first look, and second look at the redraw)."""
        loss = prompt_losses(self, probe, states, [e.w for e in exposures], batch_size, grad=grad)
        flagged = [i for i, e in enumerate(exposures) if (e.flag_rate or 0) > 0]
        if not flagged:
            return loss
        f = torch.tensor([exposures[i].flag_rate for i in flagged], device=loss.device)
        g = torch.tensor([exposures[i].substitute_rate or 0.0 for i in flagged], device=loss.device)
        erased = prompt_losses(self, probe, states[flagged], [exposures[i].w_erased for i in flagged], batch_size,
                               grad=grad)
        if bool((g > 0).any()):  # the reference prompt's loss: what the attacker's tokens cannot change
            ref = self.bundle.encode_prompts([self.reference]).float()
            substituted = prompt_losses(self, probe, ref, [1.0], batch_size)[0]
            erased = (1 - g) * erased + g * substituted
        idx = torch.tensor(flagged, device=loss.device)
        return loss.index_copy(0, idx, (1 - f) * loss[idx] + f * erased)

    def output(self, z: torch.Tensor, t: torch.Tensor, states: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The conditional denoiser output (noise or v), mixed by w as generation mixes its guided predictions."""
        unet = self.bundle.unet
        with self.adapter.only([self.member]) if self.member is not None else nullcontext():
            return mix_by_weight(w, self.adapter, lambda rows: model_output(unet, z[rows], t[rows], states[rows]), z)


@dataclass
class Probe:
    """Noised concept latents at fixed timesteps: the same for every candidate prompt, so their losses compare."""

    z_t: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor

    @classmethod
    def build(cls, bundle, images: torch.Tensor, cfg: AttackConfig) -> "Probe":
        z0 = bundle.codec.encode(images.to(bundle.device, bundle.codec.vae.dtype)).float()
        z0 = z0.repeat_interleave(cfg.draws, dim=0)
        g = torch.Generator().manual_seed(cfg.seed + 104729)
        t = torch.randint(cfg.t_low, cfg.t_high, (len(z0),), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        z_t = bundle.prediction.noised(z0.cpu(), noise, t)
        return cls(z_t.to(bundle.device), t.to(bundle.device), noise.to(bundle.device))

    def __len__(self) -> int:
        return len(self.z_t)


def prompt_losses(defence: Defence, probe: Probe, states: torch.Tensor, w: Sequence[float], batch_size: int,
                  grad: bool = False) -> torch.Tensor:
    """Mean denoising MSE on the probe for each prompt's token states ``[P, L, D]`` (lower: the model draws the
    concept from that prompt)."""
    n, dtype = len(probe), defence.bundle.unet.dtype
    rows = [(p, r) for p in range(len(states)) for r in range(n)]
    losses = torch.zeros(len(states), device=states.device)
    for b in range(0, len(rows), batch_size):
        chunk = rows[b:b + batch_size]
        p_idx = torch.tensor([p for p, _ in chunk], device=states.device)
        r_idx = torch.tensor([r for _, r in chunk], device=states.device)
        ww = torch.tensor([float(w[p]) for p, _ in chunk], device=states.device)
        with torch.set_grad_enabled(grad):
            z_t, t = probe.z_t[r_idx].to(dtype), probe.t[r_idx]
            e = defence.bundle.prediction.noise(defence.output(z_t, t, states[p_idx].to(dtype), ww).float(), z_t.float(), t)
            err = (e - probe.noise[r_idx]).pow(2).flatten(1).mean(dim=1)
            losses = losses.index_add(0, p_idx, err / n)
    return losses
