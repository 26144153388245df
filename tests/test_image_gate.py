"""The image gate: a diffusion-classifier detector on the finished latent, its calibration, and the redraw."""
import json
from dataclasses import replace

import pytest
import torch

from unguide.errors import UnguideError
from unguide.sampling.images import Item, sample_latents_batched
from unguide.guidance.image_gate import (SUSPECT_POSITION, DetectorConfig, ImageGate, candidate_prompts, detector_scores,
                                         image_threshold)

SUN = ["a photo of the sun", "a photo of the sunshine"]
ANCHORS = ["a photo of the moon", "a photo of the star", "a photo of the heart", "a photo of the house", ""]


def _latents(bundle, prompts, seeds):
    items = [Item(p, s, bundle.default_guidance, bundle.image_size, bundle.image_size) for p in prompts for s in seeds]
    return sample_latents_batched(bundle, items), [it.seed for it in items]


@pytest.mark.slow
def test_the_detector_fires_on_concept_images_and_not_on_anchor_images(toy_bundle):
    """Base-model images of the sun score below every image of its anchors, by a margin; the same detector with the
    concept and anchor candidates swapped, or without re-noising (t near 0 tells nothing), does not separate them."""
    seeds = [0, 1, 2]
    concept_lat, concept_seeds = _latents(toy_bundle, SUN, seeds)
    anchor_lat, anchor_seeds = _latents(toy_bundle, ["a photo of the moon", "a photo of the heart"], seeds)
    cfg = DetectorConfig()
    on_concept = detector_scores(toy_bundle, None, concept_lat, concept_seeds, SUN, ANCHORS, cfg)
    on_anchors = detector_scores(toy_bundle, None, anchor_lat, anchor_seeds, SUN, ANCHORS, cfg)
    assert on_concept.max() < -0.05, on_concept
    assert on_anchors.min() > 0.2, on_anchors
    assert on_anchors.min() - on_concept.max() > 0.3
    # deterministic per image: the same latent and seed score the same whatever its batch-mates
    alone = detector_scores(toy_bundle, None, concept_lat[:1], concept_seeds[:1], SUN, ANCHORS, cfg)
    assert torch.allclose(alone, on_concept[:1], atol=1e-5)
    # a detector that mixes up the candidates flags the anchors instead
    swapped = detector_scores(toy_bundle, None, anchor_lat, anchor_seeds, ANCHORS, SUN, cfg)
    assert swapped.max() < 0


def test_candidates_keep_the_empty_prompt_and_the_threshold_sits_between_the_groups():
    concept, anchors = candidate_prompts(SUN, ["a photo of the moon", "a photo of the sky", "a photo of the sand"],
                                         DetectorConfig(anchors=2))
    assert concept == SUN and anchors == ["a photo of the moon", ""]
    assert image_threshold([-0.5, -0.3, -0.2], [0.4, 0.6, 0.8], 0.5) == pytest.approx((-0.22 + 0.44) / 2, abs=0.01)
    assert image_threshold([-0.5, -0.3, -0.2], [0.4, 0.6, 0.8], 0.0) < image_threshold([-0.5], [0.4], 1.0)
    # a ceiling caps the placed threshold and leaves one under it alone
    assert image_threshold([-0.5, -0.3, -0.2], [0.4, 0.6, 0.8], 0.5, ceiling=-0.07) == -0.07
    assert image_threshold([-0.9, -0.8], [-0.4, -0.3], 0.5, ceiling=-0.07) == pytest.approx(-0.6, abs=0.01)
    with pytest.raises(UnguideError):
        DetectorConfig(timesteps=(0, 1200))
    with pytest.raises(UnguideError, match="no calibrated image gate"):
        ImageGate.from_stored({})
    stored = {"threshold": 0.1, "detector": {"timesteps": [400, 600], "draws": 1, "anchors": 9, "seed": 0,
                                             "batch_size": 64},
              "concept_candidates": ["c"], "anchor_candidates": [""], "scores": {"c": [-0.5, -0.3], "": [0.4, 0.6]}}
    assert ImageGate.from_stored(stored).threshold == 0.1  # the run's own
    assert ImageGate.from_stored(stored, 0.5).threshold == pytest.approx(image_threshold([-0.5, -0.3], [0.4, 0.6], 0.5))
    with pytest.raises(UnguideError, match="outside"):
        ImageGate.from_stored(stored, 1.5)
    # a run calibrated under a ceiling keeps it when the position is changed at generation
    assert ImageGate.from_stored({**stored, "ceiling": -0.07}, 0.5).threshold == -0.07
    # a suspect's threshold: past the anchors' calibration images (SUSPECT_POSITION), never stricter than the usual
    lenient = ImageGate.from_stored(stored).suspect_threshold
    assert lenient == pytest.approx(image_threshold([-0.5, -0.3], [0.4, 0.6], SUSPECT_POSITION)) and lenient > 0.6
    assert ImageGate.from_stored(stored).threshold_for(True) == lenient
    assert ImageGate.from_stored(stored).threshold_for(False) == 0.1


