"""Model families: what differs between SD 1.x, SD 2.x, SDXL, SD3 and Flux for the method, and nothing else.

Everything downstream (the DDIM loop, the erasure target, both gates, the attack) passes the UNet one tensor of
token states per prompt. SD 1.x and 2.x need nothing more. SDXL's UNet also reads a pooled text embedding and six
"time ids" (original size, crop, target size); rather than teach every caller about them, an SDXL bundle packs the
pooled embedding into one extra row after the token states (``pack_sdxl``), and a forward pre-hook on the UNet
unpacks it and adds the time ids of the latent being denoised (``install_sdxl_conditioning``). So the same cached,
concatenated, sliced, mixed and even optimised (soft-token inversion) tensors flow through every family, and the
UNet object stays diffusers' own (peft, state dicts, the LoRA file and the fingerprint see no wrapper).

What the UNet predicts (epsilon or v) is the scheduler config's ``prediction_type``, read where the output is used
(docs/model-families.md). The transformers (SD3's MMDiT, Flux) take the same packed states through their own hooks
(:mod:`unguide.models.transformers`) and predict a flow velocity.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class ModelFamily:
    """A family's defaults and the stock diffusers pipeline class that loads its LoRA files."""

    name: str
    pipeline_class: str  # StableDiffusionPipeline.load_lora_weights / StableDiffusionXLPipeline.load_lora_weights
    text_encoders: int
    default_guidance: float  # the stock pipeline's default guidance_scale
    description: str


SD1 = ModelFamily("sd1", "StableDiffusionPipeline", 1, 7.5, "SD 1.x: one CLIP text encoder, epsilon prediction")
SD2 = ModelFamily("sd2", "StableDiffusionPipeline", 1, 7.5,
                  "SD 2.x: one OpenCLIP text encoder, v prediction (768-v) or epsilon (base)")
SDXL = ModelFamily("sdxl", "StableDiffusionXLPipeline", 2, 5.0,
                   "SDXL: two CLIP text encoders, pooled embedding and time ids, epsilon prediction")
SD3 = ModelFamily("sd3", "StableDiffusion3Pipeline", 3, 7.0,
                  "SD3 / SD3.5: MMDiT transformer, two CLIP encoders (pooled) + T5, rectified flow (velocity)")
FLUX = ModelFamily("flux", "FluxPipeline", 2, 3.5,
                   "Flux: double- and single-stream transformer, CLIP (pooled) + T5, rectified flow; dev is "
                   "guidance-distilled (one forward with a guidance embedding), schnell has no guidance")
FAMILIES = {f.name: f for f in (SD1, SD2, SDXL, SD3, FLUX)}


def family_of(unet, scheduler, text_encoder_2=None) -> ModelFamily:
    """The family of a set of components: an MMDiT makes SD3 (toyworld-flow included); two text encoders make SDXL;
    a v-predicting scheduler or OpenCLIP-sized cross-attention (1024) make SD 2.x; otherwise SD 1.x (toyworld)."""
    if type(unet).__name__ == "SD3Transformer2DModel":
        return SD3
    if type(unet).__name__ == "FluxTransformer2DModel":
        return FLUX
    if text_encoder_2 is not None:
        return SDXL
    v = getattr(scheduler.config, "prediction_type", "epsilon") == "v_prediction"
    return SD2 if v or getattr(unet.config, "cross_attention_dim", None) == 1024 else SD1


# ------------------------------------------------------------------------------------------------ SDXL conditioning
@torch.no_grad()
def encode_sdxl(text_encoders: Sequence, tokenizers: Sequence, prompts: Sequence[str], max_length: int,
                zeros_for_empty: bool) -> torch.Tensor:
    """SDXL's conditioning for each prompt, packed: (B, max_length + 1, D1 + D2), the penultimate hidden states of
    both encoders side by side, then one row holding the second encoder's pooled projection (zero padded).
    ``zeros_for_empty``: the model's ``force_zeros_for_empty_prompt``, under which the stock pipeline's unconditional
    input is all zeros; "" (the unconditional prompt everywhere in unguide) is encoded the same way."""
    states, pooled = [], None
    for enc, tok in zip(text_encoders, tokenizers):
        ids = tok(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                  return_tensors="pt").input_ids.to(next(enc.parameters()).device)
        out = enc(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder's pooled projection (text_embeds), as the stock pipeline keeps it
    packed = pack_pooled(torch.cat(states, dim=-1), pooled)
    if zeros_for_empty:
        packed[[i for i, p in enumerate(prompts) if p == ""]] = 0
    return packed


def pack_pooled(tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """Token states ``(B, L, D)`` and a pooled vector ``(B, P)`` as one tensor ``(B, L + 1, max(D, P))``: the pooled
    vector is the last row (how SDXL and the transformers carry it through unguide); the shorter is zero padded (the
    unpacking hooks cut the token states back to the width the model reads)."""
    if pooled.shape[-1] > tokens.shape[-1]:
        tokens = torch.nn.functional.pad(tokens, (0, pooled.shape[-1] - tokens.shape[-1]))
    row = torch.zeros(len(tokens), 1, tokens.shape[-1], dtype=tokens.dtype, device=tokens.device)
    row[:, 0, :pooled.shape[-1]] = pooled.to(tokens.dtype)
    return torch.cat([tokens, row], dim=1)


def _unpack_sdxl(pooled_dim: int, downsample: int, module, args, kwargs):
    """Forward pre-hook: split packed states into token states and the pooled embedding, add the time ids
    (original = target = the latent's size in pixels, no crop: the stock pipeline's defaults). A call that brings its
    own ``added_cond_kwargs`` (a stock pipeline's) is left alone."""
    if kwargs.get("added_cond_kwargs") is not None:
        return None
    args = list(args)
    packed = kwargs.pop("encoder_hidden_states") if "encoder_hidden_states" in kwargs else args.pop(2)
    sample = args[0] if args else kwargs["sample"]
    h, w = sample.shape[-2] * downsample, sample.shape[-1] * downsample
    time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=packed.dtype, device=packed.device).expand(len(packed), 6)
    kwargs["encoder_hidden_states"] = packed[:, :-1]
    kwargs["added_cond_kwargs"] = {"text_embeds": packed[:, -1, :pooled_dim], "time_ids": time_ids}
    return tuple(args), kwargs


def install_sdxl_conditioning(unet, pooled_dim: int, downsample: int) -> None:
    """Let an SDXL UNet take packed states (idempotent: one hook per UNet object)."""
    from functools import partial

    if getattr(unet, "_unguide_sdxl_hook", None) is not None:
        return
    unet._unguide_sdxl_hook = unet.register_forward_pre_hook(partial(_unpack_sdxl, pooled_dim, downsample),
                                                              with_kwargs=True)


def sdxl_pooled_dim(text_encoder_2) -> int:
    cfg = text_encoder_2.config
    return int(getattr(cfg, "projection_dim", None) or cfg.hidden_size)


def check_sdxl_unet(unet, text_encoder_2) -> Optional[str]:
    """Why an SDXL-shaped directory cannot run (a refiner: no first encoder, aesthetic-score time ids), or None."""
    cfg = unet.config
    want = 6 * int(cfg.addition_time_embed_dim or 0) + sdxl_pooled_dim(text_encoder_2)
    if getattr(cfg, "addition_embed_type", None) != "text_time" or cfg.projection_class_embeddings_input_dim != want:
        return ("its UNet does not take SDXL base conditioning (pooled text embedding + 6 time ids); "
                "refiner checkpoints are not supported")
    return None
