import json

import numpy as np
import pytest
import torch
from PIL import Image

from unguide import load_model
from unguide.cli import main
from unguide.generation.folders import read_png_metadata
from unguide.sampling.images import Item, sample_images
from unguide.toyworld.classifier import ToyClassifier
from unguide.toyworld.render import OBJECTS


def test_toyworld_bundle_components(toy_bundle):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    b = toy_bundle
    assert isinstance(b.unet, UNet2DConditionModel) and isinstance(b.vae, AutoencoderKL)
    assert isinstance(b.scheduler, DDIMScheduler)
    names = [n for n, _ in b.unet.named_modules()]
    assert any(n.endswith("attn2.to_k") for n in names) and any(n.endswith("attn2.to_v") for n in names)
    states = b.encode_prompts(["a photo of the sun", ""])
    assert states.shape == (2, b.max_length, 384)
    assert b.latent_shape() == (4, 16, 16)


def test_tiny_sd_pipeline_loads_and_generates(tiny_sd):
    b = load_model(str(tiny_sd))
    assert b.image_size == 16 and b.latent_shape() == (4, 8, 8)
    imgs, _ = sample_images(b, [Item("a photo of a cat", 3, 7.5, 16, 16)], steps=4, progress=False)
    again, _ = sample_images(b, [Item("a photo of a cat", 3, 7.5, 16, 16)], steps=4, progress=False)
    assert imgs.shape == (1, 3, 16, 16) and torch.equal(imgs, again)


def test_generate_cli_is_deterministic_and_writes_metadata(tmp_path):
    args = ["generate", "--prompt", "a photo of the house", "--n", "2", "--seed", "5", "--steps", "10"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    for name in ("00000_000.png", "00000_001.png"):
        a = np.asarray(Image.open(tmp_path / "a" / name))
        b = np.asarray(Image.open(tmp_path / "b" / name))
        assert a.shape == (32, 32, 3) and np.array_equal(a, b)
    meta = read_png_metadata(tmp_path / "a" / "00000_001.png")
    assert meta["prompt"] == "a photo of the house" and meta["seed"] == 6 and meta["steps"] == 10
    assert (tmp_path / "a" / "grid.png").exists() and (tmp_path / "a" / "index.jsonl").read_text().count("\n") == 2
    a0 = np.asarray(Image.open(tmp_path / "a" / "00000_000.png"))
    a1 = np.asarray(Image.open(tmp_path / "a" / "00000_001.png"))
    assert not np.array_equal(a0, a1)


def test_generate_requested_size_on_tiny_sd(tiny_sd, tmp_path):
    assert main(["generate", "--model", str(tiny_sd), "--prompt", "a dog", "--n", "1", "--steps", "3", "--height", "24",
                 "--width", "16", "--out", str(tmp_path)]) == 0
    assert Image.open(tmp_path / "00000_000.png").size == (16, 24)


@pytest.mark.slow
def test_base_model_draws_recognisable_classes(toy_bundle):
    """A trained model draws what it is asked; a broken or untrained one scores near chance (~9%)."""
    classes = ["house", "fish", "heart", "umbrella"]
    items = [Item(f"a photo of the {c}", 100 + j, toy_bundle.default_guidance, 32, 32) for c in classes for j in range(8)]
    imgs, _ = sample_images(toy_bundle, items, steps=25, progress=False)
    pred = ToyClassifier.from_pretrained().predict(imgs)["object"].argmax(-1)
    labels = torch.tensor([OBJECTS.index(c) for c in classes for _ in range(8)])
    acc = (pred == labels).float().mean().item()
    assert acc >= 0.8, acc


@pytest.mark.parametrize("model, fragment", [("nonsense model!", "not found"), ("./no/such/dir", "not found"),
                                             ("NOTADIR", "not a diffusion pipeline")])
def test_bad_model_gives_one_line_and_exit_2(tmp_path, capsys, model, fragment):
    if model == "NOTADIR":
        (tmp_path / "empty").mkdir()
        model = str(tmp_path / "empty")
    code = main(["generate", "--model", model, "--prompt", "x", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and fragment in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("index, fragment", [
    ({"_class_name": "StableDiffusionXLImg2ImgPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
      "text_encoder": [None, None], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]},
     "is an SDXL refiner"),
    ({"_class_name": "FluxKontextPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]},
     "has a transformer unguide does not run yet"),
    ({"_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"]},
     "has a transformer unguide does not run yet"),
    ({"_class_name": "KandinskyPipeline", "prior": ["diffusers", "PriorTransformer"]}, "has no UNet and no transformer"),
])
def test_families_not_supported_yet_are_refused_in_one_line(tmp_path, capsys, index, fragment):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model_index.json").write_text(json.dumps(index))
    code = main(["generate", "--model", str(tmp_path / "m"), "--prompt", "a photo of the dog", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and fragment in err[0] and "docs/model-families.md" in err[0], err
    assert not (tmp_path / "o").exists()
