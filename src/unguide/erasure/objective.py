"""The negative-guidance objective of ESD on a LoRA adapter, with the selective recipe's anchor term.

The adapted prediction for the erased prompt is regressed onto ``e_base(ref) - eta * (e_base(tgt) - e_base(ref))``
at the same x_t (`../shared/METHOD.md` section 2); with anchors, the adapted prediction for each anchor prompt is also
held to the base model's. The model's output is used as it comes (noise, v or a flow velocity): the target is an
affine combination of outputs at one x_t, the same in each space (:mod:`unguide.models.prediction`). The base side
never depends on the adapter being trained, so the ``cached`` schedule computes a whole window's at once.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .recipes import EraseConfig
from .schedule import Sample, fresh_points
from ..sampling.ddim import model_output


def erasure_loss(unet, adapter, sampler, cfg: EraseConfig, k: int, t, z: torch.Tensor, prompts,
                 anchors: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
    """The loss of one sample on a fresh trajectory from ``z`` (the reference protocol's iteration): the partial
    trajectory, then :func:`negative_guidance_loss`."""
    tgt, ref, empty = prompts
    z_k = fresh_points(unet, sampler, cfg, [Sample(0, k, t, noise=z)], [tgt], empty)
    return negative_guidance_loss(unet, adapter, cfg, z_k, [t], tgt, ref, anchors)


BASE_BATCH = 64  # rows per base-model call when a window's base outputs are computed together


@torch.no_grad()
def base_outputs(unet, adapter, cfg: EraseConfig, z_k: torch.Tensor, ts: Sequence, tgt: torch.Tensor,
                 ref: torch.Tensor, anchors: Optional[torch.Tensor] = None,
                 batch_size: Optional[int] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The base model's side of the negative-guidance loss for a batch of samples: the erasure target
    ``e_ref - eta * (e_tgt - e_ref)`` and, with anchors (the same number per sample, grouped by sample), the base
    prediction at each (samples, anchors, ...). It never depends on the adapter being trained, so the ``cached``
    schedule computes a whole window's at once, ``batch_size`` rows per call; one sample's rows are (reference,
    prompt, its anchors), the layout the loss has always used."""
    n_samples = z_k.shape[0]
    m = anchors.shape[0] // n_samples if anchors is not None else 0
    t = torch.as_tensor(list(ts), device=z_k.device)
    states = torch.cat([torch.cat([ref, tgt[b:b + 1], *([anchors[b * m:(b + 1) * m]] if m else [])])
                        for b in range(n_samples)])
    x, tt = z_k.repeat_interleave(m + 2, 0), t.repeat_interleave(m + 2)
    step = batch_size or len(x)
    with adapter.base():
        base = torch.cat([model_output(unet, x[r:r + step], tt[r:r + step], states[r:r + step])
                          for r in range(0, len(x), step)])
    base = base.unflatten(0, (n_samples, m + 2))
    target = base[:, 0] - cfg.eta * (base[:, 1] - base[:, 0])
    return target, (base[:, 2:] if m else None)


def negative_guidance_loss(unet, adapter, cfg: EraseConfig, z_k: torch.Tensor, ts: Sequence, tgt: torch.Tensor,
                           ref: torch.Tensor, anchors: Optional[torch.Tensor] = None,
                           base: Optional[tuple] = None) -> tuple[torch.Tensor, dict]:
    """The negative-guidance loss of a batch of samples (z_k, t, erased prompt's states ``tgt``), plus
    ``anchor_weight`` x the anchor-preservation loss when anchor states are given (the same number per sample,
    grouped by sample); gradients flow into the adapter only. ``base``: :func:`base_outputs` of these samples if
    already computed. Returns (loss, its parts for the log)."""
    n_samples = z_k.shape[0]
    t = torch.as_tensor(list(ts), device=z_k.device)
    target, anchor_base = base if base is not None else base_outputs(unet, adapter, cfg, z_k, ts, tgt, ref, anchors)
    if anchors is None:  # the reference protocol
        pred = model_output(unet, z_k, t, tgt)
        loss = F.mse_loss(pred.float(), target.float())
        return loss, {"erase": loss.item()}
    n = anchors.shape[0] // n_samples
    kept = [anchors[b * n:(b + 1) * n] for b in range(n_samples)]
    pred = model_output(unet, z_k.repeat_interleave(n + 1, 0), t.repeat_interleave(n + 1),
                        torch.cat([torch.cat([tgt[b:b + 1], kept[b]]) for b in range(n_samples)]))
    pred = pred.unflatten(0, (n_samples, n + 1))
    erase_part = F.mse_loss(pred[:, 0].float(), target.float())
    anchor_part = F.mse_loss(pred[:, 1:].float(), anchor_base.float())
    return erase_part + cfg.anchor_weight * anchor_part, {"erase": erase_part.item(), "anchor": anchor_part.item()}
