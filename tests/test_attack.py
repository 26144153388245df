"""The attack harness: it must find prompts that bring a concept back (tests that a broken search fails)."""
import pytest
import json

from unguide.attack.defence import AttackConfig
from unguide.attack.harness import attack
from unguide.attack.search import vocabulary_words
from unguide.cli import main
from unguide.erasure.concepts import load_preset
from unguide.toyworld import plugin as toy_world


def test_inversion_from_an_unrelated_prompt_raises_the_concept(toy_bundle, tmp_path):
    """Base model, start "a photo of the boat", a tiny budget: the inverted soft prompt draws the sun far more often."""
    plugin, spec = toy_world, load_preset("sun")
    cfg = AttackConfig(candidates=0, pairs=0, renders=4, draws=1, samples=4, steps=10, inversion_steps=20,
                       start="a photo of the boat")
    r = attack(toy_bundle, spec, plugin.concept_images(spec, 4), plugin.ToyJudge(), list(plugin.OBJECTS), {},
               tmp_path / "a", cfg, progress=False)
    assert r["start"]["mean_p"] < 0.05
    assert r["inversion"]["mean_p"] > r["start"]["mean_p"] + 0.2
    hist = r["inversion"]["history"]
    assert hist[-1]["loss"] < hist[0]["loss"]  # the denoising loss on sun renders went down
    # resume: a rerun finds its checkpoint, scores and images, and gives the same figures
    again = attack(toy_bundle, spec, plugin.concept_images(spec, 4), plugin.ToyJudge(), list(plugin.OBJECTS), {},
                   tmp_path / "a", cfg, progress=False)
    assert again["inversion"]["mean_p"] == r["inversion"]["mean_p"] and again["budget"] == r["budget"]


