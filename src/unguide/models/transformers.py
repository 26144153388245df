"""The flow-matching transformers (SD3's MMDiT, Flux) behind the UNet's call.

Every part of unguide calls the denoiser as a UNet: ``denoiser(x, t, encoder_hidden_states=states)`` with latents
``(B, C, h, w)``, a timestep in [0, 1000] and one tensor of states per prompt whose last row is the pooled text vector
(:func:`~unguide.models.families.pack_pooled`). A forward pre-hook turns that call into the transformer's own: for SD3
``(hidden_states, encoder_hidden_states, pooled_projections, timestep)``; for Flux, also the latents packed in 2x2
patches, the rotary position ids of text and image tokens, ``timestep / 1000`` and the guidance embedding of a
guidance-distilled model, and a forward hook unpacks Flux's output. The module stays diffusers' own (peft, the LoRA
file and the fingerprint see no wrapper), and a stock pipeline's own call (it brings ``pooled_projections``) passes
through untouched.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch

from .families import pack_pooled


def is_transformer(denoiser) -> bool:
    """Whether a denoiser is a diffusion transformer (SD3's MMDiT, Flux) rather than a UNet."""
    return type(denoiser).__name__.endswith("Transformer2DModel")


def is_flux(denoiser) -> bool:
    return type(denoiser).__name__ == "FluxTransformer2DModel"


def guidance_distilled(denoiser) -> bool:
    """Flux-dev: guidance is an input embedding, not a second (unconditional) forward."""
    return is_flux(denoiser) and bool(getattr(denoiser.config, "guidance_embeds", False))


# ------------------------------------------------------------------------------------------------------------ SD3
def _unpack_mmdit(pooled_dim: int, text_dim: int, module, args, kwargs):
    if kwargs.get("pooled_projections") is not None:
        return None
    args = list(args)
    sample = args.pop(0) if args else kwargs.pop("sample")
    t = args.pop(0) if args else kwargs.pop("timestep")
    packed = kwargs.pop("encoder_hidden_states")
    kwargs.update(hidden_states=sample, timestep=t, encoder_hidden_states=packed[:, :-1, :text_dim],
                  pooled_projections=packed[:, -1, :pooled_dim])
    return (), kwargs


@torch.no_grad()
def encode_sd3(text_encoders: Sequence, tokenizers: Sequence, prompts: Sequence[str], max_length: int,
               t5_length: int) -> torch.Tensor:
    """SD3's conditioning, as StableDiffusion3Pipeline.encode_prompt forms it, packed (:func:`pack_pooled`): both
    CLIPs' penultimate states side by side, zero padded to T5's width, then T5's ``t5_length`` states along the
    sequence; the pooled row holds both CLIPs' pooled projections."""
    states, pooled = [], []
    for enc, tok in zip(text_encoders[:2], tokenizers[:2]):
        out = enc(_ids(tok, prompts, max_length, enc), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled.append(out[0])
    clip = torch.cat(states, dim=-1)
    t5 = text_encoders[2](_ids(tokenizers[2], prompts, t5_length, text_encoders[2]))[0]
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return pack_pooled(torch.cat([clip, t5.to(clip.dtype)], dim=1), torch.cat(pooled, dim=-1))


def _ids(tokenizer, prompts: Sequence[str], length: int, encoder) -> torch.Tensor:
    return tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt").input_ids.to(next(encoder.parameters()).device)


# ------------------------------------------------------------------------------------------------------------ Flux
@torch.no_grad()
def encode_flux(text_encoders: Sequence, tokenizers: Sequence, prompts: Sequence[str], max_length: int,
                t5_length: int) -> torch.Tensor:
    """Flux's conditioning, as FluxPipeline.encode_prompt forms it, packed: T5's ``t5_length`` token states, and
    CLIP's pooled output as the pooled row."""
    clip, t5 = text_encoders
    pooled = clip(_ids(tokenizers[0], prompts, max_length, clip), output_hidden_states=False).pooler_output
    states = t5(_ids(tokenizers[1], prompts, t5_length, t5), output_hidden_states=False)[0]
    return pack_pooled(states, pooled.to(states.dtype))


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): FluxPipeline's 2x2 patches."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, c4 = x.shape
    return x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Rotary position ids of the packed image tokens (row, column), as FluxPipeline._prepare_latent_image_ids."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def _unpack_flux(pooled_dim: int, text_dim: int, default_guidance: float, module, args, kwargs):
    if kwargs.get("pooled_projections") is not None:
        return None
    args = list(args)
    sample = args.pop(0) if args else kwargs.pop("sample")
    t = torch.as_tensor(args.pop(0) if args else kwargs.pop("timestep"), device=sample.device)
    packed = kwargs.pop("encoder_hidden_states")
    guidance = kwargs.pop("guidance", None)
    if module.config.guidance_embeds:
        guidance = torch.as_tensor(default_guidance if guidance is None else guidance, device=sample.device,
                                   dtype=torch.float32).expand(len(sample))
    h, w = sample.shape[-2:]
    module._unguide_latent_size = (h, w)
    kwargs.update(hidden_states=pack_latents(sample), timestep=t.to(sample.dtype).expand(len(sample)) / 1000,
                  encoder_hidden_states=packed[:, :-1, :text_dim], pooled_projections=packed[:, -1, :pooled_dim],
                  txt_ids=torch.zeros(packed.shape[1] - 1, 3, device=sample.device, dtype=sample.dtype),
                  img_ids=image_ids(h, w, sample.device, sample.dtype), guidance=guidance)
    return (), kwargs


def _repack_flux_output(module, args, kwargs, output):
    size = getattr(module, "_unguide_latent_size", None)
    if size is None:
        return None
    module._unguide_latent_size = None
    sample = output.sample if hasattr(output, "sample") else output[0]
    unpacked = unpack_latents(sample, *size)
    if hasattr(output, "sample"):
        output.sample = unpacked
        return output
    return (unpacked, *output[1:])


def install_transformer_conditioning(transformer, default_guidance: float = 3.5) -> None:
    """Let an SD3 or Flux transformer take a UNet's call with packed states (idempotent: one hook per module).
    ``default_guidance``: the guidance embedding a distilled Flux gets when the caller names none."""
    if getattr(transformer, "_unguide_hooks", None) is not None:
        return
    cfg = transformer.config
    dims = (int(cfg.pooled_projection_dim), int(cfg.joint_attention_dim))
    if is_flux(transformer):
        transformer._unguide_hooks = (
            transformer.register_forward_pre_hook(partial(_unpack_flux, *dims, default_guidance), with_kwargs=True),
            transformer.register_forward_hook(_repack_flux_output, with_kwargs=True))
    else:
        transformer._unguide_hooks = (transformer.register_forward_pre_hook(partial(_unpack_mmdit, *dims),
                                                                            with_kwargs=True),)
