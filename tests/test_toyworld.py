import re

import numpy as np

from unguide.toyworld.captions import HELDOUT_SYNONYMS, all_training_captions, caption
from unguide.toyworld.classifier import ToyClassifier, evaluate_classifier
from unguide.toyworld.render import OBJECTS, render, render_batch, sample_scene


def test_renderer_is_deterministic_per_seed():
    a, sa = render_batch(7, 16)
    b, sb = render_batch(7, 16)
    c, _ = render_batch(8, 16)
    assert a.shape == (16, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and sa == sb
    assert not np.array_equal(a, c)


def test_every_class_renders_distinctly():
    rng = np.random.default_rng(0)
    means = [np.mean([render(sample_scene(rng, obj=o, colour="red", scene="sky")) for _ in range(8)], axis=0) for o in OBJECTS]
    for i in range(len(OBJECTS)):
        for j in range(i + 1, len(OBJECTS)):
            assert np.abs(means[i] - means[j]).mean() > 2.0, (OBJECTS[i], OBJECTS[j])


def test_heldout_synonyms_never_appear_in_training_captions():
    text = " | ".join(all_training_captions())
    for syns in HELDOUT_SYNONYMS.values():
        assert len(syns) >= 2
        for s in syns:
            assert not re.search(rf"\b{re.escape(s)}\b", text), s
    rng = np.random.default_rng(1)
    allowed = set(all_training_captions())
    for _ in range(500):
        assert caption(sample_scene(rng), rng) in allowed


def test_committed_classifier_accuracy_on_fresh_renders():
    result = evaluate_classifier(ToyClassifier.from_pretrained(), seed=424242, n=1500)
    assert result["heldout_object_accuracy"] >= 0.97, result
    assert result["heldout_colour_accuracy"] >= 0.90, result


def test_train_toy_rejects_bad_unet_widths(capsys):

    from unguide.cli import main

    assert main(["train-toy", "--unet-channels", "32,64"]) == 2
    assert "three comma-separated multiples of 16" in capsys.readouterr().err


def test_train_toy_rejects_a_device_that_is_not_there(capsys, tmp_path):
    import pytest
    import torch

    from unguide.cli import main

    assert main(["train-toy", "--stage", "unet", "--out", str(tmp_path / "t"), "--device", "tpu"]) == 2
    assert "unknown --device 'tpu'" in capsys.readouterr().err
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: --device cuda is valid here")
    assert main(["train-toy", "--stage", "unet", "--out", str(tmp_path / "t"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device is visible here; use --device cpu" in err[0]
    assert not (tmp_path / "t").exists()  # nothing half-written


def test_resume_forgets_log_lines_written_after_the_checkpoint(tmp_path):
    import json

    from unguide.toyworld.train import _drop_log_after

    log = tmp_path / "unet_log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(50, 401, 50)))
    _drop_log_after(log, 250)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [50, 100, 150, 200, 250]
    _drop_log_after(log, 250)  # idempotent
    assert len(log.read_text().splitlines()) == 5
