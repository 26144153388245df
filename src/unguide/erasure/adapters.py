"""Erasure adapters on the one denoiser in memory, switchable between "base" and "adapted".

* ``object``   (reference): LoRA rank 1, scale 8, on cross-attention key/value (``attn2.to_k``, ``attn2.to_v``).
* ``explicit`` (reference): LoRA on every Linear layer except cross-attention, the time embedding and the output.
* ``full``     (ESD-x baseline): the cross-attention key/value weights themselves are trained; the base weights are
  kept as a copy of just those tensors and swapped in when the base model is asked for.

On a transformer (SD3, toyworld-flow, Flux) ``object`` takes the context embedder, the one projection that reads the
text encoder's states as a UNet's cross-attention key/value do (:data:`TEXT_ENTRY`); ``full`` trains the context
stream's key/value (``attn.add_k_proj``, ``attn.add_v_proj``, ESD-x's analogue) and ``explicit`` every other Linear
of the blocks (:data:`TEXT_KEY_VALUE`).

LoRA files are written in the diffusers format (``pytorch_lora_weights.safetensors`` with a ``unet.`` prefix, or
``transformer.`` for an MMDiT, and the adapter config in its metadata), so the family's stock pipeline
(``StableDiffusionPipeline`` / ``StableDiffusion3Pipeline.load_lora_weights``) loads them.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator, Literal, get_args

import torch
import torch.nn as nn

from ..errors import UnguideError
from ..io import load_tensors, save_tensors, tensor_metadata

ADAPTER_NAME = "erasure"
LORA_FILE = "pytorch_lora_weights.safetensors"
FULL_FILE = "full_weights.safetensors"


# LoRA down-projection (A) init -> peft's init_lora_weights: "gaussian" is N(0, 1/rank) (the reference code's);
# True is peft's default, kaiming-uniform, i.e. uniform in +-1/sqrt(fan_in), small enough for A to learn
AInit = Literal["gaussian", "uniform"]
A_INITS: tuple[str, ...] = get_args(AInit)
_PEFT_INIT = {"gaussian": "gaussian", "uniform": True}
# which layers an erasure trains: object = LoRA on cross-attention key/value, explicit = LoRA on every other Linear,
# full = the cross-attention key/value weights themselves (ESD-x)
LayerPreset = Literal["object", "explicit", "full"]
LAYER_PRESETS: tuple[str, ...] = get_args(LayerPreset)


@dataclass
class AdapterConfig:
    preset: LayerPreset = "object"
    rank: int = 1
    alpha: float = 8.0  # the LoRA output scale itself (peft lora_alpha = alpha * rank)
    a_init: AInit = "gaussian"

    def __post_init__(self):
        if self.preset not in LAYER_PRESETS:
            raise UnguideError(f"unknown layer preset {self.preset!r}: use {', '.join(LAYER_PRESETS)}")
        if self.a_init not in A_INITS:
            raise UnguideError(f"unknown A init {self.a_init!r}: use {' or '.join(A_INITS)}")
        if self.rank < 1:
            raise UnguideError(f"the LoRA rank must be >= 1 (got {self.rank})")


# The projections that carry the text into the image: a UNet's cross-attention key/value (ESD-x's ``attn2.to_k/to_v``);
# in an MMDiT (SD3, toyworld-flow) text and image attend jointly, and the text tokens' own key/value projections
# (``attn.add_k_proj/add_v_proj``, the context stream) are their analogue (docs/model-families.md).
# Flux: the double-stream blocks' context key/value only. Its single-stream blocks project text and image tokens with
# one shared ``to_k/to_v``, so a LoRA there edits every image's own attention, not just what the text brings
# (docs/model-families.md).
TEXT_KEY_VALUE = {"unet": ("attn2.to_k", "attn2.to_v"), "mmdit": ("attn.add_k_proj", "attn.add_v_proj"),
                  "flux": ("attn.add_k_proj", "attn.add_v_proj")}
# Where the ``object`` LoRA goes: the layers that read the text encoder's states themselves. On a UNet those are the
# cross-attention key/value. In a joint-attention transformer the context stream's key/value read text tokens that
# every earlier block has mixed with the image, and what a LoRA changes there is carried on through every later
# block: on toyworld-flow the other classes' images moved further from the base model's than with a LoRA on the
# context embedder, whose rank-1 input side reads the encoder's own token directions (sun, star, boat, 8 seeds: SSIM
# 0.31 / 0.46 / 0.58 against 0.42 / 0.71 / 0.70 at anchor weight 1 / 16 / 64; docs/model-families.md). Flux takes
# the same by construction (no Flux-shaped model here).
TEXT_ENTRY = {"unet": ("attn2.to_k", "attn2.to_v"), "mmdit": ("context_embedder",), "flux": ("context_embedder",)}
STOCK_PIPELINE = {"unet": "StableDiffusionPipeline", "mmdit": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


def denoiser_kind(unet: nn.Module) -> str:
    """"flux", "mmdit" (SD3-style) or "unet" (UNet2DConditionModel)."""
    from ..models.transformers import is_flux, is_transformer

    return "flux" if is_flux(unet) else "mmdit" if is_transformer(unet) else "unet"


def target_modules(unet: nn.Module, preset: str) -> list[str]:
    kind = denoiser_kind(unet)
    text_kv = TEXT_KEY_VALUE[kind]
    names = [n for n, m in unet.named_modules() if isinstance(m, nn.Linear)]
    if preset == "object":
        chosen = [n for n in names if n.endswith(TEXT_ENTRY[kind])]
    elif preset == "full":
        chosen = [n for n in names if n.endswith(text_kv)]
    elif preset == "explicit":
        if kind != "unet":  # every block Linear but the text key/value; no embedders, no output projection
            chosen = [n for n in names if n.startswith(("transformer_blocks.", "single_transformer_blocks."))
                      and not n.endswith(text_kv)]
        else:
            chosen = [n for n in names if ".attn2." not in n and not n.startswith("time_embedding")
                      and not n.startswith("conv_out")]
    else:
        raise UnguideError(f"unknown layer preset {preset!r}: use object, explicit or full")
    if not chosen:
        raise UnguideError(f"the denoiser has no layers for preset {preset!r} (is it a UNet2DConditionModel or an "
                           "SD3Transformer2DModel?)")
    return chosen


def lora_prefix(unet: nn.Module) -> str:
    """The key prefix of a LoRA file in diffusers' format: ``unet.`` for a UNet, ``transformer.`` for an MMDiT."""
    return "unet" if denoiser_kind(unet) == "unet" else "transformer"


