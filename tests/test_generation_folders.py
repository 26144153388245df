"""Generation into folders: resume, several processes, prompt files and I2P rows."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unguide.cli import main


def _pixels(path):
    return np.asarray(Image.open(path))


def _gen(tiny_sd, out, *extra):
    return main(["generate", "--model", str(tiny_sd), "--prompt", "a photo of the cat", "--prompt", "a dog", "--n", "2",
                 "--steps", "4", "--out", str(out), *extra])


def test_resume_skips_finished_images(tiny_sd, tmp_path):
    out = tmp_path / "o"
    assert _gen(tiny_sd, out) == 0
    keep = out / "00000_000.png"
    before = keep.stat().st_mtime_ns
    redo = out / "00001_001.png"
    original = _pixels(redo)
    redo.unlink()
    assert _gen(tiny_sd, out) == 0
    assert keep.stat().st_mtime_ns == before and np.array_equal(_pixels(redo), original)
    assert (out / "index.jsonl").read_text().count("\n") == 4


@pytest.mark.slow
def test_two_processes_write_what_one_does(tiny_sd, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of the cat\na red car\na dog\n")
    common = ["generate", "--model", str(tiny_sd), "--prompts", str(prompts), "--n", "1", "--steps", "3"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "unguide.cli", *common, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    launcher = Path(sys.executable).parent / "accelerate"
    two = subprocess.run([str(launcher), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "unguide.cli", *common,
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    names = sorted(p.name for p in (tmp_path / "one").glob("0*.png"))
    assert names == sorted(p.name for p in (tmp_path / "two").glob("0*.png")) and len(names) == 3
    for n in names:
        assert np.array_equal(_pixels(tmp_path / "one" / n), _pixels(tmp_path / "two" / n))
    assert (tmp_path / "one" / "index.jsonl").read_text() == (tmp_path / "two" / "index.jsonl").read_text()


@pytest.mark.parametrize("content, fragment", [
    (b"text,seed\nhello,1\n", "no 'prompt' column"),
    (b"prompt,evaluation_seed\n,3\n", "empty prompt"),
    (b"prompt\n\xff\xfe\xfa bad\n", "not UTF-8"),
    (b"prompt,evaluation_seed\nhello,abc\n", "not a number"),
])
def test_bad_prompt_files(tmp_path, capsys, content, fragment):
    path = tmp_path / "p.csv"
    path.write_bytes(content)
    code = main(["generate", "--prompts", str(path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and fragment in err[0]
    assert not (tmp_path / "o").exists()


def test_i2p_rows_set_seed_guidance_and_size(tiny_sd, tmp_path):
    from unguide.generation.folders import read_png_metadata

    path = tmp_path / "i2p.csv"
    path.write_text("prompt,evaluation_seed,evaluation_guidance,sd_image_width,sd_image_height,categories\n"
                    "a cat,42,3.5,24,16,sexual\n")
    assert main(["generate", "--model", str(tiny_sd), "--prompts", str(path), "--n", "1", "--steps", "2",
                 "--out", str(tmp_path / "o")]) == 0
    meta = read_png_metadata(tmp_path / "o" / "00000_000.png")
    assert meta["seed"] == 42 and meta["guidance"] == 3.5 and meta["row"]["categories"] == "sexual"
    assert Image.open(tmp_path / "o" / "00000_000.png").size == (24, 16)
