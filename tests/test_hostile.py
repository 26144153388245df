"""Hostile inputs: each gives exit 2, one line, no traceback, and writes nothing."""
import pickle

import pytest

from unguide.cli import main
from unguide.io import output_lock


def _one_line(capsys, fragment):
    err = capsys.readouterr().err
    assert fragment in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("name, content, fragment", [
    ("p.csv", b'prompt,evaluation_seed\n"a cat on a mat,3\nok,4\n', "line 2: malformed CSV"),
    ("p.csv", b'prompt\n"a cat" on a mat\n', "line 2: malformed CSV"),
    ("p.csv", b"prompt,evaluation_seed\na cat, on a mat,3\n", "line 2: 3 fields for 2 columns"),
    ("p.txt", b"a cat\na dog\n\xff\xfe bad bytes\n", "line 3: not UTF-8"),
])
def test_malformed_prompt_files(tmp_path, capsys, name, content, fragment):
    path = tmp_path / name
    path.write_bytes(content)
    assert main(["generate", "--prompts", str(path), "--out", str(tmp_path / "o")]) == 2
    _one_line(capsys, fragment)
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def tiny_run(tiny_sd, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "cat"
    assert main(["erase", "--model", str(tiny_sd), "--concept", "sd-cat", "--recipe", "reference", "--iterations", "1",
                 "--calibration-steps", "2", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("damage, fragment", [
    (lambda p: p.write_bytes(pickle.dumps({"unet.x": [1.0, 2.0]}, protocol=4)), "a Python pickle"),
    (lambda p: p.write_bytes(p.read_bytes()[:40]), "damaged or not a safetensors file"),
    (lambda p: p.write_bytes(b""), "damaged or not a safetensors file"),
])
def test_damaged_or_pickled_adapter_file(tiny_sd, tiny_run, tmp_path, capsys, damage, fragment):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    damage(run / "pytorch_lora_weights.safetensors")
    assert main(["generate", "--model", str(tiny_sd), "--erasure", str(run), "--prompt", "a photo of the cat", "--n", "1",
                 "--steps", "2", "--out", str(tmp_path / "o")]) == 2
    _one_line(capsys, fragment)
    assert not (tmp_path / "o").exists()


def test_a_second_job_on_the_same_out_stops(tiny_sd, tmp_path, capsys):
    out = tmp_path / "busy"
    with output_lock(out, "another erasure"):  # the first job holds the folder
        assert main(["erase", "--model", str(tiny_sd), "--concept", "sd-cat", "--recipe", "reference", "--iterations",
                     "1", "--out", str(out)]) == 2
        _one_line(capsys, "is in use by another unguide process")
        assert main(["generate", "--model", str(tiny_sd), "--prompt", "a cat", "--n", "1", "--steps", "2", "--out",
                     str(out)]) == 2
        _one_line(capsys, "is in use by another unguide process")
    assert [p.name for p in out.iterdir()] == [".unguide.lock"]  # nothing of the second job's was written
    assert main(["generate", "--model", str(tiny_sd), "--prompt", "a cat", "--n", "1", "--steps", "2", "--out",
                 str(out)]) == 0  # once the first job is done, the folder is free


def test_export_without_a_checkpoint(tmp_path, capsys):
    assert main(["train-toy", "--stage", "export", "--out", str(tmp_path / "t")]) == 2
    _one_line(capsys, "no UNet checkpoint")
    assert not (tmp_path / "t").exists()
