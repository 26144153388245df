"""CLIP zero-shot classification and CLIP score, written against ``transformers`` directly.

Image preprocessing is done here (no CLIPImageProcessor, which needs torchvision or PIL backends):
bicubic resize of the shorter side to ``config.vision_config.image_size``, center crop to a square of
that size, then normalisation with the CLIP mean/std. Inputs are ``[N, 3, H, W]`` tensors in [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_clip(name_or_path: str = "openai/clip-vit-base-patch32", device: str | torch.device = "cpu"):
    """``(CLIPModel in eval mode, tokenizer)`` loaded from a hub id or a local directory holding both."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(name_or_path).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    return model, tokenizer


def preprocess(images: Tensor, size: int) -> Tensor:
    """Resize shorter side to ``size`` (bicubic, antialiased), center crop ``size`` x ``size``, CLIP-normalise."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(images.float(), size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[..., top:top + size, left:left + size].clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _pooled(out) -> Tensor:
    return out if isinstance(out, Tensor) else out.pooler_output  # transformers 4.x vs 5.x return types


@torch.no_grad()
def image_embeddings(model, images: Tensor, batch_size: int = 32) -> Tensor:
    """L2-normalised image embeddings ``[N, E]``."""
    size, device = model.config.vision_config.image_size, model.device
    chunks = [_pooled(model.get_image_features(pixel_values=preprocess(images[i:i + batch_size].to(device), size)))
              for i in range(0, len(images), batch_size)]
    return F.normalize(torch.cat(chunks).float(), dim=-1)


@torch.no_grad()
def text_embeddings(model, tokenizer, texts: list[str]) -> Tensor:
    """L2-normalised text embeddings ``[T, E]`` (padded, truncated to the tokenizer's max length)."""
    tokens = tokenizer(list(texts), padding=True, truncation=True, max_length=tokenizer.model_max_length,
                       return_tensors="pt").to(model.device)
    out = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    return F.normalize(_pooled(out).float(), dim=-1)


@torch.no_grad()
def zero_shot_probs(model, tokenizer, images: Tensor, labels: list[str], template: str = "a photo of the {}",
                    batch_size: int = 32, image_emb: Tensor | None = None) -> Tensor:
    """Zero-shot class probabilities ``[N, L]``: softmax over logit_scale.exp() * cos(image, template(label));
    ``image_emb``: the images' embeddings when the caller already has them."""
    text = text_embeddings(model, tokenizer, [template.format(label) for label in labels])
    img = image_emb.to(text.device) if image_emb is not None else image_embeddings(model, images, batch_size)
    logits = model.logit_scale.exp().float() * img @ text.T
    return logits.softmax(dim=-1).cpu()


@torch.no_grad()
def clip_score(model, tokenizer, images: Tensor, prompts: list[str], batch_size: int = 32,
               image_emb: Tensor | None = None) -> Tensor:
    """CLIP score per (image, prompt) pair: 100 * max(cos(image, prompt), 0) -> ``[N]``."""
    if len(prompts) != len(images):
        raise ValueError(f"need one prompt per image, got {len(prompts)} prompts for {len(images)} images")
    img = image_emb if image_emb is not None else image_embeddings(model, images, batch_size)
    text = torch.cat([text_embeddings(model, tokenizer, prompts[i:i + batch_size])
                      for i in range(0, len(prompts), batch_size)])
    return (100 * (img * text).sum(dim=-1).clamp(min=0)).cpu()