def test_a_prompt_gate_in_front_of_the_image_gate_suspects_and_never_erases():
    """calibrated+image: a prompt over the prompt gate keeps w_keep and is marked a suspect of its concept (a group
    marks every member whose gate it is over); without an image gate the same prompt is erased."""
    from unguide.guidance.decision import Decision
    from unguide.guidance.group import GroupGuide
    from unguide.guidance.prompt_gate import PromptGate
    from unguide.guidance.unguidance import UnGuide

    def guide(image: bool, name: str = "cat", scores=(2.0, 0.5)):
        g = UnGuide(None, gate=PromptGate("value", threshold=1.0), concept=name,
                    image_gate=ImageGate((name,), ("",), 0.0, suspect_threshold=1.0) if image else None)
        g.scores = lambda bundle, prompts, guidance: list(scores)
        return g

    over, under = guide(True).decide(None, ["a cat", "a dog"], 5.0)
    assert (over.w, over.suspects, over.score) == (2.0, ("cat",), 2.0) and (under.w, under.suspects) == (2.0, None)
    assert [d.w for d in guide(False).decide(None, ["a cat", "a dog"], 5.0)] == [-1.0, 2.0]

    class Adapter:
        def only(self, names):
            from contextlib import nullcontext
            return nullcontext()

    group = GroupGuide(Adapter(), {"cat": guide(True, "cat", (2.0, 0.5)), "dog": guide(True, "dog", (0.5, 0.5))})
    first, second = group.decide(None, ["a cat", "a dog"], 5.0)
    assert (first.w, first.suspects, first.concepts) == (2.0, ("cat",), ()) and second.suspects is None
    assert isinstance(first, Decision)


