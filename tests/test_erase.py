import json

import pytest
import torch
from safetensors.torch import load_file

from unguide import load_model
from unguide.cli import main
from unguide.erasure.concepts import ConceptSpec, load_preset
from unguide.erasure.runs import read_run
from unguide.erasure.training import EraseConfig, erase

CAT = ConceptSpec(target="a photo of the cat", reference="a photo of the forest", name="cat")


def _adapter_tensors(run):
    return load_file(str(run / "pytorch_lora_weights.safetensors"))


def test_resume_gives_the_same_adapter(tiny_sd, tmp_path):
    cfg = EraseConfig(iterations=6, ddim_steps=10, checkpoint_every=2, seed=3)
    erase(load_model(str(tiny_sd)), CAT, tmp_path / "straight", cfg, progress=False)
    first = erase(load_model(str(tiny_sd)), CAT, tmp_path / "resumed", cfg, progress=False, stop_after=3)
    assert first["status"] == "interrupted" and (tmp_path / "resumed" / "checkpoint.safetensors").exists()
    meta = erase(load_model(str(tiny_sd)), CAT, tmp_path / "resumed", cfg, progress=False)
    a, b = _adapter_tensors(tmp_path / "straight"), _adapter_tensors(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta.losses == json.loads((tmp_path / "straight" / "erasure.json").read_text())["losses"]
    assert not (tmp_path / "resumed" / "checkpoint.safetensors").exists()
    log = (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in log] == [1, 2, 3, 4, 5, 6]


def test_lora_file_loads_in_diffusers(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    run = tmp_path / "run"
    erase(load_model(str(tiny_sd)), CAT, run, EraseConfig(iterations=3, ddim_steps=8, lr=1e-2), progress=False)
    bundle = load_model(str(tiny_sd))
    read_run(run).attach(bundle)
    ours = {k: v for k, v in bundle.unet.state_dict().items() if "lora" in k}
    scales = {m.scaling["erasure"] for m in bundle.unet.modules() if "erasure" in getattr(m, "scaling", {})}
    assert scales == {8.0}  # our loader applies the saved scale (alpha 8, rank 1), not peft's default alpha = rank
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None)
    pipe.load_lora_weights(str(run))
    theirs = {k: v for k, v in pipe.unet.state_dict().items() if "lora" in k}
    assert len(ours) == len(theirs) > 0
    assert sorted(v.abs().sum().item() for v in ours.values()) == pytest.approx(sorted(v.abs().sum().item() for v in theirs.values()))
    cfg = next(iter(pipe.unet.peft_config.values()))
    assert cfg.r == 1 and cfg.lora_alpha == 8.0  # scale 8 = alpha / rank survives the round trip
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    states = torch.randn(1, 16, 32)
    with torch.no_grad():
        on = pipe.unet(x, t, encoder_hidden_states=states).sample
        pipe.unet.disable_lora()
        off = pipe.unet(x, t, encoder_hidden_states=states).sample
    assert not torch.allclose(on, off)


@pytest.mark.parametrize("content, fragment", [
    ({"reference": "a photo of the sky"}, "missing field 'target'"),
    ({"target": "  ", "reference": "a photo of the sky"}, "'target' is empty"),
    ({"target": "a sun", "reference": "a sky", "preset": "nope"}, "unknown preset"),
    ({"target": "a sun", "reference": "a sky", "synonyms": "sunshine"}, "must be a list"),
    ({"target": 3, "reference": "a sky"}, "must be a str"),
    ("[1, 2]", "expected a JSON object"),
    ("{not json", "not valid JSON"),
])
def test_bad_concept_files(tmp_path, capsys, content, fragment):
    path = tmp_path / "c.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    code = main(["erase", "--concept-file", str(path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and fragment in err[0]
    assert not (tmp_path / "run").exists()


def test_unknown_concept_preset(tmp_path, capsys):
    assert main(["erase", "--concept", "unicorn", "--out", str(tmp_path / "r")]) == 2
    assert "unknown concept preset" in capsys.readouterr().err


def test_presets_cover_toy_classes_attribute_and_paper():
    for name in ["sun", "boat", "umbrella", "red", "sd-cat", "sd-truck", "sd-nudity"]:
        spec = load_preset(name)
        assert spec.target and spec.reference is not None
    assert load_preset("red").preset == "explicit" and load_preset("sd-nudity").preset == "explicit"
    assert len(load_preset("sun").heldout_synonyms) >= 2 and len(load_preset("sun").other) == 9


def test_erasure_for_another_base_is_refused(tiny_sd, tmp_path, capsys):
    run = tmp_path / "run"
    erase(load_model(str(tiny_sd)), CAT, run, EraseConfig(iterations=2, ddim_steps=5), progress=False)
    code = main(["generate", "--model", "toyworld", "--erasure", str(run), "--prompt", "a photo of the sun",
                 "--out", str(tmp_path / "o"), "--steps", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "another base model" in err[0]


@pytest.mark.parametrize("preset", ["explicit", "full"])
def test_other_layer_presets_train_and_reload(tiny_sd, tmp_path, preset):
    bundle = load_model(str(tiny_sd))
    before = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    erase(bundle, CAT, tmp_path / preset, EraseConfig(preset=preset, iterations=3, ddim_steps=5, lr=1e-2), progress=False)
    fresh = load_model(str(tiny_sd))
    run = read_run(tmp_path / preset)
    adapter = run.attach(fresh)
    assert run.preset == preset
    x, t, s = torch.randn(1, 4, 8, 8), torch.tensor([300]), torch.randn(1, 16, 32)
    with torch.no_grad():
        adapted = fresh.unet(x, t, encoder_hidden_states=s).sample
        with adapter.base():
            base = fresh.unet(x, t, encoder_hidden_states=s).sample
        fresh_base = load_model(str(tiny_sd)).unet(x, t, encoder_hidden_states=s).sample
    assert torch.allclose(base, fresh_base, atol=1e-6) and not torch.allclose(adapted, base)
    after = bundle.unet.state_dict()  # erase leaves the bundle's UNet as the base model
    assert all(torch.equal(before[k], after[k]) for k in before)
    if preset == "explicit":
        names = [k for k in fresh.unet.state_dict() if "lora_A" in k]
        assert names and not any(".attn2." in k or ".time_embedding." in k for k in names)


@pytest.mark.slow
def test_kill_9_then_rerun_gives_the_uninterrupted_adapter(tiny_sd, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    concept = tmp_path / "cat.json"
    concept.write_text(json.dumps({"target": "a photo of the cat", "reference": "a photo of the forest",
                                   "anchors": ["", "a photo of the river"]}))
    cmd = [sys.executable, "-m", "unguide.cli", "erase", "--model", str(tiny_sd), "--concept-file", str(concept),
           "--iterations", "30", "--seed", "5", "--calibration-steps", "2", "--calibration-samples", "1"]  # the default recipe (selective): anchors
    # drawn per iteration too; the image gate's calibration at 2 steps (the adapter is what this test compares)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd + ["--out", str(tmp_path / "straight")], env=env, check=True, capture_output=True)
    proc = subprocess.Popen(cmd + ["--out", str(tmp_path / "killed")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "checkpoint.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    interrupted = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert interrupted, "the run finished before it could be interrupted"
    assert not (tmp_path / "killed" / "erasure.json").exists()
    subprocess.run(cmd + ["--out", str(tmp_path / "killed")], env=env, check=True, capture_output=True)
    a, b = _adapter_tensors(tmp_path / "straight"), _adapter_tensors(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "killed").iterdir())
    log = (tmp_path / "killed" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in log] == list(range(1, 31))
