import json

import pytest

from unguide.cli import main


@pytest.mark.slow
def test_one_concept_benchmark_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["benchmark", "--concepts", "sun", "--samples", "2", "--steps", "8", "--iterations", "4", "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    avg = report["average"]
    assert set(avg) == {"base", "lora", "unguide", "full", "selective", "selective-unguide", "selective-image"}
    # Acc_s counts the 5 held-out classes, the 4 anchor classes have their own column, for every method
    assert all(m["n_images"] == 2 * (1 + 1 + 2 + 9) for m in report["per_concept"]["sun"].values())
    assert all(0 <= m["acc_anchor"] <= 1 for m in avg.values())
    gated = report["per_concept"]["sun"]["selective-unguide"]["influence"]
    stored = json.loads((out / "runs" / "sun" / "selective" / "erasure.json").read_text())["gate"]
    assert {v["gate"] for v in gated.values()} == {"calibrated"}
    assert {v["threshold"] for v in gated.values()} == {stored["threshold"]}
    assert report["per_concept"]["sun"]["unguide"]["influence"]["a photo of the sun"]["gate"] == "empty"
    # the image gate: no prompt gate, every image checked; its rate of firing per role is reported
    image = report["per_concept"]["sun"]["selective-image"]
    assert {v["gate"] for v in image["influence"].values()} == {"none"}
    assert {"image_flagged_erased", "image_flagged_other", "image_flagged_anchor"} <= set(image)
    rows = [json.loads(line) for line in (out / "images" / "sun" / "selective-image" / "index.jsonl").read_text().splitlines()]
    assert all(r["image_threshold"] == stored["image"]["threshold"] for r in rows)
    # the selective recipe's default redraw: the adapter (w = 0), or the reference prompt where that still shows a sun
    assert all(r["w"] == (0.0 if r["image_flagged"] and not r.get("substitute_prompt") else 1.0) for r in rows)
    assert all(r.get("substitute_prompt") in (None, "a photo of the sky") for r in rows)
    other = [r for r in rows if r["role"] == "other"]
    assert image["image_flagged_other"] == sum(r["image_flagged"] for r in other) / len(other)
    for method, m in avg.items():
        assert 0 <= m["acc_e"] <= 1 and 0 <= m["acc_s"] <= 1 and 0 <= m["h_o"] <= 1
        if method != "base":
            assert 0 < m["ssim_other"] <= 1 and m["pixel_error_other"] >= 0
    influence = report["per_concept"]["sun"]["unguide"]["influence"]
    assert influence["a photo of the sun"]["role"] == "erased" and "score" in influence["a photo of the sun"]
    for name in ("report.md", "report.html", "grids/sun.png", "plots/h_o.png", "plots/influence_unguide.png",
                 "plots/influence_selective-unguide.png"):
        assert (out / name).exists(), name
    html = (out / "report.html").read_text()
    assert "<table>" in html and "grids/sun.png" in html
    # a rerun reuses the erasure runs and every image
    mtime = (out / "runs" / "sun" / "object" / "pytorch_lora_weights.safetensors").stat().st_mtime_ns
    first_img = out / "images" / "sun" / "unguide" / "00000_000.png"
    img_mtime = first_img.stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "runs" / "sun" / "object" / "pytorch_lora_weights.safetensors").stat().st_mtime_ns == mtime
    assert first_img.stat().st_mtime_ns == img_mtime
    assert "| average | unguide |" in capsys.readouterr().out
    # a smaller run over the same folder evaluates the first --samples images of every method, base included
    assert main([*args[:3], "--samples", "1", *args[5:]]) == 0
    smaller = json.loads((out / "report.json").read_text())["per_concept"]["sun"]
    assert {m: r["n_images"] for m, r in smaller.items()} == {m: 1 + 1 + 2 + 9 for m in smaller}


def test_evaluate_command_scores_a_generated_folder(tmp_path):
    gen = ["generate", "--prompt", "a photo of the fish", "--prompt", "a photo of a red heart", "--n", "2", "--steps", "10"]
    assert main(gen + ["--out", str(tmp_path / "a")]) == 0
    assert main(gen + ["--out", str(tmp_path / "b"), "--seed", "1"]) == 0
    assert main(["evaluate", "--images", str(tmp_path / "a"), "--reference", str(tmp_path / "b"), "--concept", "fish"]) == 0
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    fish = m["per_prompt"]["a photo of the fish"]
    assert fish["class"] == "fish" and fish["n"] == 2 and 0 <= fish["p_correct"] <= 1
    assert m["per_prompt"]["a photo of a red heart"]["colour"] == "red"
    assert m["colour_rate"] == {"red": m["per_prompt"]["a photo of a red heart"]["colour_rate"]}
    assert m["preservation"]["pairs"] == 2  # seed 1 of a pairs with seed 1 of b
    assert "acc_e" in m["concept"]


def test_evaluate_bad_folder(tmp_path, capsys):
    assert main(["evaluate", "--images", str(tmp_path)]) == 2
    assert "no index.jsonl" in capsys.readouterr().err
