"""Several concepts erased at once: a group run of single runs, one decision per concept at generation, each
prompt drawn with the adapters of the concepts it was flagged for (the base model's drawing when none), and
`benchmark --together` scoring each concept with the group's own classes left out of preservation."""
import json

import pytest

from unguide import GuidanceConfig, UnGuidePipeline
from unguide.cli import main
from unguide.guidance.decision import Decision
from unguide.erasure.runs import load_run
from unguide.sampling.images import Item, sample_latents


@pytest.fixture(scope="module")
def group_run(tiny_sd, tmp_path_factory):
    run = tmp_path_factory.mktemp("group") / "run"
    assert main(["erase", "--model", str(tiny_sd), "--concept", "sd-cat,sd-dog", "--iterations", "3",
                 "--calibration-steps", "2", "--calibration-samples", "2", "--out", str(run)]) == 0
    return tiny_sd, run


def _items(prompts):
    return [Item(p, seed, 7.5, 16, 16, prompt_index=i) for i, (p, seed) in enumerate(prompts)]


def test_a_group_run_holds_one_ordinary_run_per_concept(group_run):
    _, run = group_run
    group = json.loads((run / "group.json").read_text())
    assert group["concepts"] == ["sd-cat", "sd-dog"] and group["status"] == "finished"
    loaded = load_run(run)
    assert loaded.is_group and list(loaded.members) == group["concepts"] and loaded.name == "sd-cat+sd-dog"
    for name, member in loaded.members.items():
        assert member.path == run / name and not member.is_group
        assert member.name == name and member.calibration.image["threshold"] is not None


def test_each_prompt_is_drawn_with_the_adapters_of_the_concepts_it_was_flagged_for(group_run):
    sd, run = group_run
    pipe = UnGuidePipeline.from_pretrained(str(sd))
    bundle = pipe.bundle
    items = _items([("a photo of a cat", 0), ("a photo of a truck", 1), ("a photo of a dog", 2)])
    base = sample_latents(bundle, items, 3, pipe.guide(), [{}] * 3)
    single = {}
    for name in ("sd-cat", "sd-dog"):
        pipe.load_erasure(run / name)
        single[name] = sample_latents(bundle, items, 3, pipe.guide(), [Decision(0.0)] * 3)
    pipe.load_erasure(run)
    guide = pipe.guide()
    routed = sample_latents(bundle, items, 3, guide, [Decision(0.0, concepts=["sd-cat"]), Decision(1.0, concepts=[]),
                                                      Decision(0.0, concepts=["sd-dog"])])
    # equal up to batching (a row drawn in a smaller batch sums in another order)
    gap = float((single["sd-cat"][0] - single["sd-dog"][0]).abs().max())  # what the routing decides between
    assert float((routed[0] - single["sd-cat"][0]).abs().max()) < gap / 100  # the cat adapter alone, the dog's off
    assert float((routed[2] - single["sd-dog"][2]).abs().max()) < gap / 100
    assert float((routed[1] - base[1]).abs().max()) < gap / 100  # under every gate: the base model's drawing
    both = sample_latents(bundle, items[:1], 3, guide, [Decision(0.0, concepts=["sd-cat", "sd-dog"])])
    assert float((both[0] - routed[0]).abs().max()) > gap / 10  # flagged for two: both adapters draw it


def test_generation_records_every_concepts_decision(group_run, tmp_path):
    sd, run = group_run
    for gate in ("calibrated", "image"):
        out = tmp_path / gate
        assert main(["generate", "--model", str(sd), "--erasure", str(run), "--gate", gate, "--prompt",
                     "a photo of a cat", "--prompt", "a photo of a truck", "--n", "2", "--steps", "3",
                     "--out", str(out)]) == 0
        rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
        for r in rows:
            assert isinstance(r["concepts"], list) and set(r["concepts"]) <= {"sd-cat", "sd-dog"}
            assert (r["w"] == 1.0) == (not r["concepts"])
            if gate == "calibrated":
                assert set(r["members"]) == {"sd-cat", "sd-dog"}  # one decision per concept, each with its threshold
            else:
                assert set(r["image_scores"]) == {"sd-cat", "sd-dog"} and "image_flagged" in r
        assert rows[0]["erasure"]["concept"] == "sd-cat+sd-dog"