def _keep_float32(params) -> None:
    """Trained weights stay float32 whatever precision the frozen model runs in: Adam's small steps would vanish in
    bfloat16's 8-bit mantissa. peft casts a LoRA layer's input to its weights' dtype and the sum back to the model's."""
    for p in params:
        if p.dtype != torch.float32:
            p.data = p.data.float()


def _input_to_float32(module, args):
    return (args[0].float(), *args[1:])


def _output_to(dtype, module, args, output):
    return output.to(dtype)


class _Adapter:
    """What the trainer and the guide need from an adapter: its trainable tensors and a base-model switch."""

    unet: nn.Module

    def named_parameters(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def parameters(self) -> list[torch.Tensor]:
        return list(self.named_parameters().values())

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.named_parameters().items()}

    def load_trainable_state(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.named_parameters().items():
                p.copy_(tensors[n])


class _PeftLayers:
    """LoRA layers peft injected into the UNet: switched off all at once for the base model, or taken out."""

    unet: nn.Module

    @contextmanager
    def base(self) -> Iterator[None]:
        self.unet.disable_adapters()
        try:
            yield
        finally:
            self.unet.enable_adapters()

    def remove(self) -> None:
        """Take the adapter(s) out of the UNet, leaving the base model's modules as they were."""
        self.unet.unload_lora()


class LoraAdapter(_PeftLayers, _Adapter):
    """A peft LoRA adapter injected into the UNet; base = adapter layers disabled."""

    kind = "lora"
    name = ADAPTER_NAME  # peft's adapter name; members of a group of runs get their own (GroupAdapter)

    def __init__(self, unet, cfg: AdapterConfig, init_seed: int = 0):
        from peft import LoraConfig

        self.unet, self.cfg = unet, cfg
        modules = target_modules(unet, cfg.preset)
        lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha * cfg.rank, target_modules=modules,
                          init_lora_weights=_PEFT_INIT[cfg.a_init])
        with torch.random.fork_rng():
            torch.manual_seed(init_seed)
            unet.add_adapter(lcfg, adapter_name=ADAPTER_NAME)
        self.lora_config = lcfg
        _keep_float32(self.parameters())  # peft made them in the model's dtype (its init rounded to it)
        self.unet.requires_grad_(False)
        for p in self.parameters():
            p.requires_grad_(True)

    def named_parameters(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.unet.named_parameters() if "lora_" in n and f".{self.name}." in n}

    def _text_layers(self) -> list:
        return [m for n, m in self.unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))
                and self.name in getattr(m, "lora_A", {})]

    def has_text_projections(self) -> bool:
        return bool(self._text_layers())

    def text_projections(self) -> list[torch.Tensor]:
        """The down-projections (A, rank x text width) of the LoRA layers that read the text states directly."""
        layers = self._text_layers()
        if not layers:
            raise UnguideError("the response scorer needs a UNet's cross-attention key/value LoRA (layer preset "
                               "'object' on a UNet): use `scorer` fast")
        return [m.lora_A[self.name].weight.detach() for m in layers]

    def save(self, directory: str | Path) -> Path:
        import diffusers
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet, adapter_name=self.name))
        directory = Path(directory)
        tmp = directory / ".lora_tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        meta = {"r": self.cfg.rank, "lora_alpha": self.cfg.alpha * self.cfg.rank, "target_modules": self.lora_config.target_modules,
                "init_lora_weights": _PEFT_INIT[self.cfg.a_init]}
        meta["target_modules"] = sorted(meta["target_modules"])
        prefix = lora_prefix(self.unet)  # the family's stock pipeline writes the file (its layout, its metadata key)
        getattr(diffusers, STOCK_PIPELINE[denoiser_kind(self.unet)]).save_lora_weights(
            str(tmp), safe_serialization=True, **{f"{prefix}_lora_layers": state, f"{prefix}_lora_adapter_metadata": meta})
        (tmp / LORA_FILE).replace(directory / LORA_FILE)
        tmp.rmdir()
        return directory / LORA_FILE


