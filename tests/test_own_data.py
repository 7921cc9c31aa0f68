"""Your own images, end to end, through the CLI (issue 13): a generated folder of digit PNGs of two sizes is
refused with the option to pass, converted with it, pretrained on with ``data.path`` alone (the kind detected and
recorded, the views sized from the images), then evaluated and fine-tuned from another working directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from digits_fixture import make_digit_folder
from typer.testing import CliRunner

from paws_cli.cli import app

pytestmark = pytest.mark.slow  # a few CLI commands and two tiny trainings: about 30 s on 2 cores

TINY = [
    "optim.total_steps=4",  # 160 images, 2 steps per epoch: a schedule in steps
    "optim.warmup_steps=1",
    "run.precision=fp32",
    "run.num_threads=1",
    "run.progress=false",
]


def paws(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, f"paws {' '.join(args)} exited {result.exit_code}:\n{result.output}"
    return result.output


def test_a_folder_of_pngs_to_a_run_evaluated_from_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    make_digit_folder(
        work / "digits", per_class=17, test_per_class=3, sizes=(20, 20, 20, 20, 20, 20, 20, 20, 28)
    )

    refused = CliRunner().invoke(app, ["convert-dataset", "images", "digits/train", "data/digits"])
    assert refused.exit_code == 2 and "2 different sizes" in refused.output and "--size 20" in refused.output
    out = paws(
        "convert-dataset",
        "images",
        "digits/train",
        "data/digits",
        "--test-dir",
        "digits/test",
        "--size",
        "20",
    )
    assert "170 train / 30 test images, 10 classes (0, 1, 2, 3, 4, 5, 6, 7, 8, 9), 20x20 px grayscale" in out
    assert "resized 10 of 200 images to 20x20 px" in out  # image 8 of each training class is 28 px

    out = paws("pretrain", "--recipe", "fmnist_demo", "data.path=data/digits", "run.name=mine", *TINY)
    assert "data: digits at" in out
    assert "the large views are 20 px and the small ones 11 px" in out
    assert "steps: 4 (optim.total_steps" in out
    resolved = yaml.safe_load((work / "runs" / "mine" / "resolved_config.yaml").read_text())
    assert resolved["data"]["dataset"] == "array" and resolved["data"]["format"] == "memory"
    assert resolved["data"]["path"] == str(work / "data" / "digits")  # absolute
    assert (resolved["augment"]["large_size"], resolved["augment"]["small_size"]) == (20, 11)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    checkpoint = str(work / "runs" / "mine" / "checkpoint.pt")
    out = paws("knn-eval", checkpoint)
    assert "dataset digits" in out and "queries: 30 images of the test split" in out
    assert "eval.knn_k=20 exceeds the labelled images per class (10)" in out
    result = json.loads((work / "runs" / "mine" / "knn_eval.json").read_text())
    assert result["bank_size"] == 100 and result["queries"] == 30
    out = paws("finetune", checkpoint, "finetune.epochs=1", "run.progress=false")
    assert (elsewhere / "runs" / "mine_finetune" / "finetune.json").is_file()
