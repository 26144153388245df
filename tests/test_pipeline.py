"""UnGuidePipeline: a diffusers pipeline that saves and loads as one, and the path `unguide generate` takes."""
import json

import numpy as np
import pytest
import torch

from unguide import GuidanceConfig, UnGuidePipeline, UnguideError, load_model
from unguide.cli import main
from unguide.erasure.concepts import ConceptSpec
from unguide.erasure.training import EraseConfig, erase
from unguide.generation.folders import read_png_metadata

CAT = ConceptSpec(target="a photo of the cat", reference="a photo of the forest", name="cat", synonyms=["kitty"],
                  other=["a dog"])
PROMPTS = ["a photo of the cat", "a dog"]
EMPTY_GATE = GuidanceConfig(gate="empty")


@pytest.fixture(scope="module")
def cat_run(tiny_sd, tmp_path_factory):
    run = tmp_path_factory.mktemp("pipe_run") / "cat"
    erase(load_model(str(tiny_sd)), CAT, run, EraseConfig(iterations=2, ddim_steps=5, lr=1e-2), progress=False)
    return run


def _same(images_a, images_b) -> bool:
    return len(images_a) == len(images_b) and all(np.array_equal(np.asarray(a), np.asarray(b))
                                                  for a, b in zip(images_a, images_b))


def _gen(pipe, **kw):
    return pipe(PROMPTS, num_images_per_prompt=2, num_inference_steps=3, seed=7, progress=False, **kw)


def test_save_and_load_round_trip_with_an_erasure(tiny_sd, cat_run, tmp_path):
    from diffusers import DiffusionPipeline

    pipe = UnGuidePipeline.from_pretrained(str(tiny_sd))
    assert isinstance(pipe, DiffusionPipeline) and pipe.bundle.unet is pipe.unet
    base = _gen(pipe)
    pipe.load_erasure(cat_run)
    erased = _gen(pipe, unguidance=EMPTY_GATE)
    assert erased.seeds == [7, 8, 7, 8] and all(w in (-1.0, 2.0) for w in erased.w) and "score" in erased.scores[0]
    assert not _same(erased.images, base.images)

    pipe.save_pretrained(tmp_path / "saved")  # the base model; the run stays in its own directory, and attached
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "UnGuidePipeline" and index["max_length"] == 16 and index["image_size"] == 16
    assert not any("lora" in k for k in load_model(str(tmp_path / "saved")).unet.state_dict())
    assert pipe.erasure_dir == str(cat_run) and _same(_gen(pipe, unguidance=EMPTY_GATE).images, erased.images)

    again = UnGuidePipeline.from_pretrained(tmp_path / "saved")
    assert dict(again.config)["name"] == dict(pipe.config)["name"] == str(tiny_sd)
    assert _same(_gen(again).images, base.images)
    again.load_erasure(cat_run)  # the same weights, so the same fingerprint: the run attaches to the reloaded model
    out = _gen(again, unguidance=EMPTY_GATE)
    assert out.w == erased.w and _same(out.images, erased.images)
    again.unload_erasure()
    assert _same(_gen(again).images, base.images)


def test_saved_toy_model_keeps_its_settings_and_outputs(toy_bundle, tmp_path):
    pipe = UnGuidePipeline.from_bundle(toy_bundle)
    before = pipe("a photo of the sun", num_inference_steps=3, seed=1, progress=False)
    pipe.save_pretrained(tmp_path / "toy")
    pipe.save_pretrained(tmp_path / "toy")  # saving over a saved model replaces it
    loaded = UnGuidePipeline.from_pretrained(tmp_path / "toy")
    keys = ("name", "max_length", "default_guidance", "image_size", "text_states", "text_scale", "info")
    assert {k: dict(loaded.config)[k] for k in keys} == {k: dict(pipe.config)[k] for k in keys}
    b = loaded.bundle
    assert (b.name, b.max_length, b.default_guidance, b.image_size, b.text_states, b.text_scale) == (
        toy_bundle.name, toy_bundle.max_length, toy_bundle.default_guidance, toy_bundle.image_size,
        toy_bundle.text_states, toy_bundle.text_scale)
    assert b.info["world"] == "toyworld" and b.fingerprint() == toy_bundle.fingerprint()
    assert _same(loaded("a photo of the sun", num_inference_steps=3, seed=1, progress=False).images, before.images)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]  # no temporary directories left behind


def test_cli_generate_is_the_pipeline(tiny_sd, cat_run, tmp_path):
    assert main(["generate", "--model", str(tiny_sd), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--n", "2",
                 "--seed", "7", "--steps", "3", "--erasure", str(cat_run), "--gate", "empty",
                 "--out", str(tmp_path)]) == 0
    pipe = UnGuidePipeline.from_pretrained(str(tiny_sd))
    pipe.load_erasure(cat_run)
    out = _gen(pipe, unguidance=EMPTY_GATE)
    files = ["00000_000.png", "00000_001.png", "00001_000.png", "00001_001.png"]
    from PIL import Image

    assert _same([Image.open(tmp_path / f) for f in files], out.images)
    assert [read_png_metadata(tmp_path / f)["w"] for f in files] == out.w


def test_call_options_and_errors(tiny_sd):
    pipe = UnGuidePipeline.from_pretrained(str(tiny_sd))
    pipe.set_progress_bar_config(disable=True)
    arr = pipe(PROMPTS, num_inference_steps=2, output_type="np")
    assert arr.images.shape == (2, 16, 16, 3) and arr.w == [None, None]
    tensors, prompts, seeds, w, scores, decisions = pipe("a dog", num_inference_steps=2, height=24, output_type="pt",
                                                         return_dict=False)
    assert tensors.shape == (1, 3, 24, 16) and seeds == [0] and prompts == ["a dog"] and decisions == [None]
    drawn = pipe("a dog", num_inference_steps=2, generator=torch.Generator().manual_seed(3))
    assert drawn.seeds == [int(torch.randint(0, 2**31 - 1, (1,), generator=torch.Generator().manual_seed(3)))]
    pipe.enable_vae_slicing()
    sliced = pipe(PROMPTS, num_inference_steps=2, output_type="np")
    assert pipe.vae.use_slicing and np.allclose(sliced.images, arr.images, atol=1e-5)
    for call, fragment in [(lambda: pipe("a dog", unguidance=GuidanceConfig(mode="lora")), "need an erasure run"),
                           (lambda: pipe("a dog", num_inference_steps=0), "number of inference steps must be at least 1"),
                           (lambda: pipe("  "), "empty `prompt`"),
                           (lambda: pipe("a dog", output_type="latents"), "unknown output_type"),
                           (lambda: UnGuidePipeline.from_pretrained(str(tiny_sd), variant="fp16"), "torch_dtype"),
                           (lambda: pipe.enable_model_cpu_offload(), "one device")]:
        with pytest.raises(UnguideError, match=fragment):
            call()


def test_to_moves_the_bundle_and_drops_its_text_cache(tiny_sd):
    pipe = UnGuidePipeline.from_pretrained(str(tiny_sd))
    pipe("a dog", num_inference_steps=1, progress=False)
    assert pipe.bundle._text_cache
    assert pipe.to("cpu") is pipe and not pipe.bundle._text_cache and pipe.bundle.device == torch.device("cpu")
