"""CLIP zero-shot classification and CLIP score, written against ``transformers`` directly.

Images are preprocessed by transformers' own CLIP image processor, PIL backend (``CLIPImageProcessorPil``: no
torchvision needed), read from the model's directory or hub id (``preprocessor_config.json``) or, where that has
none, built from the model's config: bicubic resize of the shorter side to ``vision_config.image_size``, center crop
to that square, CLIP mean/std. Inputs are ``[N, 3, H, W]`` tensors in [0, 1]; they are rounded to 8 bits first, as
a PNG of them would be, so a tensor and its saved PNG give the same embedding.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

_PROCESSORS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its image processor


def load_clip(name_or_path: str = "openai/clip-vit-base-patch32", device: str | torch.device = "cpu"):
    """``(CLIPModel in eval mode, tokenizer)`` loaded from a hub id or a local directory holding both; the image
    processor is loaded with them (see :func:`image_processor`)."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(name_or_path).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    image_processor(model)
    return model, tokenizer


def image_processor(model):
    """The CLIP image processor of ``model`` (cached per model): its ``preprocessor_config.json`` where its directory
    or hub id has one, else CLIP's defaults at the model's input size."""
    if model in _PROCESSORS:
        return _PROCESSORS[model]
    try:
        from transformers import CLIPImageProcessorPil as Processor  # transformers 5: the PIL backend
    except ImportError:  # transformers 4: CLIPImageProcessor is the PIL/NumPy one
        from transformers import CLIPImageProcessor as Processor

    try:
        processor = Processor.from_pretrained(model.name_or_path)
    except OSError:  # no preprocessor_config.json (a model saved without its processor)
        size = model.config.vision_config.image_size
        processor = Processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    _PROCESSORS[model] = processor
    return processor


def preprocess(images: Tensor, processor) -> Tensor:
    """``pixel_values`` for ``[N, 3, H, W]`` images in [0, 1]: rounded to uint8, then the processor's resize, crop
    and normalisation."""
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return processor(images=list(pixels), input_data_format="channels_first", return_tensors="pt")["pixel_values"]


def _pooled(out) -> Tensor:
    return out if isinstance(out, Tensor) else out.pooler_output  # transformers 4.x vs 5.x return types


@torch.no_grad()
def image_embeddings(model, images: Tensor, batch_size: int = 32) -> Tensor:
    """L2-normalised image embeddings ``[N, E]``."""
    processor, device = image_processor(model), model.device
    chunks = [_pooled(model.get_image_features(pixel_values=preprocess(images[i:i + batch_size], processor).to(
        device, model.dtype))) for i in range(0, len(images), batch_size)]
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
