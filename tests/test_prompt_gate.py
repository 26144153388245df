"""The calibrated prompt gate stored with a selective run: threshold, position, scorers, keep=base and its errors."""
import json

import pytest
import torch

from unguide import load_model
from unguide.cli import main
from unguide.erasure.concepts import ConceptSpec
from unguide.erasure.runs import ErasureRun, read_run
from unguide.erasure.training import EraseConfig, concept_prompts, erase
from unguide.erasure.schedule import draw_prompt
from unguide.generation.folders import read_png_metadata
from unguide.sampling.images import Item, PlainGuide, sample_images
from unguide.guidance.config import GateSpec, ScorerConfig
from unguide.guidance.decision import Decision
from unguide.guidance.image_gate import ImageGate
from unguide.guidance.prompt_gate import PromptGate, gate_threshold
from unguide.guidance.unguidance import guide_for_run
from unguide.sampling.ddim import EvalCounter

ANCHORS = ["", "a photo of the house", "a photo of the tree", "a photo of the river"]
CAT = ConceptSpec(target="a photo of the cat", reference="a photo of the forest", name="cat", synonyms=["kitty"],
                  other=["a dog", "a photo of the car"], anchors=ANCHORS)


@pytest.fixture(scope="module")
def selective_run(tiny_sd, tmp_path_factory):
    run = tmp_path_factory.mktemp("sel") / "cat"
    cfg = EraseConfig.from_recipe("selective", iterations=4, ddim_steps=8, lr=1e-2, calibration_steps=4,
                                  calibration_samples=2)  # the image gate's calibration is not what these tests read
    erase(load_model(str(tiny_sd)), CAT, run, cfg, progress=False)
    return run


def test_selective_recipe_erases_the_trained_synonyms_too(tiny_sd, selective_run, tmp_path):
    """Each iteration erases one concept prompt drawn from (seed, i); the reference recipe erases the target alone."""
    bundle = load_model(str(tiny_sd))
    erased, _, _ = concept_prompts(bundle, CAT, EraseConfig.from_recipe("selective"))
    assert len(erased) == 2 and torch.equal(erased[1], bundle.encode_prompts(["a photo of the kitty"]))
    assert len(concept_prompts(bundle, CAT, EraseConfig())[0]) == 1
    log = [json.loads(line) for line in (selective_run / "train_log.jsonl").read_text().splitlines()]
    cfg = EraseConfig.from_recipe("selective", iterations=4, ddim_steps=8, lr=1e-2)
    assert [r["erased"] for r in log] == [draw_prompt(cfg, i, 2) for i in range(4)]
    assert {draw_prompt(cfg, i, 2) for i in range(40)} == {0, 1}  # both prompts drawn
    assert read_run(selective_run).config["erase_synonyms"] is True


def test_gate_threshold_is_stored_and_used(tiny_sd, selective_run, tmp_path):
    run = read_run(selective_run)
    gate, image = run.calibration.prompt, run.calibration.image
    assert run.config["a_init"] == "uniform" and run.anchors == ANCHORS
    assert set(gate["anchor_scores"]) == set(ANCHORS) and set(gate["concept_scores"]) == {CAT.target, "a photo of the kitty"}
    expected = (max(gate["anchor_scores"].values()) * min(gate["concept_scores"].values())) ** 0.5
    assert gate["threshold"] == pytest.approx(expected) and run.defaults.gate == "calibrated+image" and run.defaults.keep == "base"
    assert run.defaults.erase_with == "adapter"
    base = ["generate", "--model", str(tiny_sd), "--prompt", "a photo of the cat", "--prompt", "a dog", "--n", "1",
            "--steps", "3", "--erasure", str(selective_run)]
    assert main(base + ["--gate", "calibrated", "--out", str(tmp_path / "calibrated")]) == 0
    m = read_png_metadata(tmp_path / "calibrated" / "00000_000.png")
    assert m["gate"] == "calibrated" and m["threshold"] == gate["threshold"]
    assert m["w"] == (0.0 if m["score"] > gate["threshold"] else 1.0)  # the recipe's erase_with: the adapter alone
    # the default: the prompt gate marks suspects, the image gate judges every image (a suspect's more leniently),
    # a flagged one redrawn by the adapter
    assert main(base + ["--out", str(tmp_path / "default")]) == 0
    m = read_png_metadata(tmp_path / "default" / "00000_000.png")
    lenient = ImageGate.from_stored(image).suspect_threshold
    assert m["gate"] == "calibrated" and bool(m.get("suspects")) == (m["score"] > gate["threshold"])
    assert m["image_threshold"] == (lenient if m.get("suspects") else image["threshold"]) and not m["erasure"]["note"]
    assert m["w"] == (0.0 if m["image_flagged"] and not m.get("substitute_prompt") else 1.0)
    assert main(base + ["--gate", "1e9", "--out", str(tmp_path / "keep")]) == 0
    assert main(base + ["--gate", "1e-9", "--keep", "paper", "--erase-with", "paper", "--out", str(tmp_path / "erase")]) == 0
    for name in ("00000_000.png", "00001_000.png"):
        assert read_png_metadata(tmp_path / "keep" / name)["w"] == 1.0
        assert read_png_metadata(tmp_path / "erase" / name)["w"] == -1.0


