"""UnGuidePipeline follows diffusers' __call__ conventions, and every number is checked where it enters: the same
refusal from the command line (one line, exit 2) and from a Python call (UnguideError)."""
import re

import pytest
import torch

from unguide import UnGuidePipeline, UnguideError
from unguide.cli import main
from unguide.sampling.ddim import initial_noise

STEPS = 3


def conventions(pipe):
    """generator, num_images_per_prompt, latents, callback_on_step_end, negative_prompt and output_type on one pipe."""
    pipe.set_progress_bar_config(disable=True)
    prompt = "a photo of the sun"
    first = pipe(prompt, generator=torch.Generator().manual_seed(0), num_images_per_prompt=2,
                 num_inference_steps=STEPS, output_type="pt")
    again = pipe(prompt, generator=torch.Generator().manual_seed(0), num_images_per_prompt=2,
                 num_inference_steps=STEPS, output_type="pt")
    assert first.images.shape[0] == 2 and torch.equal(first.images, again.images)
    assert not torch.equal(first.images[0], first.images[1])  # image j of a prompt has its own seed

    noise = initial_noise(pipe.bundle.latent_shape(), first.seeds)
    seen = []

    def callback(p, step, timestep, kwargs):
        seen.append((step, int(timestep), tuple(kwargs["latents"].shape)))
        return {}

    from_latents = pipe(prompt, num_images_per_prompt=2, num_inference_steps=STEPS, output_type="pt", latents=noise,
                        callback_on_step_end=callback)
    assert torch.equal(from_latents.images, first.images)  # the same initial noise, the same images
    assert [s for s, _, _ in seen] == list(range(STEPS)) and all(sh[0] == 2 for _, _, sh in seen)
    assert seen[0][1] > seen[-1][1]  # timesteps run downward

    # a callback that replaces the latents changes the result; one that returns nothing does not
    zeroed = pipe(prompt, num_images_per_prompt=2, num_inference_steps=STEPS, output_type="pt", latents=noise,
                  callback_on_step_end=lambda p, i, t, k: {"latents": torch.zeros_like(k["latents"])})
    assert not torch.equal(zeroed.images, first.images)

    latent = pipe(prompt, num_images_per_prompt=2, num_inference_steps=STEPS, output_type="latent", latents=noise)
    assert tuple(latent.images.shape) == (2, *pipe.bundle.latent_shape())
    assert torch.allclose(pipe.bundle.codec.decode(latent.images), first.images, atol=1e-5)

    plain = pipe(prompt, num_inference_steps=STEPS, output_type="pt", seed=5)
    empty_negative = pipe(prompt, num_inference_steps=STEPS, output_type="pt", seed=5, negative_prompt="")
    other_negative = pipe(prompt, num_inference_steps=STEPS, output_type="pt", seed=5, negative_prompt="a photo of the moon")
    assert torch.equal(plain.images, empty_negative.images) and not torch.equal(plain.images, other_negative.images)

    pil = pipe(prompt, num_inference_steps=STEPS, output_type="pil", seed=5)
    assert pil.images[0].size == (plain.images.shape[-1], plain.images.shape[-2])
    with pytest.raises(UnguideError, match="latents must be a tensor of shape"):
        pipe(prompt, num_images_per_prompt=2, num_inference_steps=STEPS, latents=noise[:1])
    with pytest.raises(UnguideError, match="one string per prompt"):
        pipe([prompt, prompt], num_inference_steps=STEPS, negative_prompt=["a", "b", "c"])


def test_pipeline_conventions_on_the_toy_model():
    conventions(UnGuidePipeline.from_pretrained("toyworld"))


def test_pipeline_conventions_on_a_tiny_sd_directory(tiny_sd):
    conventions(UnGuidePipeline.from_pretrained(str(tiny_sd)))


@pytest.mark.parametrize("kwargs, fragment", [
    ({"guidance_scale": float("nan")}, "guidance scale must be a finite number"),
    ({"guidance_scale": float("inf")}, "guidance scale must be a finite number"),
    ({"guidance_scale": -1.0}, "guidance scale must be at least 0"),
    ({"num_inference_steps": 0}, "number of inference steps must be at least 1"),
    ({"height": -8}, "height must be at least 1"),
    ({"width": 0}, "width must be at least 1"),
    ({"num_images_per_prompt": 0}, "images per prompt must be at least 1"),
    ({"seed": -3}, "seed must be at least 0"),
    ({"batch_size": 0}, "batch size must be at least 1"),
])
def test_a_python_call_refuses_bad_numbers(tiny_sd, kwargs, fragment):
    pipe = UnGuidePipeline.from_pretrained(str(tiny_sd))
    with pytest.raises(UnguideError, match=fragment):
        pipe("a dog", **{"num_inference_steps": 1, **kwargs})


@pytest.mark.parametrize("args, fragment", [
    (["generate", "--prompt", "x", "--guidance", "nan"], "argument --guidance: must be a finite number"),
    (["generate", "--prompt", "x", "--steps", "0"], "argument --steps: must be at least 1"),
    (["generate", "--prompt", "x", "--height", "-8"], "argument --height: must be at least 1"),
    (["generate", "--prompt", "x", "--n", "1.5"], "argument --n: must be a whole number"),
    (["erase", "--concept", "sun", "--lr=-1e-3"], "argument --lr: must be above 0"),
    (["benchmark", "--image-gate-position", "inf"], "argument --image-gate-position: must be a finite number"),
    (["attack", "--benchmark", "b", "--samples", "0"], "argument --samples: must be at least 1"),
])
def test_the_cli_refuses_bad_numbers_in_one_line(tmp_path, capsys, args, fragment):
    code = main([*args, "--out", str(tmp_path / "out")] if args[0] != "attack" else args)
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fields, fragment", [
    ({"w": float("nan")}, "`w` must be a finite number"),
    ({"gate": "nan"}, "`gate` 'nan': use calibrated"),
    ({"gate": -0.5}, "`gate` must be above 0"),
    ({"gate": "sometimes"}, "`gate` 'sometimes': use calibrated"),
    ({"gate_position": 1.5}, "`gate_position` must be at most 1"),
    ({"gate": "image", "image_gate_position": float("inf")}, "`image_gate_position` must be a finite number"),
    ({"gate": "empty", "gate_position": 0.3}, "`gate_position` moves the calibrated prompt gate"),
    ({"gate": "empty", "image_gate_position": 0.3}, "`image_gate_position` applies to the image gates only"),
    ({"mode": "lora", "w": 0.5}, "give either `mode` or `w`"),
    ({"keep": "sometimes"}, "unknown `keep`"),
])
def test_a_guidance_config_refuses_bad_values_where_it_is_made(fields, fragment):
    from unguide import GuidanceConfig

    with pytest.raises(UnguideError, match=re.escape(fragment)):
        GuidanceConfig(**fields)
    assert GuidanceConfig(gate="0.25").gate == 0.25 and GuidanceConfig(w=0.5).mode == "fixed"


def test_core_errors_name_parameters_and_the_cli_words_them_as_flags(tmp_path, capsys):
    """A Python caller reads the parameter's name (`gate_position`); the command line reads the flag."""
    from unguide import GuidanceConfig

    with pytest.raises(UnguideError, match="`gate_position`"):
        GuidanceConfig(gate="empty", gate_position=0.3)
    code = main(["generate", "--prompt", "x", "--gate", "empty", "--gate-position", "0.3", "--erasure", "r",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "--gate-position moves the calibrated prompt gate" in err and "`" not in err, err
    code = main(["generate", "--prompt", "x", "--keep", "base", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "--keep need(s) --erasure RUN" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