class FullAdapter(_Adapter):
    """ESD-x style fine-tune of cross-attention key/value weights, with the base weights kept aside."""

    kind = "full"

    def __init__(self, unet, cfg: AdapterConfig, init_seed: int = 0):
        self.unet, self.cfg = unet, cfg
        self.modules = {n: unet.get_submodule(n) for n in target_modules(unet, "full")}
        self.model_dtype = next(iter(self.modules.values())).weight.dtype
        self._hooks = []
        if self.model_dtype != torch.float32:  # float32 weights: these layers compute in float32, hand back the model's dtype
            for m in self.modules.values():
                m.float()
                self._hooks += [m.register_forward_pre_hook(_input_to_float32),
                                m.register_forward_hook(partial(_output_to, self.model_dtype))]
        self.base_weights = {n: m.weight.detach().clone() for n, m in self.modules.items()}
        self.unet.requires_grad_(False)
        for m in self.modules.values():
            m.weight.requires_grad_(True)

    def named_parameters(self) -> dict[str, torch.Tensor]:
        return {f"{n}.weight": m.weight for n, m in self.modules.items()}

    @contextmanager
    def base(self) -> Iterator[None]:
        tuned = {n: m.weight.data for n, m in self.modules.items()}
        for n, m in self.modules.items():
            m.weight.data = self.base_weights[n]
        try:
            yield
        finally:
            for n, m in self.modules.items():
                m.weight.data = tuned[n]

    def remove(self) -> None:
        with torch.no_grad():
            for n, m in self.modules.items():
                m.weight.data = self.base_weights[n]
                m.weight.requires_grad_(False)
                m.to(self.model_dtype)  # exact: the float32 copy of weights that were in this dtype
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / FULL_FILE
        save_tensors(path, self.trainable_state(), metadata={"format": "unguide-full", "preset": "full"})
        return path


