"""The selective recipe, the calibrated gate and --keep base (issue: selective erasure)."""
import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from unguide import load_model
from unguide.erasure.adapters import make_adapter
from unguide.evaluation.suites import concept_rows as benchmark_rows
from unguide.cli import main
from unguide.erasure.concepts import PRESET_DIR, ConceptSpec, load_concept_file, load_preset, preset_names, read_anchor_file
from unguide.erasure.training import EraseConfig, _iteration_prompt, attach_erasure, concept_prompts, erase, erasure_loss
from unguide.errors import UnguideError
from unguide.sampling.images import Item, PlainGuide, read_png_metadata, sample_images
from unguide.guidance.unguidance import EvalCounter, Gate, ScorerConfig, gate_threshold, guide_for_run
from unguide.sampling.ddim import make_scheduler
from unguide.toyworld.captions import HELDOUT_SYNONYMS, TRAIN_SYNONYMS
from unguide.toyworld.render import OBJECTS

ANCHORS = ["", "a photo of the house", "a photo of the tree", "a photo of the river"]
CAT = ConceptSpec(target="a photo of the cat", reference="a photo of the forest", name="cat", synonyms=["kitty"],
                  other=["a dog", "a photo of the car"], anchors=ANCHORS)


@pytest.fixture(scope="module")
def selective_run(tiny_sd, tmp_path_factory):
    run = tmp_path_factory.mktemp("sel") / "cat"
    cfg = EraseConfig.from_recipe("selective", iterations=4, ddim_steps=8, lr=1e-2)
    erase(load_model(str(tiny_sd)), CAT, run, cfg, progress=False)
    return run


def test_reference_recipe_gives_the_adapter_it_gave_before(tmp_path):
    """Same seed, same tensors as before the recipes existed (values recorded from that code on this machine type,
    2 threads; the tolerance only absorbs float reduction order across thread counts: another random stream, an
    anchor term or another A init each move these figures by far more)."""
    assert EraseConfig.from_recipe("reference") == EraseConfig()
    meta = erase(load_model("toyworld"), load_preset("sun"), tmp_path / "r", EraseConfig(iterations=4, seed=5),
                 progress=False)
    assert meta["losses"] == pytest.approx([0.107894, 0.020984, 0.014819, 0.012068], rel=2e-5, abs=2e-6)
    t = load_file(str(tmp_path / "r" / "pytorch_lora_weights.safetensors"))
    up = sum(float(v.double().abs().sum()) for k, v in t.items() if "lora.up" in k)
    down = sum(float(v.double().abs().sum()) for k, v in t.items() if "lora.down" in k)
    assert up == pytest.approx(0.09813028025882886, rel=1e-5) and down == pytest.approx(4193.864823150012, rel=1e-7)
    assert meta["anchors"] == [] and meta["gate"]["default"] == "empty" and meta["gate"]["keep"] == "paper"