def test_v_prediction_output_is_converted_to_noise():
    from unguide.models.prediction import Prediction

    alphas = torch.linspace(0.99, 0.01, 1000)
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([300, 700])
    a = alphas[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0  # what a perfect v-model predicts
    assert torch.allclose(Prediction("v_prediction", alphas).noise(v, x_t, t), eps, atol=1e-5)
    assert torch.equal(Prediction("epsilon", alphas).noise(eps, x_t, t), eps)


@pytest.mark.slow
def test_the_image_gate_runs_on_stable_diffusion_and_a_rerun_adds_its_calibration(tiny_sd, tmp_path):
    """Tiny SD: erase stores the image gate's calibration; `generate --gate image` checks every image and records its
    score, threshold and decision; a run finished before the image gate existed gains its calibration on a rerun of
    the same `unguide erase`, without retraining."""
    from unguide import load_model
    from unguide.cli import main
    from unguide.erasure.concepts import ConceptSpec
    from unguide.erasure.training import EraseConfig, erase
    from unguide.generation.folders import read_png_metadata

    spec = ConceptSpec(target="a photo of the cat", reference="a photo of the forest", name="cat", synonyms=["kitty"],
                       other=["a dog"], anchors=["", "a photo of the house", "a photo of the tree"])
    cfg = EraseConfig.from_recipe("selective", iterations=2, ddim_steps=8)
    bundle = load_model(str(tiny_sd))
    run = tmp_path / "cat"
    meta = erase(bundle, spec, run, cfg, progress=False)
    image = meta.calibration.image
    assert image["concept_candidates"] == ["a photo of the cat", "a photo of the kitty"]
    assert image["anchor_candidates"] == ["", "a photo of the house", "a photo of the tree"]
    assert len(image["scores"]["a photo of the cat"]) == image["samples"] == cfg.calibration_samples == 6  # selective's
    out = tmp_path / "gen"
    args = ["generate", "--model", str(tiny_sd), "--erasure", str(run), "--prompt", "a photo of the cat",
            "--prompt", "a dog", "--n", "2", "--steps", "4", "--gate", "image", "--out", str(out)]
    assert main(args) == 0
    for f in sorted(out.glob("0*.png")):
        m = read_png_metadata(f)
        assert m["gate"] == "none" and m["image_threshold"] == image["threshold"]
        assert m["image_flagged"] == (m["image_score"] < image["threshold"])
        if m["image_flagged"]:  # redrawn by the adapter, looked at again; still the concept: the reference prompt
            substituted = m["image_score_redrawn"] < image["threshold"]
            assert m.get("substitute_prompt") == ("a photo of the forest" if substituted else None)
            assert m["w"] == (1.0 if substituted else 0.0)
        else:
            assert m["w"] == 1.0 and "image_score_redrawn" not in m
    # forget the calibration, as a run from before the image gate: the same erase command adds it, nothing retrained
    stored = json.loads((run / "erasure.json").read_text())
    stored["calibration"]["image"] = None
    (run / "erasure.json").write_text(json.dumps(stored))
    weights = (run / "pytorch_lora_weights.safetensors").stat().st_mtime_ns
    again = erase(bundle, spec, run, cfg, progress=False)
    assert again.calibration.image["threshold"] == pytest.approx(image["threshold"])
    assert (run / "pytorch_lora_weights.safetensors").stat().st_mtime_ns == weights
    # asked for a ceiling on the threshold: recalibrated under it (stored with it), nothing retrained
    capped = erase(bundle, spec, run, replace(cfg, calibration_ceiling=-5.0), progress=False).calibration.image
    assert capped["ceiling"] == -5.0 and capped["threshold"] == -5.0
    assert (run / "pytorch_lora_weights.safetensors").stat().st_mtime_ns == weights


def test_a_suspect_prompts_image_meets_the_lenient_threshold(monkeypatch):
    """calibrated+image: the prompt gate erases nothing on its own; a prompt over it is a suspect, whose image is
    flagged under the lenient threshold (another prompt's image with the same score is kept) and redrawn; the redraw
    meets the second look under the usual threshold."""
    from types import SimpleNamespace

    import torch

    from unguide.guidance import review as review_module
    from unguide.guidance.decision import Decision
    from unguide.guidance.image_gate import ImageGate

    class Reviewer:
        adapter, keep_w = None, 1.0
        image_gates = {"cat": ImageGate(("cat",), ("",), threshold=0.0, suspect_threshold=1.0)}

        def flagged(self, decision, hits, scores):
            looked = decision.but(image_score=scores["cat"], image_flagged=bool(hits))
            return looked.but(w=0.0) if hits else looked

        def substitute_for(self, concept):
            return "a photo of the forest"

    # rows 0, 1 kept; rows 2, 3 suspects. Scores 0.5 (between the thresholds) for rows 0 and 2 and row 2's redraw (the
    # usual threshold passes it); row 3's redraw -0.5 (under the usual threshold -> the reference prompt); row 1 over both
    first = {0: 0.5, 1: 2.0, 2: 0.5, 3: 0.5}
    second = {2: 0.5, 3: -0.5}
    calls, tables = [], [first, second]

    def look(reviewer, bundle, latents, seeds):
        table = tables.pop(0)
        calls.append(list(seeds))
        return [{"cat": table[s]} for s in seeds]

    monkeypatch.setattr(review_module, "look", look)
    items = [SimpleNamespace(seed=r) for r in range(4)]
    suspect = Decision(1.0, gate="calibrated", suspects=("cat",))
    decisions = [Decision(1.0), Decision(1.0), suspect, suspect]
    redrawn = []

    def redraw(rows, ds):
        redrawn.append((list(rows), [d.substitute_prompt for d in ds]))
        return torch.full((len(rows), 1), 7.0)

    latents, out = review_module.review(Reviewer(), None, items, torch.zeros(4, 1), decisions, redraw)
    assert calls == [[0, 1, 2, 3], [2, 3]]  # every row looked at; the suspects' redraws looked at again
    assert redrawn == [([2, 3], [None, None]), ([3], ["a photo of the forest"])]
    assert out[0].w == 1.0 and out[0].image_flagged is False  # same score as row 2, not a suspect: kept
    assert out[1].w == 1.0 and out[1].image_flagged is False
    assert out[2].w == 0.0 and out[2].image_flagged and out[2].substitute_prompt is None
    assert out[3].w == 1.0 and out[3].substitute_prompt == "a photo of the forest"
    assert latents[:, 0].tolist() == [0.0, 0.0, 7.0, 7.0]
    assert suspect.record()["suspects"] == ["cat"] and Decision.from_record(suspect.record()) == suspect