def make_adapter(unet, cfg: AdapterConfig, init_seed: int = 0):
    return FullAdapter(unet, cfg, init_seed) if cfg.preset == "full" else LoraAdapter(unet, cfg, init_seed)


def load_adapter(unet, run_dir: str | Path, cfg: AdapterConfig, name: str = ADAPTER_NAME):
    """Attach a finished erasure run's weights to the UNet (LoRA through diffusers' own loader) as adapter ``name``."""
    run_dir = Path(run_dir)
    if cfg.preset == "full":
        adapter = FullAdapter(unet, cfg)
        adapter.load_trainable_state(load_tensors(run_dir / FULL_FILE))
        unet.requires_grad_(False)
        return adapter
    path = run_dir / LORA_FILE
    if not path.is_file():
        raise UnguideError(f"{run_dir} has no {LORA_FILE}: is it a finished `unguide erase` run?")
    header = tensor_metadata(path)  # checked: a damaged or pickled file is one clear error
    try:
        raw = json.loads(header.get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError:
        raise UnguideError(f"{path}: its adapter metadata is not valid JSON: the file is damaged, rerun `unguide erase`") from None
    prefix = lora_prefix(unet)
    meta = {k.split(".", 1)[1]: v for k, v in raw.items() if k.startswith(f"{prefix}.")}
    adapter = LoraAdapter.__new__(LoraAdapter)
    adapter.unet, adapter.cfg, adapter.name = unet, cfg, name
    # the adapter config (lora_alpha: the scale 8) lives in the file's metadata; without it peft would use alpha = 1
    unet.load_lora_adapter(load_tensors(path), prefix=prefix, adapter_name=name)  # our checked reader
    if meta:  # load_lora_adapter ignores that metadata here: set the saved scale on every LoRA layer ourselves
        scale = float(meta["lora_alpha"]) / float(meta["r"])
        for m in unet.modules():
            if name in getattr(m, "scaling", {}):
                m.scaling[name] = scale
        unet.peft_config[name].lora_alpha = meta["lora_alpha"]
    from peft import LoraConfig

    adapter.lora_config = LoraConfig(**{k: v for k, v in meta.items() if k in ("r", "lora_alpha", "target_modules")}) \
        if meta else None
    _keep_float32(adapter.parameters())  # as in training: the saved float32 weights, the model's dtype elsewhere
    unet.requires_grad_(False)
    return adapter


class GroupAdapter(_PeftLayers):
    """The adapters of several erasure runs (one per concept) in one UNet, each under its own peft name: the base
    model (all off), or any subset on at once (a prompt that shows two concepts is drawn with both erasures)."""

    kind = "group"

    def __init__(self, unet, members: dict[str, LoraAdapter]):
        self.unet, self.members = unet, dict(members)
        self._on: tuple = tuple(self.members)
        self._activate(self._on)

    def _activate(self, names) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        wanted = [self.members[n].name for n in names]
        for m in self.unet.modules():
            if isinstance(m, BaseTunerLayer):
                m.set_adapter(wanted, inference_mode=True)  # scales untouched (diffusers' set_adapters would reset them)

    @contextmanager
    def only(self, names) -> Iterator[None]:
        """The members ``names`` on, the others off, for the block."""
        names, before = tuple(names), self._on
        self._activate(names)
        self._on = names
        try:
            yield
        finally:
            self._activate(before)
            self._on = before

    def parameters(self) -> list[torch.Tensor]:
        return [p for a in self.members.values() for p in a.parameters()]
