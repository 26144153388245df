"""UnGuidance's mix: ``w * base + (1 - w) * adapter`` per row, each branch evaluated only for the rows that need it.

With one UNet in memory the base branch is the same UNet with the adapter switched off. Each branch may be a CFG
prediction (generation: ``eps_base_cfg``, ``eps_lora_cfg``) or a conditional one (the attack's loss); the mix is affine
with weights summing to one, so it means the same whether the model predicts noise or v.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch

from ..sampling.ddim import cfg_output
from .decision import Decision


def guided_noise_fn(bundle, adapter, cond, uncond, scale, decisions: Sequence[Decision], switch=None):
    """eps = w * eps_base_cfg + (1 - w) * eps_lora_cfg, evaluating each branch only for the rows that need it:
    rows with w = 1 never touch the adapter (their prediction is exactly the base model's), rows with w = 0
    never touch the base model. Rows may carry a negative prompt (erased rows guided away from the concept) or a
    substitute prompt (the image gate's last resort). ``switch``: see :func:`mix_by_weight`."""
    unet = bundle.unet
    w = torch.tensor([d.w for d in decisions], dtype=cond.dtype, device=cond.device)
    negative = [r for r, d in enumerate(decisions) if d.negative_prompt is not None]
    if negative:  # erased rows guided away from the concept's own prompt instead of from ""
        uncond = uncond.clone()
        uncond[negative] = bundle.encode_prompts([decisions[r].negative_prompt for r in negative]).to(uncond.dtype)
    substitute = [r for r, d in enumerate(decisions) if d.substituted]
    if substitute:  # the image gate's last resort: these rows draw the concept's reference prompt
        cond = cond.clone()
        cond[substitute] = bundle.encode_prompts([decisions[r].substitute_prompt for r in substitute]).to(cond.dtype)
    scale = torch.as_tensor(scale, dtype=cond.dtype, device=cond.device)

    def branch(x, t, rows):
        if len(rows) == len(w):
            return cfg_output(unet, x, t, cond, uncond, scale)
        s = scale[rows] if scale.ndim == 1 else scale
        return cfg_output(unet, x[rows], t, cond[rows], uncond[rows], s)

    return lambda x, t, i: mix_by_weight(w, adapter, lambda rows: branch(x, t, rows), x, switch)


def mix_by_weight(w: torch.Tensor, adapter, predict, like: torch.Tensor, switch=None) -> torch.Tensor:
    """``w * predict(rows)`` with the adapter off plus ``(1 - w) * predict(rows)`` with it on, each branch evaluated
    only for the rows that need it: rows with w = 1 never touch the adapter (their prediction is the base model's, bit
    for bit), rows with w = 0 never touch the base model. ``adapter`` None: there is only the base model (w = 1).
    ``switch(rows)``: for a group of adapters, [(rows, context)] pairs, each context turning on the adapters those
    rows are erased with (None: one adapter, on for all)."""
    out = torch.zeros_like(like)
    base_rows, lora_rows = torch.nonzero(w != 0).flatten(), torch.nonzero(w != 1).flatten()
    if len(base_rows):
        with adapter.base() if adapter is not None else nullcontext():
            e = predict(base_rows)
        wb = w[base_rows].view(-1, 1, 1, 1).to(e.dtype)
        out[base_rows] = torch.where(wb == 1, e, wb * e)
    if len(lora_rows):
        for rows, context in (switch(lora_rows) if switch is not None else [(lora_rows, nullcontext())]):
            with context:
                e = predict(rows)
            out[rows] = out[rows] + (1 - w[rows]).view(-1, 1, 1, 1).to(e.dtype) * e
    return out
