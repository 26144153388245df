"""``toyworld-flow``: the toy world's MMDiT trained by rectified flow. Its trainer resumes to the same weights as an
uninterrupted run (the same loop as the UNet's), its export loads as an SD3-family flow model that draws, and its
erasure trains LoRA on the context embedder (where the text enters) with the transformer's anchor weight."""
import json
import shutil

import pytest
import torch

from unguide.cli import main
from unguide.erasure.recipes import ANCHOR_WEIGHT_MMDIT
from unguide.errors import UnguideError
from unguide.toyworld.train_flow import FlowConfig, train_flow

TINY = dict(steps=4, batch_size=4, dataset_size=48, num_layers=1, num_heads=2, checkpoint_every=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An uninterrupted 4-step training and one stopped after 2 steps then resumed (sharing the encoded data)."""
    torch.manual_seed(0)
    straight = tmp_path_factory.mktemp("flow") / "straight"
    train_flow(straight, FlowConfig(**TINY))
    resumed = straight.parent / "resumed"
    resumed.mkdir()
    shutil.copy(straight / "unet_data.safetensors", resumed / "unet_data.safetensors")
    train_flow(resumed, FlowConfig(**TINY, stop_after=2))
    assert json.loads((resumed / "mmdit_checkpoint.json").read_text())["step"] == 2
    train_flow(resumed, FlowConfig(**TINY))
    return straight, resumed


@pytest.mark.slow
def test_an_interrupted_training_resumes_to_the_same_weights(trained):
    from unguide.io import load_tensors

    straight, resumed = trained
    a = load_tensors(straight / "mmdit_checkpoint.safetensors")
    b = load_tensors(resumed / "mmdit_checkpoint.safetensors")
    # equal to float rounding (1e-8 measured: the same batches, noise and optimiser state; a resume that restarted
    # the schedule or lost Adam's moments moves weights by ~lr = 3e-4 per step)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a if k.startswith(("model.", "ema.")))


@pytest.mark.slow
def test_the_export_is_a_flow_model_that_draws_and_erases(trained, tmp_path):
    from unguide import load_model
    from unguide.erasure.runs import read_run

    model = trained[0] / "toyworld-flow"
    bundle = load_model(str(model))
    assert bundle.family.name == "sd3" and bundle.prediction.kind == "flow" and bundle.info["world"] == "toyworld"
    assert bundle.encode_prompts(["a photo of the sun"]).shape == (1, 17, 384)  # 16 MiniLM states + the pooled row
    assert main(["generate", "--model", str(model), "--prompt", "a photo of the sun", "--n", "1", "--steps", "3",
                 "--out", str(tmp_path / "gen")]) == 0
    run = tmp_path / "run"
    assert main(["erase", "--model", str(model), "--concept", "sun", "--iterations", "2", "--calibration-steps", "2",
                 "--out", str(run)]) == 0
    meta = read_run(run)
    assert meta.base_family == "sd3" and meta.lora_loads_with == "StableDiffusion3Pipeline"
    from unguide.io import load_tensors

    keys = load_tensors(run / "pytorch_lora_weights.safetensors")
    # the object preset on an MMDiT: a LoRA on the context embedder alone (adapters.TEXT_ENTRY)
    assert keys and all(k.startswith("transformer.context_embedder.lora_") for k in keys)
    assert meta.config["anchor_weight"] == ANCHOR_WEIGHT_MMDIT  # the selective recipe's weight for a transformer


@pytest.mark.slow
def test_training_continues_from_an_exported_model(trained, tmp_path):
    """``--init-from``: a folder without a checkpoint starts from an exported model's weights at its step count."""
    from unguide.io import load_tensors

    model = trained[0] / "toyworld-flow"
    out = tmp_path / "more"
    out.mkdir()
    shutil.copy(trained[0] / "unet_data.safetensors", out / "unet_data.safetensors")
    train_flow(out, FlowConfig(**{**TINY, "steps": 6, "stop_after": 4}, init_from=str(model)))
    start = load_tensors(out / "mmdit_checkpoint.safetensors")
    exported = load_tensors(trained[0] / "mmdit_checkpoint.safetensors")
    assert json.loads((out / "mmdit_checkpoint.json").read_text())["step"] == 4  # nothing trained: 4 of 4 done
    assert all(torch.equal(start[f"model.{k[4:]}"], v) and torch.equal(start[k], v)
               for k, v in exported.items() if k.startswith("ema."))
    train_flow(out, FlowConfig(**{**TINY, "steps": 6}, init_from=str(model)))
    after = load_tensors(out / "mmdit_checkpoint.safetensors")
    assert json.loads((out / "mmdit_checkpoint.json").read_text())["step"] == 6
    assert any(not torch.equal(after[k], start[k]) for k in start if k.startswith("model."))
    with pytest.raises(UnguideError, match="already has 4 steps"):
        train_flow(tmp_path / "short", FlowConfig(**TINY, init_from=str(model)))


def test_a_missing_toyworld_flow_says_how_to_get_it(monkeypatch, tmp_path, capsys):
    from unguide.toyworld import model

    monkeypatch.setattr(model, "FLOW_WEIGHTS_DIR", tmp_path / "nowhere")
    assert main(["generate", "--model", "toyworld-flow", "--prompt", "a sun", "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert "train-toy --stage mmdit" in err and not (tmp_path / "g").exists()
