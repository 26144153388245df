"""--dtype: the frozen model runs in bfloat16/float16 while erasure trains float32 weights; runs attach at any
precision (the fingerprint is taken before the cast)."""
import json
import math

import pytest
import torch
from safetensors import safe_open

from unguide import GuidanceConfig, UnGuidePipeline, UnguideError, load_model
from unguide.erasure.adapters import AdapterConfig, make_adapter
from unguide.cli import main
from unguide.generation.folders import read_png_metadata
from unguide.sampling.ddim import model_output


@pytest.mark.slow
def test_bfloat16_erase_then_generate_end_to_end(tiny_sd, tmp_path):
    run = tmp_path / "run"
    assert main(["erase", "--model", str(tiny_sd), "--concept", "sun", "--iterations", "2", "--dtype", "bfloat16",
                 "--calibration-steps", "3", "--calibration-samples", "1", "--out", str(run)]) == 0
    meta = json.loads((run / "erasure.json").read_text())
    assert meta["dtype"] == "bfloat16" and len(meta["losses"]) == 2 and all(math.isfinite(x) for x in meta["losses"])
    with safe_open(str(run / meta["weights"]), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.float32}

    args = ["generate", "--model", str(tiny_sd), "--prompt", "a photo of the sun", "--n", "2", "--steps", "3",
            "--erasure", str(run), "--gate", "empty"]
    assert main(args + ["--dtype", "bfloat16", "--out", str(tmp_path / "bf16")]) == 0
    png = read_png_metadata(tmp_path / "bf16" / "00000_001.png")
    assert png["dtype"] == "bfloat16" and png["w"] in (0.0, 1.0)  # the selective recipe: keep w = 1, erase w = 0
    assert json.loads((tmp_path / "bf16" / "run.json").read_text())["dtype"] == "bfloat16"
    assert main(args + ["--out", str(tmp_path / "fp32")]) == 0  # a run erased in bfloat16 attaches in float32 too
    assert "dtype" not in read_png_metadata(tmp_path / "fp32" / "00000_000.png")


def test_load_model_casts_after_fingerprinting(tiny_sd, toy_bundle):
    fp32 = load_model(str(tiny_sd))
    bf16 = load_model(str(tiny_sd), dtype="bfloat16")
    assert {m.dtype for m in (bf16.unet, bf16.vae, bf16.text_encoder)} == {torch.bfloat16}
    assert bf16.encode_prompts(["a dog"]).dtype == torch.bfloat16
    assert bf16.fingerprint() == fp32.fingerprint()
    toy = load_model("toyworld", dtype=torch.bfloat16)
    assert toy.text_encoder.dtype == torch.bfloat16 and toy.fingerprint() == toy_bundle.fingerprint()
    with pytest.raises(UnguideError, match="unknown dtype 'float64'"):
        load_model(str(tiny_sd), dtype="float64")


def test_pipeline_to_dtype_keeps_runs_attachable(tiny_sd, tmp_path):
    from unguide.erasure.concepts import ConceptSpec
    from unguide.erasure.training import EraseConfig, erase

    run = tmp_path / "run"
    erase(load_model(str(tiny_sd)), ConceptSpec(target="a cat", reference="a tree", name="cat"), run,
          EraseConfig(iterations=1, ddim_steps=4), progress=False)
    pipe = UnGuidePipeline.from_pretrained(str(tiny_sd))
    pipe("a cat", num_inference_steps=1, progress=False)
    pipe.to(torch.bfloat16)
    assert pipe.bundle.unet.dtype == torch.bfloat16 and not pipe.bundle._text_cache
    pipe.load_erasure(run)
    out = pipe("a cat", num_inference_steps=2, unguidance=GuidanceConfig(gate="empty"), output_type="pt", progress=False)
    assert torch.isfinite(out.images).all() and out.w[0] in (-1.0, 2.0)


@pytest.mark.parametrize("preset", ["object", "full"])
def test_trained_weights_stay_float32_in_a_bfloat16_model(tiny_sd, preset):
    bundle = load_model(str(tiny_sd), dtype="bfloat16")
    before = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    adapter = make_adapter(bundle.unet, AdapterConfig(preset=preset, a_init="uniform"))
    assert {p.dtype for p in adapter.parameters()} == {torch.float32}
    out = model_output(bundle.unet, torch.randn(1, 4, 8, 8, dtype=torch.bfloat16), 500,
                   bundle.encode_prompts(["a cat"]))
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in adapter.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    adapter.remove()
    after = bundle.unet.state_dict()
    assert set(after) == set(before) and all(after[k].dtype == before[k].dtype and torch.equal(after[k], before[k])
                                             for k in before)


def test_resuming_in_another_dtype_is_refused(tiny_sd, tmp_path, capsys):
    from unguide.erasure.concepts import ConceptSpec
    from unguide.erasure.training import EraseConfig, erase

    spec, cfg = ConceptSpec(target="a cat", reference="a tree", name="cat"), EraseConfig(iterations=3, ddim_steps=4)
    assert erase(load_model(str(tiny_sd)), spec, tmp_path, cfg, progress=False, stop_after=1)["status"] == "interrupted"
    with pytest.raises(UnguideError, match="trained in float32: resume it with `dtype` float32"):
        erase(load_model(str(tiny_sd), dtype="bfloat16"), spec, tmp_path, cfg, progress=False)


def test_bad_dtype_is_a_usage_error(tmp_path, capsys):
    code = main(["generate", "--dtype", "float64", "--prompt", "x", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "invalid choice: 'float64'" in err[-1]
    assert not (tmp_path / "o").exists()