def test_anchor_term_is_zero_at_init_and_its_gradient_reaches_A(tiny_sd):
    bundle = load_model(str(tiny_sd))
    cfg = EraseConfig.from_recipe("selective", ddim_steps=8)
    adapter = make_adapter(bundle.unet, cfg.adapter_config(), init_seed=0)
    erased, ref, empty = concept_prompts(bundle, CAT, cfg)
    prompts = (erased[0], ref, empty)
    anchors = bundle.encode_prompts(ANCHORS[1:3])
    sched = make_scheduler(bundle, cfg.ddim_steps)
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
    cfg = EraseConfig.from_recipe("selective", iterations=5, ddim_steps=8, checkpoint_every=2, anchors_per_step=2)
    erase(load_model(str(tiny_sd)), CAT, tmp_path / "a", cfg, progress=False)
    assert erase(load_model(str(tiny_sd)), CAT, tmp_path / "b", cfg, progress=False, stop_after=3)["status"] == "interrupted"
    erase(load_model(str(tiny_sd)), CAT, tmp_path / "b", cfg, progress=False)
    a = load_file(str(tmp_path / "a" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [1, 2, 3, 4, 5] and all(len(r["anchors"]) == 2 for r in log)


def test_selective_recipe_erases_the_trained_synonyms_too(tiny_sd, selective_run, tmp_path):
    """Each iteration erases one concept prompt drawn from (seed, i); the reference recipe erases the target alone."""
    bundle = load_model(str(tiny_sd))
    erased, _, _ = concept_prompts(bundle, CAT, EraseConfig.from_recipe("selective"))
    assert len(erased) == 2 and torch.equal(erased[1], bundle.encode_prompts(["a photo of the kitty"]))
    assert len(concept_prompts(bundle, CAT, EraseConfig())[0]) == 1
    log = [json.loads(line) for line in (selective_run / "train_log.jsonl").read_text().splitlines()]
    cfg = EraseConfig.from_recipe("selective", iterations=4, ddim_steps=8, lr=1e-2)
    assert [r["erased"] for r in log] == [_iteration_prompt(cfg, i, 2) for i in range(4)]
    assert {_iteration_prompt(cfg, i, 2) for i in range(40)} == {0, 1}  # both prompts drawn
    meta = json.loads((selective_run / "erasure.json").read_text())
    assert meta["config"]["erase_synonyms"] is True


def test_a_run_from_before_a_setting_existed_still_attaches(tiny_sd, tmp_path):
    """A stored config without a newer setting reads as that setting's default (no 'other settings' error)."""
    bundle = load_model(str(tiny_sd))
    cfg = EraseConfig(iterations=2, ddim_steps=8)
    first = erase(bundle, CAT, tmp_path / "r", cfg, progress=False)
    meta = json.loads((tmp_path / "r" / "erasure.json").read_text())
    del meta["config"]["erase_synonyms"]
    (tmp_path / "r" / "erasure.json").write_text(json.dumps(meta))
    assert erase(bundle, CAT, tmp_path / "r", cfg, progress=False)["losses"] == first["losses"]
    with pytest.raises(UnguideError, match="other settings"):
        erase(bundle, CAT, tmp_path / "r", EraseConfig(iterations=2, ddim_steps=8, erase_synonyms=True), progress=False)


def test_gate_threshold_is_stored_and_used(tiny_sd, selective_run, tmp_path):
    meta = json.loads((selective_run / "erasure.json").read_text())
    gate = meta["gate"]
    assert meta["config"]["a_init"] == "uniform" and meta["anchors"] == ANCHORS
    assert set(gate["anchor_scores"]) == set(ANCHORS) and set(gate["concept_scores"]) == {CAT.target, "a photo of the kitty"}
    expected = (max(gate["anchor_scores"].values()) * min(gate["concept_scores"].values())) ** 0.5
    assert gate["threshold"] == pytest.approx(expected) and gate["default"] == "image" and gate["keep"] == "base"
    assert gate["erase_with"] == "adapter"
    base = ["generate", "--model", str(tiny_sd), "--prompt", "a photo of the cat", "--prompt", "a dog", "--n", "1",
            "--steps", "3", "--erasure", str(selective_run)]
    assert main(base + ["--gate", "calibrated", "--out", str(tmp_path / "calibrated")]) == 0
    m = read_png_metadata(tmp_path / "calibrated" / "00000_000.png")
    assert m["gate"] == "calibrated" and m["threshold"] == gate["threshold"]
    assert m["w"] == (0.0 if m["score"] > gate["threshold"] else 1.0)  # the recipe's erase_with: the adapter alone
    assert main(base + ["--out", str(tmp_path / "default")]) == 0  # the default: the image gate, redraw by the adapter
    m = read_png_metadata(tmp_path / "default" / "00000_000.png")
    assert m["gate"] == "none" and m["image_threshold"] == gate["image"]["threshold"] and not m["erasure"]["note"]
    assert m["w"] == (0.0 if m["image_flagged"] and not m.get("substitute_prompt") else 1.0)
    assert main(base + ["--gate", "1e9", "--out", str(tmp_path / "keep")]) == 0
    assert main(base + ["--gate", "1e-9", "--keep", "paper", "--erase-with", "paper", "--out", str(tmp_path / "erase")]) == 0
    for name in ("00000_000.png", "00001_000.png"):
        assert read_png_metadata(tmp_path / "keep" / name)["w"] == 1.0
        assert read_png_metadata(tmp_path / "erase" / name)["w"] == -1.0


def test_keep_base_is_the_base_image_and_costs_what_plain_generation_costs(tiny_sd, selective_run):
    bundle = load_model(str(tiny_sd))
    adapter, meta = attach_erasure(bundle, selective_run)
    prompts = ["a photo of the cat", "a dog"]
    items = [Item(p, 3, 7.5, 16, 16, prompt_index=i) for i, p in enumerate(prompts)]
    probe = guide_for_run(adapter, meta)
    s_cat, s_dog = probe.scores(bundle, prompts, 7.5)
    assert s_cat != s_dog
    between = str((s_cat * s_dog) ** 0.5)  # one prompt above the gate, one below
    guide = guide_for_run(adapter, meta, gate=between, keep="base", erase_with="paper")  # both rows in the base batch
    imgs, infos = sample_images(bundle, items, steps=4, guide=guide, progress=False)
    with adapter.base():
        plain, _ = sample_images(bundle, items, steps=4, guide=PlainGuide(), progress=False)
    kept = [i for i, info in enumerate(infos) if info["w"] == 1.0]
    erased = [i for i, info in enumerate(infos) if info["w"] == -1.0]
    assert len(kept) == 1 and len(erased) == 1
    assert torch.equal(imgs[kept[0]], plain[kept[0]])  # exactly the base model's image
    assert not torch.equal(imgs[erased[0]], plain[erased[0]])
    # cost, counted by the forward hook, one image of one prompt: the scorer plus plain CFG for a kept prompt
    scorer_evals = ScorerConfig().evals_per_prompt()
    for gate, keep, per_step in (("1e9", "base", 2), ("empty", "paper", 4)):
        guide = guide_for_run(adapter, meta, gate=gate, keep=keep, erase_with="paper")  # fresh: only the run's d("") cached
        counter = EvalCounter(bundle.unet)
        sample_images(bundle, [Item("a photo of the cat", 0, 7.5, 16, 16)], steps=4, guide=guide, progress=False)
        counter.close()
        assert counter.count == scorer_evals + per_step * 4, (gate, keep)  # the empty prompt is never rescored
    adapter.remove()


def test_recipe_and_gate_errors_are_one_line(tiny_sd, selective_run, tmp_path, capsys):
    no_anchors = tmp_path / "c.json"
    no_anchors.write_text(json.dumps({"target": "a photo of the cat", "reference": "a photo of the forest"}))
    cases = [
        (["erase", "--model", str(tiny_sd), "--concept-file", str(no_anchors), "--recipe", "selective",
          "--out", str(tmp_path / "r1")], "has no anchors", tmp_path / "r1"),
        (["erase", "--model", str(tiny_sd), "--concept-file", str(no_anchors), "--recipe", "reference", "--lr=-1",
          "--out", str(tmp_path / "r2")], "--lr: must be above 0", tmp_path / "r2"),
        (["generate", "--model", str(tiny_sd), "--prompt", "a cat", "--erasure", str(selective_run), "--gate", "soon",
          "--out", str(tmp_path / "g")], "--gate 'soon'", None),
        (["erase", "--model", str(tiny_sd), "--concept-file", str(no_anchors), "--anchors", str(tmp_path / "none.txt"),
          "--out", str(tmp_path / "r3")], "anchor file", tmp_path / "r3"),
    ]
    for argv, fragment, out in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], err
        if out is not None:
            assert not out.exists()


def test_anchor_file_overrides_the_concepts_anchors(tiny_sd, tmp_path):
    path = tmp_path / "anchors.txt"
    path.write_text('# comment\n""\na photo of the boat\n\na photo of the boat\n')
    (tmp_path / "words.txt").write_text("a photo of the lamp\n")
    assert main(["erase", "--model", str(tiny_sd), "--concept", "sd-cat", "--anchors", str(path), "--iterations", "2",
                 "--vocabulary", str(tmp_path / "words.txt"), "--out", str(tmp_path / "run")]) == 0
    meta = json.loads((tmp_path / "run" / "erasure.json").read_text())
    assert meta["anchors"] == ["", "a photo of the boat", "a photo of the lamp"]  # the anchors, then the vocabulary
    assert meta["config"]["recipe"] == "selective"
    assert set(meta["gate"]["anchor_scores"]) == {"", "a photo of the boat"}  # the vocabulary is not calibrated on


def test_presets_ship_anchors_that_keep_evaluation_held_out():
    cifar = {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"}
    for name in [n for n in preset_names() if n.startswith("sd-") and n != "sd-nudity"]:
        spec = load_preset(name)
        words = cifar | {w for s in (load_preset(n) for n in preset_names() if n.startswith("sd-"))
                         for w in s.synonyms + s.heldout_synonyms}
        assert len(spec.anchors) >= 50 and "" in spec.anchors
        hits = [a for a in spec.anchors for w in words if re.search(rf"\b{re.escape(w)}\b", a)]
        assert not hits, (name, hits)
    toy_words = set(OBJECTS) | {w for v in (*TRAIN_SYNONYMS.values(), *HELDOUT_SYNONYMS.values()) for s in v
                                for w in s.split()}
    for name in OBJECTS:
        spec = load_preset(name)
        rows = benchmark_rows(spec)
        kept = {r["class"] for r in rows if r["role"] == "anchor"}
        held_out = {r["class"] for r in rows if r["role"] == "other"}
        named = {w for a in spec.anchors for w in toy_words if re.search(rf"\b{re.escape(w)}\b", a)}
        assert len(kept) == 4 and len(held_out) == 5 and named <= kept, (name, named - kept)
    vocabulary = read_anchor_file(PRESET_DIR / "anchors" / "toy_vocabulary.txt")
    assert len(vocabulary) >= 50 and not [a for a in vocabulary for w in toy_words if w in a]  # no toy word inside
    sun = benchmark_rows(load_preset("sun"))
    assert [r["class"] for r in sun if r["role"] == "anchor"] == ["moon", "star", "heart", "house"]
    assert [r["class"] for r in sun if r["role"] == "other"] == ["tree", "fish", "flower", "boat", "umbrella"]


def test_response_scorer_needs_no_unet_and_has_its_own_calibration(tiny_sd, selective_run, tmp_path):
    meta = json.loads((selective_run / "erasure.json").read_text())
    response = meta["gate"]["response"]
    assert response["threshold"] > 0 and set(response["anchor_scores"]) == set(ANCHORS)
    bundle = load_model(str(tiny_sd))
    adapter, meta = attach_erasure(bundle, selective_run)
    guide = guide_for_run(adapter, meta, gate="calibrated", scorer=ScorerConfig(kind="response"))
    assert guide.gate.threshold == response["threshold"]
    counter = EvalCounter(bundle.unet)
    infos = guide.decide(bundle, ["a photo of the cat", "a dog"], 7.5)
    counter.close()
    assert counter.count == 0  # scored without a single UNet evaluation
    assert infos[0]["score"] == pytest.approx(response["concept_scores"]["a photo of the cat"], rel=1e-5)
    adapter.remove()
    full = tmp_path / "full"
    erase(load_model(str(tiny_sd)), CAT, full, EraseConfig(preset="full", iterations=2, ddim_steps=8), progress=False)
    assert "response" not in json.loads((full / "erasure.json").read_text())["gate"]


def test_a_calibration_that_does_not_separate_falls_back_to_the_adapter_alone():
    stored = {"default": "calibrated", "keep": "base", "threshold": 1.0, "margin": 0.6, "separated": False}
    guide = guide_for_run(object(), {"gate": stored})
    assert guide.mode == "fixed" and guide.fixed_w == 0.0 and "does not separate" in guide.note
    assert guide.decide(None, ["a photo of the cat"], 7.5) == [{"w": 0.0}]
    trusted = guide_for_run(object(), {"gate": dict(stored, separated=True, margin=2.0)})
    assert trusted.mode == "unguide" and trusted.note is None and trusted.rule.w_keep == 1.0
    for asked in ("empty", "calibrated", "0.5"):  # a gate the caller names is obeyed as given
        assert guide_for_run(object(), {"gate": stored}, gate=asked).mode == "unguide"


def test_a_spec_can_keep_its_synonyms_out_of_the_erasure():
    """The toy 'red' (synonym prompts that name one object) erases its target alone; a flag still overrides the spec."""
    red, sun = load_preset("red"), load_preset("sun")
    assert red.erase_synonyms is False and sun.erase_synonyms is None
    assert EraseConfig.for_concept("selective", red).erase_synonyms is False
    assert EraseConfig.for_concept("selective", red, erase_synonyms=True).erase_synonyms is True
    assert EraseConfig.for_concept("selective", sun).erase_synonyms is True
    assert EraseConfig.for_concept("selective", red).preset == "explicit"
    assert EraseConfig.for_concept("reference", sun) == EraseConfig()


def test_a_spec_may_list_anchors_and_name_an_anchor_file(tmp_path):
    (tmp_path / "vocab.txt").write_text('# shared words\na photo of the chair\n""\na photo of the lamp\n')
    spec = tmp_path / "cat.json"
    spec.write_text(json.dumps({"target": "a photo of the cat", "reference": "a photo of the forest",
                                "anchors": ["a photo of the dog", ""], "anchors_file": "vocab.txt"}))
    assert load_concept_file(spec).anchors == ["a photo of the dog", "", "a photo of the chair", "a photo of the lamp"]


def test_a_spec_sets_the_selective_anchor_weight_but_never_the_reference_recipe(tmp_path, capsys):
    red, sun = load_preset("red"), load_preset("sun")
    assert red.anchor_weight == 2.0 and sun.anchor_weight is None
    assert EraseConfig.for_concept("selective", red).anchor_weight == 2.0
    assert EraseConfig.for_concept("selective", red, anchor_weight=0.5).anchor_weight == 0.5  # a flag wins
    assert EraseConfig.for_concept("selective", sun).anchor_weight == 1.0
    assert EraseConfig.for_concept("reference", red).anchor_weight == 0.0  # the paper's protocol has no anchors
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"target": "a cat", "reference": "a sky", "anchor_weight": "high"}))
    assert main(["erase", "--concept-file", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'anchor_weight' must be a number" in err[0] and not (tmp_path / "run").exists()


def test_a_vocabulary_is_trained_like_the_anchors_but_the_gate_is_calibrated_on_the_anchors(tiny_sd, tmp_path):
    vocabulary = ["a photo of the chair", "a photo of the lamp", "a photo of the house"]  # a repeat is trained once
    spec = ConceptSpec(**{**CAT.to_dict(), "vocabulary": vocabulary, "anchors_per_step": 2})
    cfg = EraseConfig.for_concept("selective", spec, iterations=3, ddim_steps=8)
    assert cfg.anchors_per_step == 2  # the spec's, where no flag is given; a flag wins
    assert EraseConfig.for_concept("selective", spec, anchors_per_step=3).anchors_per_step == 3
    assert EraseConfig.for_concept("reference", spec).anchors_per_step == 1
    meta = erase(load_model(str(tiny_sd)), spec, tmp_path / "run", cfg, progress=False)
    assert meta["anchors"] == ANCHORS + vocabulary[:2]
    assert set(meta["gate"]["anchor_scores"]) == set(ANCHORS)  # the vocabulary is not calibrated on
    rows = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    drawn = [a for r in rows for a in r["anchors"]]
    assert all(len(r["anchors"]) == 2 for r in rows) and set(drawn) <= set(meta["anchors"])
    assert set(drawn) & set(vocabulary[:2])  # the vocabulary is trained on


def test_a_spec_may_give_a_vocabulary_file_and_anchors_per_step(tmp_path, capsys):
    (tmp_path / "words.txt").write_text("# everyday words\na photo of the chair\na photo of the lamp\n")
    spec = tmp_path / "cat.json"
    base = {"target": "a photo of the cat", "reference": "a photo of the forest", "anchors": [""]}
    spec.write_text(json.dumps({**base, "vocabulary": ["a photo of the cup"], "vocabulary_file": "words.txt",
                                "anchors_per_step": 2}))
    loaded = load_concept_file(spec)
    assert loaded.vocabulary == ["a photo of the cup", "a photo of the chair", "a photo of the lamp"]
    assert loaded.anchors == [""] and loaded.anchors_per_step == 2
    for bad, message in (({"anchors_per_step": 0}, "'anchors_per_step' must be >= 1"),
                         ({"anchors_per_step": True}, "'anchors_per_step' must be a whole number"),
                         ({"vocabulary": [3]}, "'vocabulary' must be a list of prompts"),
                         ({"vocabulary_file": "missing.txt"}, "missing.txt not found")):
        spec.write_text(json.dumps({**base, **bad}))
        assert main(["erase", "--concept-file", str(spec), "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and not (tmp_path / "run").exists(), err


def test_the_gate_position_moves_the_calibrated_threshold_between_anchors_and_concept(tiny_sd, selective_run, tmp_path,
                                                                                      capsys):
    gate = json.loads((selective_run / "erasure.json").read_text())["gate"]
    top, low = max(gate["anchor_scores"].values()), min(gate["concept_scores"].values())
    assert gate["position"] == 0.5 and gate["threshold"] == (top * low) ** 0.5  # the stored default, as before
    assert gate_threshold(top, low, 0.0) == pytest.approx(top) and gate_threshold(top, low, 1.0) == pytest.approx(low)
    assert gate_threshold(top, low, 0.3) == pytest.approx(top ** 0.7 * low ** 0.3)
    assert Gate.parse("calibrated", gate, position=0.3).threshold == pytest.approx(top ** 0.7 * low ** 0.3)
    assert Gate.parse("calibrated", gate).threshold == gate["threshold"]  # no position: the run's own threshold
    # a generate-time position is used for the decision and recorded with the image
    base = ["generate", "--model", str(tiny_sd), "--prompt", "a photo of the cat", "--n", "1", "--steps", "2",
            "--erasure", str(selective_run), "--gate", "calibrated"]
    assert main(base + ["--gate-position", "0", "--out", str(tmp_path / "g0")]) == 0
    m = read_png_metadata(tmp_path / "g0" / "00000_000.png")
    assert m["threshold"] == pytest.approx(top) and m["w"] == (0.0 if m["score"] > top else 1.0)
    assert m["erasure"]["gate"]["position"] == 0.0  # the settings recorded with the image say where the gate sat
    # a spec's position fills the selective recipe (a flag wins) and is stored with the run it calibrates
    spec = ConceptSpec(**{**CAT.to_dict(), "gate_position": 0.25})
    assert EraseConfig.for_concept("selective", spec).gate_position == 0.25
    assert EraseConfig.for_concept("selective", spec, gate_position=0.75).gate_position == 0.75
    assert EraseConfig.for_concept("reference", spec).gate_position == 0.5
    meta = erase(load_model(str(tiny_sd)), spec, tmp_path / "run",
                 EraseConfig.for_concept("selective", spec, iterations=2, ddim_steps=8), progress=False)
    g = meta["gate"]
    assert g["position"] == 0.25 and g["threshold"] == pytest.approx(
        max(g["anchor_scores"].values()) ** 0.75 * min(g["concept_scores"].values()) ** 0.25)
    # bad positions: one line, exit 2, nothing written
    spec_file = tmp_path / "cat.json"
    spec_file.write_text(json.dumps({**CAT.to_dict(), "gate_position": 1.5}))
    cases = [(base + ["--gate-position", "2", "--out", str(tmp_path / "b1")], "--gate-position: must be at most 1",
              tmp_path / "b1"),
             (base[:-2] + ["--gate", "empty", "--gate-position", "0.3", "--out", str(tmp_path / "b2")],
              "applies to the calibrated gate only", tmp_path / "b2"),
             (["erase", "--model", str(tiny_sd), "--concept-file", str(spec_file), "--out", str(tmp_path / "b3")],
              "'gate_position' must be between 0", tmp_path / "b3"),
             (["erase", "--model", str(tiny_sd), "--concept", "sd-cat", "--gate-position", "-0.1",
               "--out", str(tmp_path / "b4")], "--gate-position: must be at least 0", tmp_path / "b4")]
    capsys.readouterr()
    for argv, fragment, out in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0] and not out.exists(), err
