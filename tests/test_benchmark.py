import json

import pytest

from unguide.cli import main
from unguide.erasure.runs import read_run
from unguide.guidance.image_gate import ImageGate


@pytest.mark.slow
def test_one_concept_benchmark_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["benchmark", "--concepts", "sun", "--samples", "2", "--steps", "8", "--iterations", "4",
            "--calibration-samples", "2", "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    avg = report["average"]
    assert set(avg) == {"base", "lora", "unguide", "full", "selective", "selective-unguide", "selective-image"}
    # Acc_s counts the 5 held-out classes, the 4 anchor classes have their own column, for every method
    assert all(m["n_images"] == 2 * (1 + 1 + 2 + 9) for m in report["per_concept"]["sun"].values())
    assert all(0 <= m["acc_anchor"] <= 1 for m in avg.values())
    gated = report["per_concept"]["sun"]["selective-unguide"]["influence"]
    stored = read_run(out / "runs" / "sun" / "selective").calibration
    assert {v["gate"] for v in gated.values()} == {"calibrated"}
    assert {v["threshold"] for v in gated.values()} == {stored.prompt["threshold"]}
    assert report["per_concept"]["sun"]["unguide"]["influence"]["a photo of the sun"]["gate"] == "empty"
    # the default: the calibrated prompt gate marks suspects, the image gate checks every image (a suspect's under
    # its lenient threshold); its rate of firing per role is reported
    image = report["per_concept"]["sun"]["selective-image"]
    assert {v["gate"] for v in image["influence"].values()} == {"calibrated"}
    assert {"image_flagged_erased", "image_flagged_other", "image_flagged_anchor"} <= set(image)
    rows = [json.loads(line) for line in (out / "images" / "sun" / "selective-image" / "index.jsonl").read_text().splitlines()]
    lenient = ImageGate.from_stored(stored.image).suspect_threshold
    assert all(r["image_threshold"] == (lenient if r.get("suspects") else stored.image["threshold"]) for r in rows)
    assert all(bool(r.get("suspects")) == (r["score"] > stored.prompt["threshold"]) for r in rows)
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
    # images drawn under other guidance are never reused as this benchmark's: one clear line, exit code 2
    assert main([*args, "--methods", "base,selective-image", "--image-gate", "image"]) == 2
    assert "other guidance settings" in capsys.readouterr().err
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


# ---------------------------------------------------------------- the report, from a report dict (no benchmark run)

def _fake_benchmark(out, concepts, methods=("base", "selective")):
    """A benchmark directory as write_report reads it: a report dict, a suite whose grids are its prompts, and one
    32x32 image per prompt and method."""
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    from unguide.evaluation.report import method_folder

    prompts = ["a photo of the sun", "a photo of the moon"]
    case = SimpleNamespace(spec=None, rows=[{"prompt": p, "role": "prompt"} for p in prompts])
    suite = SimpleNamespace(name="toy", description="a test", metrics="nudity", cases={c: case for c in concepts})
    for concept in concepts:
        for method in methods:
            folder = method_folder(out, concept, method)
            folder.mkdir(parents=True, exist_ok=True)
            rows = []
            for k, prompt in enumerate(prompts):
                Image.fromarray(np.full((32, 32, 3), 60 * k, np.uint8)).save(folder / f"{k:05d}_000.png")
                rows.append({"file": f"{k:05d}_000.png", "prompt": prompt})
            (folder / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = {"acc_e": 0.5, "h_o": 0.9, "ssim_other": 0.98, "fid_other": -0.00004, "pixel_error_other": -0.0}
    report = {"model": "toyworld", "guidance": 5.0, "config": {"samples": 1, "steps": 8, "seed": 0},
              "per_concept": {c: {m: dict(metrics) for m in methods} for c in concepts},
              "average": {m: dict(metrics) for m in methods}}
    return report, suite


def test_report_never_prints_negative_zero():
    from unguide.evaluation.report import _fmt

    assert _fmt("fid_other", -0.00004) == "0.000" and _fmt("pixel_error_other", -0.0) == "0.000"
    assert _fmt("acc_e", -1e-6) == "0.00" and _fmt("exposed_total", -0.2) == "0"
    assert _fmt("fid_other", -0.0007) == "-0.001" and _fmt("fid_other", 0.0004) == "0.000"  # real signs stay


@pytest.mark.parametrize("concepts", [["sun"], ["sun", "star"]])
def test_report_tables(tmp_path, concepts):
    from unguide.evaluation.report import write_report

    report, suite = _fake_benchmark(tmp_path, concepts)
    md_path, html_path = write_report(tmp_path, report, suite)
    md, page = md_path.read_text(), html_path.read_text()
    for text in (md, page):
        assert "-0.000" not in text and "0.000" in text
    if len(concepts) == 1:  # one table: the average over one concept would repeat it
        assert "## Results" in md and "Average over concepts" not in md + page and "Per concept" not in md + page
        assert "| sun | selective |" in md and "| average |" not in md and "<td>average</td>" not in page
    else:  # the average, then each concept once (the per-concept table does not repeat the average)
        assert md.count("| average |") == 2 and page.count("<td>average</td>") == 2
        assert md.index("## Average over concepts") < md.index("## Per concept")
        assert md.count("| star | selective |") == 1
    assert (tmp_path / "grids" / "sun.png").is_file()


def test_grid_labels_stay_legible_on_the_page():
    """A grid as wide as the toy benchmark's (7 methods x 4 samples of 96 px) is shown shrunk to the page's 1200 px:
    its labels are drawn large enough to stay about 15 px tall there, and the margins follow the text."""
    import numpy as np
    from PIL import Image

    from unguide.evaluation.grids import LABEL_SCREEN_WIDTH, label_grid

    methods = ["base", "lora", "unguide", "full", "selective", "selective-unguide", "selective-image"]
    prompts = ["a photo of the sun", "a photo of the solar disc", "a photo of the moon"]
    grid = Image.new("RGB", (7 * 4 * 98 + 2, 3 * 98 + 2), "#777")
    canvas = np.asarray(label_grid(grid, prompts, methods).convert("L"))
    top, left = canvas.shape[0] - grid.height, canvas.shape[1] - grid.width
    shrink = LABEL_SCREEN_WIDTH / canvas.shape[1]
    ink = np.flatnonzero((canvas[:top, left:left + grid.width // 7] < 100).any(axis=1))  # the first method's label
    assert ink.size and (ink.max() - ink.min() + 1) * shrink >= 9  # "base": its x-height and ascender, on the page
    assert (canvas[top:, :left] < 100).any()  # the prompts are drawn in the margin
    small = np.asarray(label_grid(Image.new("RGB", (400, 200), "#777"), ["a"], ["b"]).convert("L"))
    assert small.shape[0] - 200 < top  # a small grid keeps small labels (14 px)
