"""UnGuidance: w=1 is the base, w=0 the adapter alone, the scorers, the weight rule, the pipeline and influence."""
import numpy as np
import pytest
from PIL import Image

from unguide import load_model
from unguide.cli import main
from unguide.erasure.concepts import ConceptSpec
from unguide.erasure.runs import read_run
from unguide.erasure.training import EraseConfig, erase
from unguide.sampling.images import Item, PlainGuide, sample_images
from unguide.guidance.config import ScorerConfig, WeightRule
from unguide.guidance.unguidance import UnGuide

CAT = ConceptSpec(target="a photo of the cat", reference="a photo of the forest", name="cat", synonyms=["kitty"],
                  other=["a dog", "a photo of the car"])


@pytest.fixture(scope="module")
def sd_run(tiny_sd, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "cat"
    erase(load_model(str(tiny_sd)), CAT, run, EraseConfig(iterations=4, ddim_steps=8, lr=1e-2), progress=False)
    return run


def _pixels(path):
    return np.asarray(Image.open(path))


def _gen(tiny_sd, out, *extra):
    return main(["generate", "--model", str(tiny_sd), "--prompt", "a photo of the cat", "--prompt", "a dog", "--n", "2",
                 "--steps", "4", "--out", str(out), *extra])


def test_w1_is_base_and_w0_is_adapter_alone(tiny_sd, sd_run, tmp_path):
    assert _gen(tiny_sd, tmp_path / "base") == 0
    assert _gen(tiny_sd, tmp_path / "w1", "--erasure", str(sd_run), "--w", "1") == 0
    assert _gen(tiny_sd, tmp_path / "w0", "--erasure", str(sd_run), "--w", "0") == 0
    bundle = load_model(str(tiny_sd))
    read_run(sd_run).attach(bundle)
    items = [Item("a photo of the cat", 0, 7.5, 16, 16)]
    lora_alone, _ = sample_images(bundle, items, steps=4, guide=PlainGuide(), progress=False)
    lora_alone = (lora_alone[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    for name in ("00000_000.png", "00000_001.png", "00001_000.png"):
        assert np.array_equal(_pixels(tmp_path / "base" / name), _pixels(tmp_path / "w1" / name))
    assert np.array_equal(_pixels(tmp_path / "w0" / "00000_000.png"), lora_alone)
    assert not np.array_equal(_pixels(tmp_path / "w0" / "00000_000.png"), _pixels(tmp_path / "base" / "00000_000.png"))


def test_unguide_mode_records_scores_and_is_deterministic(tiny_sd, sd_run, tmp_path):
    from unguide.generation.folders import read_png_metadata

    assert _gen(tiny_sd, tmp_path / "a", "--erasure", str(sd_run)) == 0
    assert _gen(tiny_sd, tmp_path / "b", "--erasure", str(sd_run)) == 0
    meta = read_png_metadata(tmp_path / "a" / "00000_000.png")
    assert meta["w"] in (-1.0, 2.0) and meta["score"] > 0 and meta["score_empty"] > 0 and meta["erasure"]["run"]
    for name in ("00000_000.png", "00001_001.png"):
        assert np.array_equal(_pixels(tmp_path / "a" / name), _pixels(tmp_path / "b" / name))


def test_reference_and_fast_scorers_share_one_path(tiny_sd, sd_run):
    bundle = load_model(str(tiny_sd))
    adapter = read_run(sd_run).attach(bundle)
    ref = UnGuide(adapter, scorer=ScorerConfig.reference(draws=2))
    fast = UnGuide(adapter)
    prompts = ["a photo of the cat", "a photo of the dog"]
    r, f = ref.decide(bundle, prompts, 7.5), fast.decide(bundle, prompts, 7.5)
    assert all(d.score > 0 for d in r + f)
    assert ScorerConfig.reference().evals_per_prompt() == 30 * 24
    assert ScorerConfig().evals_per_prompt() <= 40


def test_continuous_rule_matches_binary_far_from_the_boundary():
    binary, smooth = WeightRule(), WeightRule(rule="continuous")
    assert binary.weight(2.0, 1.0) == -1 and binary.weight(0.5, 1.0) == 2
    assert smooth.weight(2.0, 1.0) == pytest.approx(-1, abs=1e-2) and smooth.weight(0.5, 1.0) == pytest.approx(2, abs=1e-2)
    assert smooth.weight(1.0, 1.0) == pytest.approx(0.5)


def test_pipeline_api(tiny_sd, sd_run):
    from unguide import GuidanceConfig, UnGuidePipeline

    pipe = UnGuidePipeline.from_pretrained(str(tiny_sd))
    plain = pipe(["a photo of the cat"], num_images_per_prompt=2, num_inference_steps=3, progress=False)
    pipe.load_erasure(sd_run)
    out = pipe(["a photo of the cat", "a dog"], num_images_per_prompt=2, num_inference_steps=3, progress=False)
    assert len(out.images) == 4 and out.images[0].size == (16, 16) and out.seeds == [0, 1, 0, 1]
    assert all(w in (-1.0, 2.0) for w in out.w) and out.w[0] == out.w[1] and "score" in out.scores[0]
    same = pipe(["a photo of the cat"], num_images_per_prompt=2, num_inference_steps=3,
                unguidance=GuidanceConfig(w=1.0), progress=False)
    assert np.array_equal(np.asarray(same.images[1]), np.asarray(plain.images[1]))


def test_influence_command_reports_what_generation_decides(tiny_sd, sd_run, tmp_path, capsys):
    import json

    from unguide.generation.folders import read_png_metadata

    out = tmp_path / "influence.json"
    assert main(["influence", "--model", str(tiny_sd), "--erasure", str(sd_run), "--prompt", "a photo of the cat",
                 "--prompt", "a dog", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["prompts"]
    assert [r["prompt"] for r in rows] == ["a photo of the cat", "a dog"]
    assert "a photo of the cat" in capsys.readouterr().out
    assert _gen(tiny_sd, tmp_path / "gen", "--erasure", str(sd_run)) == 0  # same scorer, same seeds: same numbers
    for r, name in zip(rows, ("00000_000.png", "00001_000.png")):
        meta = read_png_metadata(tmp_path / "gen" / name)
        assert meta["w"] == r["w"] and meta["score"] == pytest.approx(r["score"], rel=1e-5)


def test_influence_without_prompts_checks_the_runs_own_concept(tiny_sd, sd_run, tmp_path, capsys):
    import json

    out = tmp_path / "selectivity.json"
    assert main(["influence", "--model", str(tiny_sd), "--erasure", str(sd_run), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [(r["role"], r["prompt"]) for r in report["prompts"]] == [
        ("target", "a photo of the cat"), ("synonym", "a photo of the kitty"), ("other", "a dog"),
        ("other", "a photo of the car")]
    handed = sum(r["w"] < 1 for r in report["prompts"] if r["role"] == "other")
    assert report["summary"].startswith("to the adapter (w < 1): target ")
    assert f"other prompts {handed} of 2" in report["summary"]
    assert report["summary"] in capsys.readouterr().out
