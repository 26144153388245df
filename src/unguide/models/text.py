"""Token states from a single text encoder (SD 1.x / 2.x, and the toy models' MiniLM), in the modes the toy models
were trained with. The multi-encoder families (SDXL, SD3) form theirs in :mod:`unguide.models.families`."""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import UnguideError
from .families import pack_pooled


# How token states are formed. "contextual": the encoder's own output at every position (Stable Diffusion's
# CLIP states). The toy model's options make its bidirectional BERT behave more like SD's causal CLIP:
# "causal_eos_pad" gives each token the state of its prefix alone (so a shared template like "a photo of the"
# has the same states in every prompt) and pads with repeated end tokens that see the whole prompt, as CLIP
# pads with EOS; "causal_zero_pad" zeroes the padding instead; "contextual_zero_pad" only zeroes the padding.
# "contextual_pooled" (toyworld-flow's MMDiT): contextual states, then one row holding their mean over the prompt's
# tokens (MiniLM's own sentence embedding), the pooled vector an SD3-style transformer reads (families.pack_pooled).
TEXT_STATES = ("contextual", "contextual_zero_pad", "causal_zero_pad", "causal_eos_pad", "contextual_pooled")


def _causal_states(text_encoder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """State of token i computed from tokens 0..i only, for every i (one batched pass over all prefixes)."""
    b, n = ids.shape
    prefix = torch.tril(torch.ones(n, n, dtype=mask.dtype, device=mask.device))  # row i keeps keys 0..i
    seq_mask = (prefix[None] * mask[:, None, :]).reshape(b * n, n)
    seq_mask[:, 0] = 1  # every row sees at least the first token
    states = text_encoder(ids.repeat_interleave(n, dim=0), attention_mask=seq_mask)[0]
    return states.reshape(b, n, n, -1).diagonal(dim1=1, dim2=2).permute(0, 2, 1)


@torch.no_grad()
def encode_text(text_encoder, tokenizer, prompts: Sequence[str], max_length: int,
                states: str = "contextual") -> torch.Tensor:
    """Token states (B, max_length, D) of the prompts: what the denoiser's cross-attention reads."""
    if states not in TEXT_STATES:
        raise UnguideError(f"unknown text state mode {states!r}: choose one of {', '.join(TEXT_STATES)}")
    tok = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    device = next(text_encoder.parameters()).device
    ids, full_mask = tok.input_ids.to(device), tok.attention_mask.to(device)
    if states == "causal_eos_pad":
        out = _causal_states(text_encoder, ids.masked_fill(full_mask == 0, tokenizer.sep_token_id),
                             torch.ones_like(full_mask))
    elif states == "causal_zero_pad":
        out = _causal_states(text_encoder, ids, full_mask)
    else:
        mask = full_mask if getattr(text_encoder.config, "use_attention_mask", False) else None
        out = text_encoder(ids, attention_mask=mask)[0]
    if states.endswith("zero_pad"):
        out = out * full_mask[..., None].to(out.dtype)
    if states == "contextual_pooled":
        m = full_mask[..., None].to(out.dtype)
        out = pack_pooled(out, (out * m).sum(1) / m.sum(1).clamp(min=1))
    return out
