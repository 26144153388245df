"""Erasure recipes: the reference recipe's reproducibility, the selective recipe's anchor term, resume and anchors."""
import json

import pytest
import torch
from safetensors.torch import load_file

from unguide import load_model
from unguide.erasure.adapters import make_adapter
from unguide.cli import main
from unguide.erasure.concepts import ConceptSpec, load_preset
from unguide.erasure.runs import read_run
from unguide.erasure.objective import erasure_loss
from unguide.erasure.training import EraseConfig, concept_prompts, erase
from unguide.errors import UnguideError
from unguide.sampling.ddim import make_sampler

ANCHORS = ["", "a photo of the house", "a photo of the tree", "a photo of the river"]
CAT = ConceptSpec(target="a photo of the cat", reference="a photo of the forest", name="cat", synonyms=["kitty"],
                  other=["a dog", "a photo of the car"], anchors=ANCHORS)


@pytest.mark.slow
def test_reference_recipe_gives_the_adapter_it_gave_before(tmp_path):
    """Same seed, same tensors as before the recipes existed (values recorded from that code on this machine type,
    2 threads; the tolerance only absorbs float reduction order across thread counts: another random stream, an
    anchor term or another A init each move these figures by far more)."""
    assert EraseConfig.from_recipe("reference") == EraseConfig()
    meta = erase(load_model("toyworld"), load_preset("sun"), tmp_path / "r", EraseConfig(iterations=4, seed=5,
                 calibration_steps=2), progress=False)  # the gates' calibration is not what this test checks
    assert meta.losses == pytest.approx([0.107894, 0.020984, 0.014819, 0.012068], rel=2e-5, abs=2e-6)
    t = load_file(str(tmp_path / "r" / "pytorch_lora_weights.safetensors"))
    up = sum(float(v.double().abs().sum()) for k, v in t.items() if "lora.up" in k)
    down = sum(float(v.double().abs().sum()) for k, v in t.items() if "lora.down" in k)
    assert up == pytest.approx(0.09813028025882886, rel=1e-5) and down == pytest.approx(4193.864823150012, rel=1e-7)
    assert meta.anchors == [] and meta.defaults.gate == "empty" and meta.defaults.keep == "paper"


def test_anchor_term_is_zero_at_init_and_its_gradient_reaches_A(tiny_sd):
    bundle = load_model(str(tiny_sd))
    cfg = EraseConfig.from_recipe("selective", ddim_steps=8)
    adapter = make_adapter(bundle.unet, cfg.adapter_config(), init_seed=0)
    erased, ref, empty = concept_prompts(bundle, CAT, cfg)
    prompts = (erased[0], ref, empty)
    anchors = bundle.encode_prompts(ANCHORS[1:3])
    sched = make_sampler(bundle, cfg.ddim_steps)
    z = torch.randn(1, *bundle.latent_shape(), generator=torch.Generator().manual_seed(0))
    _, parts = erasure_loss(bundle.unet, adapter, sched, cfg, 3, 700, z, prompts, anchors)
    # B = 0: the adapted model is the base model; the base side runs 4 rows and the adapted side 3, and on this
    # machine (2026-12-04) CPU kernels summed them in another order (1.3e-14), so equal to float rounding, not bit for bit
    assert abs(parts["anchor"]) < 1e-10
    with torch.no_grad():  # as after some erasure steps: B no longer zero
        for name, p in adapter.named_parameters().items():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    grads = {}
    for weight in (0.0, 1.0):
        adapter.unet.zero_grad(set_to_none=True)
        loss, parts = erasure_loss(bundle.unet, adapter, sched, EraseConfig.from_recipe("selective", ddim_steps=8,
                                   anchor_weight=weight), 3, 700, z, prompts, anchors)
        loss.backward()
        grads[weight] = {n: p.grad.clone() for n, p in adapter.named_parameters().items() if "lora_A" in n}
    assert parts["anchor"] > 0
    diff = sum((grads[1.0][n] - grads[0.0][n]).abs().sum().item() for n in grads[1.0])
    assert diff > 0  # the anchor term's own gradient reaches the down-projection A
    adapter.remove()