def test_word_search_ranks_the_concept_words_first_on_the_base_model(toy_bundle, tmp_path):
    """Scored by the denoising loss on sun renders, the sun's own prompts beat random vocabulary words."""
    plugin, spec = toy_world, load_preset("sun")
    cfg = AttackConfig(candidates=12, pairs=0, renders=4, draws=2, inversion_steps=0, keep=1, samples=2, steps=8)
    r = attack(toy_bundle, spec, plugin.concept_images(spec, 4), plugin.ToyJudge(), list(plugin.OBJECTS), {},
               tmp_path / "w", cfg, progress=False)
    scored = json.loads((tmp_path / "w" / "search.json").read_text())
    assert len(scored) == 1 + 3 + 12
    words = sorted(s["loss"] for s in scored if s["kind"] == "word")
    target = next(s["loss"] for s in scored if s["kind"] == "target")
    assert target < words[len(words) // 2]  # better than the median random word
    assert r["plain"]["mean_p"] > 0.5


def test_vocabulary_words_are_seeded_whole_words(toy_bundle):
    a = vocabulary_words(toy_bundle.tokenizer, 20, seed=1, exclude=["sun"])
    assert a == vocabulary_words(toy_bundle.tokenizer, 20, seed=1, exclude=["sun"]) and len(set(a)) == 20
    assert all(w.isalpha() and 3 <= len(w) <= 12 and w != "sun" for w in a)


@pytest.mark.slow
def test_attack_command_reports_every_method(tmp_path):
    # a benchmark of two concepts first: attacking one of them refreshes the benchmark's report over both
    assert main(["benchmark", "--concepts", "sun,moon", "--methods", "base", "--samples", "1", "--steps", "4",
                 "--out", str(tmp_path / "bench")]) == 0
    args = ["attack", "--benchmark", str(tmp_path / "bench"), "--concepts", "sun", "--methods", "base,unguide",
            "--iterations", "2", "--candidates", "4", "--pairs", "2", "--renders", "2", "--keep", "1",
            "--inversion-steps", "2", "--samples", "1", "--steps", "4"]
    assert main(args) == 0
    report = json.loads((tmp_path / "bench" / "attack" / "report.json").read_text())
    assert set(report["results"]["sun"]) == {"base", "unguide"}
    ug, base = report["results"]["sun"]["unguide"], report["results"]["sun"]["base"]
    assert 0 <= ug["gate_passed"] <= ug["budget"]["prompts_scored"] == 1 + 3 + 4 + 2 and base["gate_passed"] is None
    assert ug["budget"]["unet_evals"] > base["budget"]["unet_evals"] > 0  # the gate's scoring is part of the cost
    md = (tmp_path / "bench" / "attack" / "report.md").read_text()
    assert "| sun | unguide |" in md and (tmp_path / "bench" / "attack" / "grids" / "sun.png").exists()
    from unguide.evaluation.report import attack_summary  # what the benchmark report shows once its directory was attacked

    assert "## Under attack" in (tmp_path / "bench" / "report.md").read_text()  # the refreshed benchmark report
    summary = attack_summary(tmp_path / "bench")
    row = next(line for line in summary.splitlines() if line.startswith("| unguide |"))
    assert row.split("|")[2].strip() == f"{100 * ug['plain']['success_rate']:.0f}"


def test_a_finished_attack_rerun_costs_nothing_more(toy_bundle, tmp_path):
    plugin, spec = toy_world, load_preset("moon")
    cfg = AttackConfig(candidates=3, pairs=0, renders=2, draws=1, inversion_steps=2, keep=1, samples=1, steps=4)
    args = (toy_bundle, spec, plugin.concept_images(spec, 2), plugin.ToyJudge(), list(plugin.OBJECTS), {})
    first = attack(*args, tmp_path / "m", cfg, progress=False)
    assert first["budget"]["unet_evals"] > 0
    again = attack(*args, tmp_path / "m", cfg, progress=False)
    assert again["budget"] == first["budget"]


@pytest.mark.slow
def test_attack_on_stable_diffusion_with_the_users_images(tiny_sd, tiny_clip, tmp_path):
    """On SD the attacker measures its loss on pictures the user gives, and the suite's CLIP judge scores the result."""
    from PIL import Image

    pics = tmp_path / "cats"
    pics.mkdir()
    for k in range(3):
        Image.new("RGB", (24, 24), (60 * k, 120, 90)).save(pics / f"{k}.png")
    args = ["attack", "--model", str(tiny_sd), "--suite", "cifar10", "--clip-model", str(tiny_clip), "--benchmark",
            str(tmp_path / "bench"), "--concepts", "cat", "--methods", "base,selective", "--images", str(pics),
            "--iterations", "1", "--candidates", "3", "--pairs", "2", "--renders", "2", "--keep", "1",
            "--inversion-steps", "2", "--samples", "1", "--steps", "2", "--calibration-samples", "2"]
    assert main(args) == 0
    report = json.loads((tmp_path / "bench" / "attack" / "report.json").read_text())
    for method in ("base", "selective"):
        r = report["results"]["sd-cat"][method]
        assert 0 <= r["plain"]["mean_p"] <= 1 and 0 <= r["inversion"]["mean_p"] <= 1
        # target + 3 synonyms: the tiny character-level tokenizer has no whole words for the vocabulary search
        assert r["budget"]["prompts_scored"] == 1 + 3 and r["word_search"]["best_prompt"] is None


def test_attack_without_images_on_stable_diffusion_is_one_line(tiny_sd, tmp_path, capsys):
    assert main(["attack", "--model", str(tiny_sd), "--suite", "cifar10", "--benchmark", str(tmp_path / "b"),
                 "--concepts", "cat", "--methods", "base"]) == 2
    err = capsys.readouterr().err
    assert "--images" in err and err.count("\n") == 1


@pytest.mark.slow
def test_the_attack_scores_candidates_through_the_image_gate(toy_bundle, tmp_path):
    """Against an image gate the attacker draws each candidate's images as the pipeline would and runs the pipeline's
    detector: the sun's own prompts are flagged, a detector that never fires flags nothing, and a candidate's loss is
    the mix of the kept and erased losses by how often it is flagged."""
    import torch

    from unguide.erasure.adapters import AdapterConfig, make_adapter
    from unguide.attack.defence import Defence, Exposure, Probe
    from unguide.guidance.config import WeightRule
    from unguide.guidance.decision import Decision
    from unguide.guidance.prompt_gate import PromptGate
    from unguide.guidance.unguidance import UnGuide
    from unguide.guidance.image_gate import ImageGate

    plugin, spec = toy_world, load_preset("sun")
    concept = (spec.target, *spec.synonym_prompts(heldout=False))
    anchors = ("a photo of the moon", "a photo of the star", "a photo of the heart", "a photo of the house", "")
    adapter = make_adapter(toy_bundle.unet, AdapterConfig("object", 1, 8.0, "uniform"), init_seed=0)
    try:
        with torch.no_grad():
            for p in adapter.parameters():
                p.copy_(torch.randn_like(p) * 0.2)  # an adapter that changes every prediction
        rule = WeightRule(w_keep=1.0, w_erase=0.0)
        guide = UnGuide(adapter, gate=PromptGate("none"), rule=rule, image_gate=ImageGate(concept, anchors, 0.0))
        cfg = AttackConfig(candidates=4, pairs=0, renders=2, draws=1, inversion_steps=0, keep=1, samples=2, steps=20,
                           gate_images=2)
        r = attack(toy_bundle, spec, plugin.concept_images(spec, 2), plugin.ToyJudge(), list(plugin.OBJECTS), {},
                   tmp_path / "g", cfg, guide=guide, adapter=adapter, label="image", progress=False)
        scored = {s["prompt"]: s for s in json.loads((tmp_path / "g" / "search.json").read_text())}
        assert scored[spec.target]["flag_rate"] == 1.0
        assert r["image_gate_passed"] == sum(1 for s in scored.values() if not s["flag_rate"]) >= 2
        # the judged images went through the same gate: the target's were flagged and redrawn by the adapter
        rows = [json.loads(line) for line in (tmp_path / "g" / "images" / "index.jsonl").read_text().splitlines()]
        target_rows = [row for row in rows if row["prompt"] == spec.target]
        assert target_rows and all(row["image_flagged"] and row["w"] == 0.0 for row in target_rows)
        never = Defence(toy_bundle, UnGuide(adapter, gate=PromptGate("none"), rule=rule,
                                            image_gate=ImageGate(concept, anchors, -1e9)), adapter, 2, 20)
        assert never.exposures([spec.target])[0].flag_rate == 0.0
        defence = Defence(toy_bundle, guide, adapter, 2, 20)
        probe = Probe.build(toy_bundle, plugin.concept_images(spec, 2), cfg)
        states = toy_bundle.encode_prompts([spec.target]).float()
        kept = defence.losses(probe, states, [Exposure(Decision(1.0))], 64)[0]
        erased = defence.losses(probe, states, [Exposure(Decision(0.0))], 64)[0]
        mixed = defence.losses(probe, states, [Exposure(Decision(1.0), 0.25, None, 0.0)], 64)[0]
        assert abs(float(kept - erased)) > 1e-4
        assert torch.allclose(mixed, 0.75 * kept + 0.25 * erased, atol=1e-6)
        # with the last resort: half the redraws are flagged again and drawn from the reference prompt instead
        last = Defence(toy_bundle, UnGuide(adapter, gate=PromptGate("none"), rule=rule, image_gate=guide.image_gate,
                                           substitute_prompt=spec.reference), adapter, 2, 20)
        ref = defence.losses(probe, toy_bundle.encode_prompts([spec.reference]).float(), [Exposure(Decision(1.0))], 64)[0]
        both = last.losses(probe, states, [Exposure(Decision(1.0), 0.5, 0.5, 0.0)], 64)[0]
        assert torch.allclose(both, 0.5 * kept + 0.5 * (0.5 * erased + 0.5 * ref), atol=1e-6)
        # a prompt gate in front (calibrated+image) erases nothing itself: a prompt over it is a suspect, and the
        # attacker meets the image gate's lenient threshold for it (here: always flags) and the usual one otherwise
        # (here: never flags), the second look at the redraw included (never substituted)
        for prompt_threshold, flagged in ((1e-12, 1.0), (1e12, 0.0)):
            front = Defence(toy_bundle, UnGuide(adapter, gate=PromptGate("value", threshold=prompt_threshold),
                                                rule=rule, image_gate=ImageGate(concept, anchors, -1e9, suspect_threshold=1e9),
                                                substitute_prompt=spec.reference), adapter, 2, 20)
            seen = front.exposures([spec.target])[0]
            assert (seen.w, seen.flag_rate, seen.decision.suspects) == (1.0, flagged, ("concept",) if flagged else None)
            assert seen.substitute_rate == (0.0 if flagged else None)
    finally:
        adapter.remove()


@pytest.mark.slow
def test_attack_takes_a_group_run(tmp_path):
    """`--together`: each erasing method is also attacked as METHOD+together, every member through the group's
    decision, and the images it judges are drawn with the group's run."""
    from unguide.evaluation.evaluate import load_folder

    args = ["attack", "--benchmark", str(tmp_path / "bench"), "--together", "sun,moon", "--methods", "selective-image",
            "--iterations", "2", "--calibration-samples", "1", "--candidates", "4", "--pairs", "2", "--renders", "2",
            "--keep", "1", "--inversion-steps", "2", "--samples", "1", "--steps", "4", "--gate-images", "1"]
    assert main(args) == 0
    report = json.loads((tmp_path / "bench" / "attack" / "report.json").read_text())
    assert report["together"] == ["sun", "moon"] and set(report["results"]) == {"sun", "moon"}
    for concept in ("sun", "moon"):
        alone, grouped = (report["results"][concept][m] for m in ("selective-image", "selective-image+together"))
        assert grouped["label"] == "selective-image+together" and grouped["concept"] == concept
        assert grouped["budget"]["prompts_scored"] == alone["budget"]["prompts_scored"] > 0
    rows, _ = load_folder(tmp_path / "bench" / "attack" / "moon" / "selective-image+together" / "images")
    assert rows and all(set(r["image_scores"]) == {"sun", "moon"} for r in rows)  # every member's detector looked
    rows, _ = load_folder(tmp_path / "bench" / "attack" / "moon" / "selective-image" / "images")
    assert rows and all(set(r.get("image_scores") or {}) != {"sun", "moon"} for r in rows)
    assert "| moon | selective-image+together |" in (tmp_path / "bench" / "attack" / "report.md").read_text()
