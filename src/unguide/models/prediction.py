"""What a denoiser's output stands for, converted in one place.

A Stable-Diffusion-style UNet predicts the noise (``epsilon``, SD 1.x / XL) or ``v = sqrt(a_t) eps - sqrt(1 - a_t) x0``
(``v_prediction``, SD 2.x 768); a rectified-flow transformer (SD3, Flux, ``toyworld-flow``) predicts the velocity
``noise - x0`` of the straight path ``x_s = (1 - s) x0 + s noise`` (``flow``; ``s = t / 1000``). Every part of unguide that reads the output
(the sampling loop, the erasure target, the influence score, the image gate's detector, the attack's loss) asks
:class:`Prediction` for the quantity it needs, so none of them can read one kind as another. At a fixed ``x_t`` each
conversion is affine in the output, so an affine combination whose weights sum to one (classifier-free guidance,
UnGuidance's mix, ESD's target) gives the same result in any space.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, get_args

import torch

from ..errors import UnguideError

PredictionKind = Literal["epsilon", "v_prediction", "flow"]
KINDS: tuple[str, ...] = get_args(PredictionKind)


@dataclass(frozen=True, eq=False)
class Prediction:
    """The output kind of a denoiser and the noise schedule it was trained on (``alphas_cumprod`` per timestep)."""

    kind: PredictionKind
    alphas_cumprod: Optional[torch.Tensor] = None  # the diffusion schedule; None for a flow
    train_timesteps: int = 1000  # a flow's t is its sigma times this

    @classmethod
    def of(cls, scheduler) -> "Prediction":
        """What a model whose scheduler is ``scheduler`` predicts (diffusers' ``prediction_type``; a flow-matching
        scheduler means a velocity)."""
        if is_flow_scheduler(scheduler):
            return cls("flow", None, int(scheduler.config.num_train_timesteps))
        kind = scheduler.config.get("prediction_type", "epsilon")
        if kind not in ("epsilon", "v_prediction"):
            raise UnguideError(f"prediction type {kind!r} is not supported: unguide reads epsilon and v_prediction "
                               "UNets and flow-matching transformers "
                               "(docs/model-families.md)")
        return cls(kind, scheduler.alphas_cumprod)

    def _sigma(self, t, like: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(t, device=like.device, dtype=torch.float32) / self.train_timesteps
        return s.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def _alpha(self, t, like: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t)
        a = self.alphas_cumprod.to(like.device)[t.cpu()].to(like.device, like.dtype)
        return a.view(-1, *([1] * (like.ndim - 1)))

    def noise(self, output: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """The noise the output stands for: itself for epsilon; ``sqrt(a) v + sqrt(1 - a) x_t`` for v;
        ``x_s + (1 - s) v`` for a flow."""
        if self.kind == "epsilon":
            return output
        if self.kind == "flow":
            return x_t + (1 - self._sigma(t, output)) * output
        a = self._alpha(t, output)
        return a.sqrt() * output + (1 - a).sqrt() * x_t

    def clean(self, output: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """The clean latent the output predicts (x0_hat)."""
        if self.kind == "flow":
            return x_t - self._sigma(t, output) * output
        a = self._alpha(t, output)
        if self.kind == "epsilon":
            return (x_t - (1 - a).sqrt() * output) / a.sqrt()
        return a.sqrt() * x_t - (1 - a).sqrt() * output

    def target(self, noise: torch.Tensor, x0: torch.Tensor, t) -> torch.Tensor:
        """What a perfect model outputs at ``noised(x0, noise, t)``: the noise, v, or the velocity ``noise - x0``."""
        if self.kind == "epsilon":
            return noise
        if self.kind == "flow":
            return noise - x0
        a = self._alpha(t, noise)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """The forward process: ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise``; a flow's ``(1 - s) x0 + s noise``."""
        if self.kind == "flow":
            s = self._sigma(t, x0)
            return (1 - s) * x0 + s * noise
        a = self._alpha(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise


def is_flow_scheduler(scheduler) -> bool:
    """Whether a scheduler integrates a rectified flow (diffusers' FlowMatch* schedulers: SD3, Flux)."""
    return type(scheduler).__name__.startswith("FlowMatch")
