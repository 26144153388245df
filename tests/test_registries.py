"""Adding a recipe, a judge, a suite or a method is one definition plus one registration line: toy-free dummies,
registered here and nowhere else, run through `unguide benchmark` on a tiny random SD pipeline."""
import json

import pytest
import torch

from unguide.cli import main
from unguide.erasure.concepts import concept_from_dict
from unguide.erasure.recipes import RECIPE_GATES, RECIPE_SETTINGS, register_recipe
from unguide.evaluation.judges import JUDGES, ClassJudge, register_judge
from unguide.evaluation.methods import METHODS, Method, register_method
from unguide.evaluation.suites import SUITES, Suite, case_from_spec, register_suite
from unguide.guidance.config import GateDefaults, GuidanceConfig


class BrightnessJudge(ClassJudge):
    """A judge with no model: an image is 'bright' with the probability of its mean intensity."""

    name = "brightness"

    def label_set(self, classes=()):
        return list(classes)

    def probabilities(self, images, classes=(), aliases=None):
        bright = images.mean(dim=(1, 2, 3)).clamp(0, 1)
        rest = (1 - bright) / max(len(classes) - 1, 1)
        return torch.stack([bright if c == "dog" else rest for c in classes], dim=1)


def shapes_suite(concepts, bundle=None, prompts=None):
    spec = concept_from_dict({"name": "dog", "label": "dog", "target": "a photo of the dog", "reference": "a photo",
                              "synonyms": ["puppy"], "other": ["a photo of the cat", "a photo of the ship"],
                              "anchors": ["a photo of the cat"]})
    case = case_from_spec("dog", spec)
    return Suite(name="shapes", cases={"dog": case}, judge="brightness", metrics="table1")


@pytest.fixture
def registered():
    register_recipe("half-lr", {"lr": 1.5e-5}, GateDefaults(gate="empty", keep="paper", erase_with="paper"))
    register_judge("brightness", lambda **_: BrightnessJudge())
    register_suite("shapes", shapes_suite)
    register_method(Method("half-lr-unguide", "half-lr", None, "half-lr", GuidanceConfig(mode="unguide")))
    yield
    for table, key in ((RECIPE_SETTINGS, "half-lr"), (RECIPE_GATES, "half-lr"), (JUDGES, "brightness"),
                       (SUITES, "shapes"), (METHODS, "half-lr-unguide")):
        table.pop(key)


def test_dummy_recipe_judge_suite_and_method_run_through_benchmark(registered, tiny_sd, tmp_path):
    out = tmp_path / "bench"
    assert main(["benchmark", "--model", str(tiny_sd), "--suite", "shapes", "--concepts", "dog",
                 "--methods", "base,half-lr-unguide", "--samples", "2", "--steps", "2", "--iterations", "2",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    dog = report["per_concept"]["dog"]
    assert set(dog) == {"base", "half-lr-unguide"}
    for method in dog.values():  # judged by the dummy judge: probabilities, not placeholders
        assert 0.0 <= method["acc_e"] <= 1.0 and method["n_images"] == 2 * 4  # target, synonym, two other classes
    run = json.loads((out / "runs" / "dog" / "half-lr" / "erasure.json").read_text())
    assert run["config"]["recipe"] == "half-lr" and run["config"]["lr"] == 1.5e-5
    assert run["defaults"]["gate"] == "empty" and run["version"] == 2
    assert "w_per_class" in dog["half-lr-unguide"]  # the method guided with UnGuidance: each prompt scored


def test_unknown_names_list_the_registered_ones(registered, tiny_sd, tmp_path, capsys):
    assert main(["benchmark", "--model", str(tiny_sd), "--suite", "shapes", "--methods", "base,nope",
                 "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "unknown method(s) ['nope']" in err and "half-lr-unguide" in err
