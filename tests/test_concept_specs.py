"""Concept spec files and presets: synonyms, anchors, anchor weight, vocabulary and held-out evaluation words."""
import json
import re

from unguide.evaluation.suites import concept_rows as benchmark_rows
from unguide.cli import main
from unguide.erasure.concepts import PRESET_DIR, load_concept_file, load_preset, preset_names, read_anchor_file
from unguide.erasure.runs import read_run
from unguide.erasure.recipes import ANCHOR_WEIGHT_MMDIT
from unguide.erasure.training import EraseConfig
from unguide.toyworld.captions import HELDOUT_SYNONYMS, TRAIN_SYNONYMS
from unguide.toyworld.render import OBJECTS


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
    # a transformer's selective runs hold their anchors harder (recipes.ANCHOR_WEIGHT_MMDIT); a spec or flag still wins
    assert EraseConfig.for_concept("selective", sun, "mmdit").anchor_weight == ANCHOR_WEIGHT_MMDIT > 1.0
    assert EraseConfig.for_concept("selective", red, "mmdit").anchor_weight == 2.0
    assert EraseConfig.for_concept("selective", sun, "flux", anchor_weight=3.0).anchor_weight == 3.0
    assert EraseConfig.for_concept("reference", sun, "mmdit").anchor_weight == 0.0
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"target": "a cat", "reference": "a sky", "anchor_weight": "high"}))
    assert main(["erase", "--concept-file", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'anchor_weight' must be a number" in err[0] and not (tmp_path / "run").exists()


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


def test_a_concept_without_anchors_gets_its_familys_anchors(tiny_sd, tmp_path, capsys):
    """Stable Diffusion: the shipped everyday list, minus the concept's own words, said in one line at the start."""
    from unguide.cli import main
    from unguide.erasure.concepts import EVERYDAY_ANCHORS, read_anchor_file

    spec = tmp_path / "lamp.json"
    spec.write_text(json.dumps({"target": "a photo of the lamp", "reference": "a photo of the room",
                                "synonyms": ["lamps on a desk"]}))
    assert main(["erase", "--model", str(tiny_sd), "--concept-file", str(spec), "--iterations", "2",
                 "--calibration-steps", "2", "--calibration-samples", "1", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "lists no anchors: using the shipped everyday (Stable Diffusion) anchor list" in out
    meta = read_run(tmp_path / "run")
    everyday = read_anchor_file(EVERYDAY_ANCHORS)
    assert "a photo of the lamp" in everyday and "a photo of the lamp" not in meta.anchors
    assert meta.anchors == [a for a in everyday if "lamp" not in a] and "" in meta.anchors
    assert meta.concept["anchors"] == meta.anchors and meta.calibration.image["anchor_candidates"]
    # a rerun finds the same concept (its defaults filled the same way) and resumes instead of refusing
    assert main(["erase", "--model", str(tiny_sd), "--concept-file", str(spec), "--iterations", "2",
                 "--calibration-steps", "2", "--calibration-samples", "1", "--out", str(tmp_path / "run")]) == 0


def test_the_toy_world_offers_its_class_prompts_as_default_anchors():
    from unguide.erasure.concepts import ConceptSpec, default_anchors
    from unguide.toyworld import plugin

    kite = ConceptSpec(target="a photo of the star kite", reference="a photo of the sky", name="kite")
    anchors, dropped = default_anchors(kite, plugin.default_anchors())
    assert dropped == 1 and "a photo of the star" not in anchors and "a photo of the moon" in anchors and "" in anchors