def test_a_group_is_refused_cleanly(tiny_sd, tmp_path, capsys):
    assert main(["erase", "--model", str(tiny_sd), "--concept", "sd-cat,sd-cat", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "named twice" in err[0]
    assert main(["benchmark", "--model", str(tiny_sd), "--suite", "cifar10", "--together", "cat", "--out",
                 str(tmp_path / "b")]) == 2
    assert "two or more" in capsys.readouterr().err


@pytest.mark.slow
def test_benchmark_together_scores_each_concept_without_the_groups_classes(tiny_sd, tiny_clip, tmp_path):
    out = tmp_path / "bench"
    assert main(["benchmark", "--model", str(tiny_sd), "--suite", "cifar10", "--together", "cat,dog", "--methods",
                 "base,selective-image", "--samples", "1", "--steps", "2", "--iterations", "2", "--clip-model",
                 str(tiny_clip), "--calibration-samples", "2", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["together"]["concepts"] == ["sd-cat", "sd-dog"]
    assert "truck" in report["together"]["remaining_classes"] and "dog" not in report["together"]["remaining_classes"]
    for concept in ("sd-cat", "sd-dog"):
        methods = report["per_concept"][concept]
        assert set(methods) == {"base", "selective-image", "selective-image+together"}
        # target + 3 synonyms + the 8 classes that are not in the group
        assert all(m["n_images"] == 12 for m in methods.values())
    index = [json.loads(line) for line in (out / "images" / "together-sd-cat+sd-dog" / "selective-image" /
                                           "index.jsonl").read_text().splitlines()]
    assert len({r["prompt"] for r in index}) == 4 + 4 + 8  # the union of both concepts' prompts, drawn once
    assert (out / "grids" / "sd-cat.png").exists()


def test_the_cost_of_a_group_is_measured_per_prompt_group(group_run, tmp_path, capsys):
    sd, run = group_run
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a cat\na photo of a dog\na photo of a truck\na photo of a ship\n")
    out = tmp_path / "cost.json"
    assert main(["benchmark-scorer", "--model", str(sd), "--erasure", str(run), "--prompts", str(prompts), "--steps",
                 "3", "--gates-only", "--out", str(out)]) == 0
    cost = json.loads(out.read_text())["image_gate"]["image"]
    held = cost["held-out prompts"]
    assert held["prompts"] == 2 and cost["gate"] == "none+image x 2 concepts"
    assert held["evals_per_image_base"] == 2 * 3  # plain CFG: 2 evals a step
    # both concepts' detectors in one pass: 2 timesteps x (4 + 4 concept prompts + 9 shared anchors) per image
    assert held["evals_per_image_gated"] >= held["evals_per_image_base"] + 2 * (8 + 9)


def test_the_python_pipeline_returns_each_concepts_decision(group_run):
    sd, run = group_run
    pipe = UnGuidePipeline.from_pretrained(str(sd))
    loaded = pipe.load_erasure(run)
    assert loaded.is_group and list(loaded.members) == ["sd-cat", "sd-dog"]
    out = pipe(["a photo of a cat", "a photo of a truck"], num_inference_steps=3, progress=False,
               unguidance=GuidanceConfig(gate="calibrated"))
    assert len(out.images) == 2
    for scores in out.scores:
        assert set(scores["members"]) == {"sd-cat", "sd-dog"} and isinstance(scores["concepts"], list)
    pipe.unload_erasure()
    assert not any("lora" in n for n, _ in pipe.unet.named_parameters())  # every member's layers taken out


def test_the_groups_decision_for_prompts_is_the_one_it_draws_with(group_run):
    """`GroupGuide.decide` (what the attack asks of a defence) gives the decisions `prepare` makes for drawing."""
    sd, run = group_run
    pipe = UnGuidePipeline.from_pretrained(str(sd))
    pipe.load_erasure(run)
    guide = pipe.guide(GuidanceConfig(gate="calibrated"))
    prompts = ["a photo of a cat", "a photo of a truck", "a photo of a dog"]
    decided = guide.decide(pipe.bundle, prompts, 7.5)
    prepared = guide.prepare(pipe.bundle, _items([(p, i) for i, p in enumerate(prompts)]))
    assert [(d.w, d.concepts, d.members) for d in decided] == [(d.w, d.concepts, d.members) for d in prepared]
    assert all(set(d.members) == {"sd-cat", "sd-dog"} for d in decided)