def test_selective_run_resumes_to_the_same_adapter(tiny_sd, tmp_path):
    cfg = EraseConfig.from_recipe("selective", iterations=5, ddim_steps=8, checkpoint_every=2, anchors_per_step=2,
                                  calibration_steps=2)  # the adapters are compared, not the image gate
    erase(load_model(str(tiny_sd)), CAT, tmp_path / "a", cfg, progress=False)
    assert erase(load_model(str(tiny_sd)), CAT, tmp_path / "b", cfg, progress=False, stop_after=3)["status"] == "interrupted"
    erase(load_model(str(tiny_sd)), CAT, tmp_path / "b", cfg, progress=False)
    a = load_file(str(tmp_path / "a" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [1, 2, 3, 4, 5] and all(len(r["anchors"]) == 2 for r in log)


@pytest.mark.slow
def test_a_run_from_before_a_setting_existed_still_attaches(tiny_sd, tmp_path):
    """A stored config without a newer setting reads as that setting's default (no 'other settings' error)."""
    bundle = load_model(str(tiny_sd))
    cfg = EraseConfig(iterations=2, ddim_steps=8)
    first = erase(bundle, CAT, tmp_path / "r", cfg, progress=False)
    meta = json.loads((tmp_path / "r" / "erasure.json").read_text())
    del meta["config"]["erase_synonyms"]
    (tmp_path / "r" / "erasure.json").write_text(json.dumps(meta))
    assert erase(bundle, CAT, tmp_path / "r", cfg, progress=False).losses == first.losses
    with pytest.raises(UnguideError, match="other settings"):
        erase(bundle, CAT, tmp_path / "r", EraseConfig(iterations=2, ddim_steps=8, erase_synonyms=True), progress=False)


def test_anchor_file_overrides_the_concepts_anchors(tiny_sd, tmp_path):
    path = tmp_path / "anchors.txt"
    path.write_text('# comment\n""\na photo of the boat\n\na photo of the boat\n')
    (tmp_path / "words.txt").write_text("a photo of the lamp\n")
    assert main(["erase", "--model", str(tiny_sd), "--concept", "sd-cat", "--anchors", str(path), "--iterations", "2",
                 "--vocabulary", str(tmp_path / "words.txt"), "--calibration-steps", "2", "--out", str(tmp_path / "run")]) == 0
    meta = read_run(tmp_path / "run")
    assert meta.anchors == ["", "a photo of the boat", "a photo of the lamp"]  # the anchors, then the vocabulary
    assert meta.config["recipe"] == "selective"
    assert set(meta.calibration.prompt["anchor_scores"]) == {"", "a photo of the boat"}  # the vocabulary is not calibrated on


def test_a_vocabulary_is_trained_like_the_anchors_but_the_gate_is_calibrated_on_the_anchors(tiny_sd, tmp_path):
    vocabulary = ["a photo of the chair", "a photo of the lamp", "a photo of the house"]  # a repeat is trained once
    spec = ConceptSpec(**{**CAT.to_dict(), "vocabulary": vocabulary, "anchors_per_step": 2})
    cfg = EraseConfig.for_concept("selective", spec, iterations=3, ddim_steps=8, calibration_steps=2)
    assert cfg.anchors_per_step == 2  # the spec's, where no flag is given; a flag wins
    assert EraseConfig.for_concept("selective", spec, anchors_per_step=3).anchors_per_step == 3
    assert EraseConfig.for_concept("reference", spec).anchors_per_step == 1
    meta = erase(load_model(str(tiny_sd)), spec, tmp_path / "run", cfg, progress=False)
    assert meta.anchors == ANCHORS + vocabulary[:2]
    assert set(meta.calibration.prompt["anchor_scores"]) == set(ANCHORS)  # the vocabulary is not calibrated on
    rows = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    drawn = [a for r in rows for a in r["anchors"]]
    assert all(len(r["anchors"]) == 2 for r in rows) and set(drawn) <= set(meta.anchors)
    assert set(drawn) & set(vocabulary[:2])  # the vocabulary is trained on
