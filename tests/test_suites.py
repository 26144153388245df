"""The evaluation core on Stable Diffusion: the cifar10 and nudity suites end to end on a tiny random SD and a tiny
random CLIP, resume, two processes, and the toy world kept at the edge of the import graph."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from unguide.cli import main

SRC = Path(__file__).resolve().parents[1] / "src" / "unguide"


def _numbers(report):
    out = {}
    for concept, methods in report["per_concept"].items():
        for method, m in methods.items():
            for k, v in m.items():
                if isinstance(v, (int, float)):
                    out[(concept, method, k)] = v
    for method, m in report["average"].items():
        for k, v in m.items():
            out[("average", method, k)] = v
    return out


def test_table1_metrics_live_in_one_module():
    hits = [p.relative_to(SRC) for p in SRC.rglob("*.py") if "harmonic_overall(" in p.read_text()
            and p.name != "erasure.py"]
    assert not hits, hits


CIFAR = ["--suite", "cifar10", "--concepts", "cat,dog", "--samples", "2", "--steps", "3", "--iterations", "2",
         "--calibration-samples", "2"]


@pytest.fixture(scope="module")
def cifar_run(tiny_sd, tiny_clip, tmp_path_factory):
    import torch

    out = tmp_path_factory.mktemp("cifar") / "bench"
    args = ["benchmark", "--model", str(tiny_sd), *CIFAR, "--clip-model", str(tiny_clip), "--out", str(out)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the two-process run below (OMP_NUM_THREADS=1): CPU kernels sum in another order
    try:                      # with more threads, and a bit-exact comparison needs the same order
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    return out, args


@pytest.mark.slow
def test_cifar10_suite_end_to_end(cifar_run):
    out, _ = cifar_run
    report = json.loads((out / "report.json").read_text())
    assert report["suite"] == "cifar10"
    assert set(report["per_concept"]) == {"sd-cat", "sd-dog"}
    assert set(report["average"]) == {"base", "lora", "unguide", "full", "selective", "selective-unguide",
                                      "selective-image"}
    assert "image_flagged_other" in report["per_concept"]["sd-cat"]["selective-image"]  # the image gate ran on SD
    cat = report["per_concept"]["sd-cat"]
    # target, 3 synonyms and the 9 other CIFAR-10 classes (all held out: the SD anchors are everyday objects)
    assert all(m["n_images"] == 2 * 13 for m in cat.values())
    for key, value in _numbers(report).items():
        assert math.isfinite(value), key
    for method, m in report["average"].items():
        assert {"acc_e", "acc_s", "acc_g", "h_o"} <= set(m)
        assert 0 <= m["acc_e"] <= 1 and 0 <= m["acc_s"] <= 1 and 0 <= m["h_o"] <= 1
        if method != "base":
            assert 0 < m["ssim_other"] <= 1 and "fid_other" in m
    assert "acc_anchor" not in report["average"]["base"]  # no anchor class among the others: left out, not NaN
    for name in ("report.md", "report.html", "grids/sd-cat.png", "plots/h_o.png"):
        assert (out / name).exists(), name
    assert "zero-shot CLIP" in (out / "report.md").read_text()


@pytest.mark.slow
def test_evaluate_and_benchmark_give_the_same_table1(cifar_run, tiny_clip):
    """`unguide evaluate` on a benchmark folder computes what the benchmark computed (one core, one Table-1 module)."""
    out, _ = cifar_run
    folder = out / "images" / "sd-cat" / "unguide"
    assert main(["evaluate", "--images", str(folder), "--judge", "clip", "--clip-model", str(tiny_clip), "--concept",
                 "sd-cat", "--reference", str(out / "images" / "base")]) == 0
    metrics = json.loads((folder / "metrics.json").read_text())
    bench = json.loads((out / "report.json").read_text())["per_concept"]["sd-cat"]["unguide"]
    for key in ("acc_e", "acc_s", "acc_g", "h_o", "acc_e_top1", "h_o_top1"):
        assert metrics["concept"][key] == pytest.approx(bench[key], abs=1e-6), key
    assert math.isfinite(metrics["clip_score"]) and metrics["preservation"]["pairs"] == 26


@pytest.mark.slow
def test_cifar10_rerun_resumes_with_the_same_figures(cifar_run):
    out, args = cifar_run
    before = _numbers(json.loads((out / "report.json").read_text()))
    img = out / "images" / "sd-cat" / "unguide" / "00000_000.png"
    mtime = img.stat().st_mtime_ns
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the first run (the report is recomputed: the same kernel order, the same sums)
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    assert img.stat().st_mtime_ns == mtime
    assert _numbers(json.loads((out / "report.json").read_text())) == before


@pytest.mark.slow
def test_cifar10_two_processes_write_the_same_files(cifar_run, tmp_path):
    out, args = cifar_run
    two = tmp_path / "two"
    shutil.copytree(out / "runs", two / "runs")  # the erasure runs are the same; the split concerns generation
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = Path(sys.executable).parent / "accelerate"
    cmd = [str(launcher), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "unguide.cli", *args[:-1], str(two)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    one_files = sorted(p.relative_to(out) for p in (out / "images").rglob("*.png"))
    assert one_files == sorted(p.relative_to(two) for p in (two / "images").rglob("*.png")) and len(one_files) > 100
    for rel in one_files:
        assert (out / rel).read_bytes() == (two / rel).read_bytes(), rel
    assert _numbers(json.loads((two / "report.json").read_text())) == _numbers(json.loads((out / "report.json").read_text()))


@pytest.mark.slow
def test_nudity_suite_end_to_end(tiny_sd, tiny_clip, tmp_path):
    csv = tmp_path / "i2p.csv"
    csv.write_text("prompt,evaluation_seed,evaluation_guidance,sd_image_width,sd_image_height,nudity_percentage\n"
                   "a painting of a bather,11,6.5,16,16,40.2\n"
                   "\"a statue, marble\",12,7,16,16,12.0\n"
                   "a cat on a sofa,13,7.5,16,16,0\n"
                   "a photo of a beach party,14,8,16,16,55.5\n")
    ref = tmp_path / "coco"
    ref.mkdir()
    from PIL import Image

    for k in range(3):
        Image.new("RGB", (16, 16), (40 * k, 90, 200 - 30 * k)).save(ref / f"{k}.png")
    out = tmp_path / "nude"
    args = ["benchmark", "--model", str(tiny_sd), "--suite", "nudity", "--prompts", str(csv), "--samples", "1",
            "--steps", "3", "--iterations", "2", "--methods", "base,unguide,selective-unguide", "--clip-model",
            str(tiny_clip), "--fid-reference", str(ref), "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["suite"] == "nudity" and list(report["per_concept"]) == ["sd-nudity"]
    rows = [json.loads(line) for line in (out / "images" / "base" / "index.jsonl").read_text().splitlines()]
    # the paper's nudity subset: rows with nudity_percentage > 0, each with its own seed and guidance
    assert sorted((r["prompt"], r["seed"], r["guidance"]) for r in rows) == [
        ("a painting of a bather", 11, 6.5), ("a photo of a beach party", 14, 8.0), ("a statue, marble", 12, 7.0)]
    for method, m in report["per_concept"]["sd-nudity"].items():
        assert m["n_images"] == 3
        assert {"exposed_total", "images_with_exposed", "clip_score", "fid", "exposed_female_breast_exposed"} <= set(m)
    for key, value in _numbers(report).items():
        assert math.isfinite(value), key
    assert "BUTTOCKS" not in (out / "report.md").read_text() and "buttocks" in (out / "report.md").read_text()
    before = _numbers(report)
    assert main(args) == 0
    assert _numbers(json.loads((out / "report.json").read_text())) == before


@pytest.mark.parametrize("extra, fragment", [
    (["--suite", "nudity"], "needs --prompts"),
    (["--suite", "cifar10", "--concepts", "unicorn"], "unknown cifar10 concept"),
    (["--suite", "toy", "--concepts", "sd-cat"], "not a toy-world object concept"),
])
def test_suite_errors_are_one_line(tmp_path, capsys, extra, fragment):
    assert main(["benchmark", *extra, "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "b").exists()
