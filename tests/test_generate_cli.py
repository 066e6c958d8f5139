"""python -m model.generate writes valid PNGs and reports its seed; bad input and a bad model folder are one
clear line each, and bad input is reported before the model loads."""

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from support.tiny import write_tiny_pipeline

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("model"))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "model.generate", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_cli_writes_grid_and_single_images(folder, tmp_path):
    out = _cli("a fox to the left of a butterfly", "--model", str(folder), "--num-images", "4", "--seed", "3",
               "--top-k", "5", "--out", str(tmp_path / "grid.png"), "--out-dir", str(tmp_path / "single"))
    assert out.returncode == 0, out.stderr
    assert "seed 3" in out.stdout
    with Image.open(tmp_path / "grid.png") as grid:
        grid.verify()
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (32, 32) and grid.mode == "RGB"  # 2x2 tiles of 16x16
    singles = sorted((tmp_path / "single").glob("*.png"))
    assert len(singles) == 4
    assert all(Image.open(p).size == (16, 16) for p in singles)


def test_cli_bad_model_folder_is_a_clear_error(tmp_path):
    out = _cli("a fox", "--model", str(tmp_path / "missing"))
    assert out.returncode == 2
    assert "error: No model folder" in out.stderr and "Traceback" not in out.stderr


def test_cli_makes_variations_of_an_image(folder, tmp_path):
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "upload.png")
    out = _cli("--image", str(tmp_path / "upload.png"), "--keep-rows", "2", "--model", str(folder),
               "--num-images", "2", "--seed", "1", "--out-dir", str(tmp_path / "var"))
    assert out.returncode == 0, out.stderr
    assert len(list((tmp_path / "var").glob("*.png"))) == 2


def test_cli_bad_upload_is_a_clear_error(folder, tmp_path):
    (tmp_path / "bad.png").write_text("not an image")
    out = _cli("--image", str(tmp_path / "bad.png"), "--model", str(folder))
    assert out.returncode == 2 and "error: The upload is not an image" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("args, message", [
    (["a fox", "--top-p", "1.5"], "top_p must be between"),
    (["a fox", "--num-images", "0"], "num_images must be between"),
    (["a fox", "--temperature", "nan"], "temperature must be a finite number"),
    (["a fox", "--seed", "-1"], "seed must be between"),
    (["a fox", "--candidates", "1000"], "candidates must be between"),
    (["  \t "], "Please enter a prompt"),
    (["a fox", "--out", "grid.xyz"], "needs an image file extension"),
    (["a fox", "--out", "."], "is a folder"),
    (["a fox", "--out-dir", "README.md"], "is a file, not a folder"),
    (["a fox", "--top-k", "many"], "argument --top-k: invalid int value"),
])
def test_cli_bad_input_is_one_clear_line_before_loading(tmp_path, args, message):
    # The model folder does not exist: the input must be refused before anything is loaded.
    out = _cli(*args, "--model", str(tmp_path / "missing"))
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "No model folder" not in out.stderr and "Traceback" not in out.stderr