def test_keep_base_is_the_base_image_and_costs_what_plain_generation_costs(tiny_sd, selective_run):
    bundle = load_model(str(tiny_sd))
    meta = read_run(selective_run)
    adapter = meta.attach(bundle)
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
    kept = [i for i, d in enumerate(infos) if d.w == 1.0]
    erased = [i for i, d in enumerate(infos) if d.w == -1.0]
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


def test_response_scorer_needs_no_unet_and_has_its_own_calibration(tiny_sd, selective_run, tmp_path):
    response = read_run(selective_run).calibration.prompt["response"]
    assert response["threshold"] > 0 and set(response["anchor_scores"]) == set(ANCHORS)
    bundle = load_model(str(tiny_sd))
    meta = read_run(selective_run)
    adapter = meta.attach(bundle)
    guide = guide_for_run(adapter, meta, gate="calibrated", scorer=ScorerConfig(kind="response"))
    assert guide.gate.threshold == response["threshold"]
    counter = EvalCounter(bundle.unet)
    infos = guide.decide(bundle, ["a photo of the cat", "a dog"], 7.5)
    counter.close()
    assert counter.count == 0  # scored without a single UNet evaluation
    assert infos[0].score == pytest.approx(response["concept_scores"]["a photo of the cat"], rel=1e-5)
    adapter.remove()
    full = tmp_path / "full"
    erase(load_model(str(tiny_sd)), CAT, full, EraseConfig(preset="full", iterations=2, ddim_steps=8), progress=False)
    assert "response" not in read_run(full).calibration.prompt


def _version1_run(gate: dict) -> ErasureRun:
    """A run as version 1 stored it: calibration and recipe defaults in one ``gate`` entry."""
    return ErasureRun.from_json({"status": "finished", "concept": CAT.to_dict(), "config": {}, "anchors": ANCHORS,
                                 "base_model": "tiny", "base_fingerprint": "f", "gate": gate})


def test_a_calibration_that_does_not_separate_falls_back_to_the_adapter_alone():
    stored = {"default": "calibrated", "keep": "base", "threshold": 1.0, "margin": 0.6, "separated": False}
    run = _version1_run(stored)
    assert run.defaults.gate == "calibrated" and run.calibration.prompt == {"threshold": 1.0, "margin": 0.6,
                                                                            "separated": False}
    guide = guide_for_run(object(), run)
    assert guide.mode == "fixed" and guide.fixed_w == 0.0 and "does not separate" in guide.note
    assert guide.decide(None, ["a photo of the cat"], 7.5) == [Decision(0.0)]
    trusted = guide_for_run(object(), _version1_run(dict(stored, separated=True, margin=2.0)))
    assert trusted.mode == "unguide" and trusted.note is None and trusted.rule.w_keep == 1.0
    for asked in ("empty", "calibrated", "0.5"):  # a gate the caller names is obeyed as given
        assert guide_for_run(object(), run, gate=asked).mode == "unguide"


def test_the_gate_position_moves_the_calibrated_threshold_between_anchors_and_concept(tiny_sd, selective_run, tmp_path,
                                                                                      capsys):
    gate = read_run(selective_run).calibration.prompt
    top, low = max(gate["anchor_scores"].values()), min(gate["concept_scores"].values())
    assert gate["position"] == 0.5 and gate["threshold"] == (top * low) ** 0.5  # the stored default, as before
    assert gate_threshold(top, low, 0.0) == pytest.approx(top) and gate_threshold(top, low, 1.0) == pytest.approx(low)
    assert gate_threshold(top, low, 0.3) == pytest.approx(top ** 0.7 * low ** 0.3)
    assert PromptGate.from_spec(GateSpec("calibrated"), gate, position=0.3).threshold == pytest.approx(top ** 0.7 * low ** 0.3)
    assert PromptGate.from_spec(GateSpec("calibrated"), gate).threshold == gate["threshold"]  # no position: the run's own threshold
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
                 EraseConfig.for_concept("selective", spec, iterations=2, ddim_steps=8, calibration_steps=2,
                                         calibration_samples=1), progress=False)
    g = meta.calibration.prompt
    assert g["position"] == 0.25 and g["threshold"] == pytest.approx(
        max(g["anchor_scores"].values()) ** 0.75 * min(g["concept_scores"].values()) ** 0.25)
    # bad positions: one line, exit 2, nothing written
    spec_file = tmp_path / "cat.json"
    spec_file.write_text(json.dumps({**CAT.to_dict(), "gate_position": 1.5}))
    cases = [(base + ["--gate-position", "2", "--out", str(tmp_path / "b1")], "--gate-position: must be at most 1",
              tmp_path / "b1"),
             (base[:-2] + ["--gate", "empty", "--gate-position", "0.3", "--out", str(tmp_path / "b2")],
              "--gate-position moves the calibrated prompt gate", tmp_path / "b2"),
             (["erase", "--model", str(tiny_sd), "--concept-file", str(spec_file), "--out", str(tmp_path / "b3")],
              "'gate_position' must be between 0", tmp_path / "b3"),
             (["erase", "--model", str(tiny_sd), "--concept", "sd-cat", "--gate-position", "-0.1",
               "--out", str(tmp_path / "b4")], "--gate-position: must be at least 0", tmp_path / "b4")]
    capsys.readouterr()
    for argv, fragment, out in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0] and not out.exists(), err
