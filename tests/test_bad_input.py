"""The bad-input matrix (issue 6, item 4): every kind of bad input a user can give `paws` ends with exit code 2
and one message that names the offending file, key or value and says what to do. No traceback, no hang.

Each case builds its bad input for real (a recipe with a typo, a truncated checkpoint, an empty class folder, a
truncated JPEG, ...) and runs the command line in-process, except the unreadable-image cases, which run in a
subprocess under a time limit so that a hung DataLoader worker fails the test instead of blocking the suite.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from imagefolder_fixture import make_imagefolder, wnid
from rich.console import Console
from typer.testing import CliRunner

from paws_cli.cli import app
from paws_cli.config import load_settings
from paws_cli.data.datasets.arrays import load_array_dataset
from paws_cli.data.splits.files import write_split
from paws_cli.train.checkpoint_io import load_checkpoint, save_checkpoint
from paws_cli.train.loop import train

pytestmark = pytest.mark.slow  # several cases train a few steps first; make test runs them

REPO = Path(__file__).resolve().parents[1]


def _flat(text: str) -> str:
    """Output with line breaks and runs of spaces collapsed (terminals wrap long messages)."""
    return " ".join(text.split())


def _invoke(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, args, env=env)
    output = result.output + (result.stderr if result.stderr_bytes else "")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {type(result.exception).__name__}: {result.exception}\n{output}")
    return result.exit_code, _flat(output)


# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path) -> tuple[Path, list[str]]:
    """A 2-step tiny pretraining run: its checkpoint, and the overrides that made it (run.out_dir included)."""
    out = tmp_path_factory.mktemp("trained")
    overrides = _tiny(tiny_dataset, out / "runs")
    threads = torch.get_num_threads()
    try:
        train(
            load_settings("fmnist_demo", [*overrides, "run.max_steps=2"], environ={}),
            console=Console(quiet=True),
        )
    finally:
        torch.set_num_threads(threads)
    return out / "runs" / "tiny" / "checkpoint.pt", overrides


def _tiny(dataset: Path, runs: Path) -> list[str]:
    """tests/conftest.py's tiny_overrides, for a module-scoped run (that fixture is per test)."""
    return [
        "data.dataset=array",
        f"data.path={dataset}",
        "data.labels_per_class=4",
        "augment.large_size=16",
        "augment.small_size=8",
        "augment.num_small=2",
        "paws.classes_per_batch=4",
        "paws.images_per_class=2",
        "optim.batch_size=16",
        "optim.epochs=2",
        "optim.warmup_epochs=0.5",
        "model.proj_hidden_dim=64",
        "model.proj_out_dim=64",
        "model.channels_last=false",
        "run.precision=fp32",
        "run.device=cpu",
        "run.num_threads=1",
        f"run.out_dir={runs}",
        "run.name=tiny",
        "run.progress=false",
    ]


@pytest.fixture(scope="module")
def folder_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-class ImageNet-layout folder of small real JPEGs (copied by the cases that damage it)."""
    return make_imagefolder(
        tmp_path_factory.mktemp("folder") / "imagenet", num_classes=4, per_class=8, size=(80, 60)
    )


def _folder_overrides(root: Path, runs: Path) -> list[str]:
    return [
        "data.dataset=imagefolder",
        "data.format=folder",
        f"data.path={root / 'train'}",
        "data.num_workers=2",
        "data.labels_per_class=4",
        "augment.large_size=24",
        "augment.small_size=12",
        "augment.num_small=2",
        "paws.classes_per_batch=4",
        "paws.images_per_class=2",
        "optim.batch_size=8",
        "optim.epochs=1",
        "optim.warmup_epochs=0",
        "model.proj_hidden_dim=32",
        "model.proj_out_dim=32",
        "model.channels_last=false",
        "run.precision=fp32",
        "run.device=cpu",
        "run.num_threads=1",
        f"run.out_dir={runs}",
        "run.name=folder",
        "run.progress=false",
    ]


@dataclass
class Ctx:
    """What a case may use to build its bad input."""

    tmp: Path
    tiny: list[str]  # overrides of a fresh tiny run in tmp
    dataset: Path  # the tiny array dataset
    checkpoint: Path  # a tiny run's checkpoint (do not modify: copy)
    trained: list[str]  # the overrides that made it
    folder: Path  # an ImageFolder root (do not modify: copy)

    def folder_copy(self) -> Path:
        return Path(shutil.copytree(self.folder, self.tmp / "imagenet"))


#: A case returns the command line, the substrings its message must hold, and environment variables to set.
Case = Callable[[Ctx], tuple[list[str], list[str], dict[str, str] | None]]
PRETRAIN = ["pretrain", "--recipe", "fmnist_demo"]


def _recipe(ctx: Ctx, text: str) -> Path:
    path = ctx.tmp / "bad_recipe.yaml"
    path.write_text(text)
    return path


def recipe_typo_in_a_section_name(ctx: Ctx) -> tuple[list[str], list[str], None]:
    path = _recipe(ctx, "base: fmnist_demo\noptm:\n  lr: 0.1\n")
    return (
        ["pretrain", "--recipe", str(path)],
        ["unknown settings section 'optm'", str(path), "Did you mean section 'optim'"],
        None,
    )


def recipe_typo_in_a_nested_key(ctx: Ctx) -> tuple[list[str], list[str], None]:
    path = _recipe(ctx, "base: fmnist_demo\noptim:\n  lrr: 0.1\n")
    return ["pretrain", "--recipe", str(path)], ["'optim.lrr'", str(path), "Did you mean 'optim.lr'"], None


def override_typo(ctx: Ctx) -> tuple[list[str], list[str], None]:
    return [*PRETRAIN, "loss.sharpen_t=0.3"], ["'loss.sharpen_t'", "Did you mean 'paws.sharpen_T'"], None


def environment_variable_typo(ctx: Ctx) -> tuple[list[str], list[str], dict[str, str]]:
    return [*PRETRAIN, *ctx.tiny], ["PAWS_OPTIM__LRR", "Did you mean 'optim.lr'"], {"PAWS_OPTIM__LRR": "0.3"}


def negative_learning_rate(ctx: Ctx) -> tuple[list[str], list[str], None]:
    return (
        [*PRETRAIN, "optim.lr=-0.1"],
        ["optim.lr", "greater than 0", "-0.1", "override 'optim.lr=-0.1'"],
        None,
    )


def sharpen_temperature_zero(ctx: Ctx) -> tuple[list[str], list[str], None]:
    return [*PRETRAIN, "paws.sharpen_T=0"], ["paws.sharpen_T", "greater than 0", "got 0"], None


def sharpen_temperature_negative_in_a_recipe(ctx: Ctx) -> tuple[list[str], list[str], None]:
    path = _recipe(ctx, "base: fmnist_demo\npaws:\n  sharpen_T: -0.5\n")
    return ["pretrain", "--recipe", str(path)], ["paws.sharpen_T", "greater than 0", str(path)], None


def support_larger_than_the_labelled_set(ctx: Ctx) -> tuple[list[str], list[str], None]:
    # 4 labelled images per class, 5 asked per class and step
    return (
        [*PRETRAIN, *ctx.tiny, "paws.images_per_class=5"],
        ["paws.images_per_class=5", "4 labelled images", "lower paws.images_per_class"],
        None,
    )


def _tiny_labels(ctx: Ctx) -> np.ndarray:
    return np.asarray(load_array_dataset(ctx.dataset).train_labels)


def split_with_too_few_images_in_a_class(ctx: Ctx) -> tuple[list[str], list[str], None]:
    labels = _tiny_labels(ctx)
    ids = [i for c in range(4) for i in np.flatnonzero(labels == c)[: 1 if c == 2 else 4].tolist()]
    path = ctx.tmp / "labelled.txt"
    write_split(path, sorted(ids), {"dataset": "tiny-stripes"})
    return (
        [*PRETRAIN, *ctx.tiny, f"data.split={path}"],
        ["class 2 has 1 labelled images", "paws.images_per_class=2"],
        None,
    )


def split_index_beyond_the_dataset(ctx: Ctx) -> tuple[list[str], list[str], None]:
    path = ctx.tmp / "labelled.txt"
    write_split(path, [0, 1, 2, 99999], {"dataset": "tiny-stripes"})
    return [*PRETRAIN, *ctx.tiny, f"data.split={path}"], [str(path), "99999"], None


def split_of_file_names_for_an_array_dataset(ctx: Ctx) -> tuple[list[str], list[str], None]:
    path = ctx.tmp / "labelled.txt"
    path.write_text("n01440764_1.JPEG\nn01440764_2.JPEG\n")
    return [*PRETRAIN, *ctx.tiny, f"data.split={path}"], [str(path), "file names", "index split"], None


def split_file_missing(ctx: Ctx) -> tuple[list[str], list[str], None]:
    path = ctx.tmp / "nowhere" / "labelled.txt"
    return [*PRETRAIN, *ctx.tiny, f"data.split={path}"], [str(path), "does not exist"], None


def dataset_path_missing(ctx: Ctx) -> tuple[list[str], list[str], None]:
    path = ctx.tmp / "no_such_dataset"
    return [*PRETRAIN, *ctx.tiny, f"data.path={path}"], [str(path), "does not exist"], None


def _doctored_checkpoint(ctx: Ctx, change: Callable[[dict], None]) -> Path:
    state = load_checkpoint(ctx.checkpoint)
    change(state)
    path = ctx.tmp / "doctored.pt"
    save_checkpoint(path, {k: v for k, v in state.items() if k not in ("format", "version")})
    return path


def checkpoint_of_another_architecture(ctx: Ctx) -> tuple[list[str], list[str], None]:
    # The weights of a 64-wide projection under settings that say 32: as if a file were swapped.
    path = _doctored_checkpoint(ctx, lambda s: s["settings"]["model"].update(proj_out_dim=32))
    return (
        ["knn-eval", str(path)],
        [str(path), "do not fit the model", "shape mismatch", "architecture"],
        None,
    )


def finetune_from_a_checkpoint_of_another_architecture(ctx: Ctx) -> tuple[list[str], list[str], None]:
    path = _doctored_checkpoint(ctx, lambda s: s["settings"]["model"].update(backbone="wrn28_2"))
    return ["finetune", str(path), f"run.out_dir={ctx.tmp}"], [str(path), "do not fit the model"], None


def resume_with_another_architecture(ctx: Ctx) -> tuple[list[str], list[str], None]:
    run_dir = ctx.tmp / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    shutil.copy(ctx.checkpoint, run_dir / "checkpoint.pt")
    return (
        [*PRETRAIN, *ctx.tiny, "model.proj_out_dim=32", "--resume"],
        [f"cannot resume from {run_dir / 'checkpoint.pt'}", "model.proj_out_dim"],
        None,
    )


def _truncated(ctx: Ctx, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = ctx.checkpoint.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def corrupt_checkpoint_for_evaluation(ctx: Ctx) -> tuple[list[str], list[str], None]:
    path = _truncated(ctx, ctx.tmp / "half.pt")
    return ["knn-eval", str(path)], [str(path), "corrupt or truncated"], None


def corrupt_checkpoint_on_resume(ctx: Ctx) -> tuple[list[str], list[str], None]:
    path = _truncated(ctx, ctx.tmp / "runs" / "tiny" / "checkpoint.pt")
    return [*PRETRAIN, *ctx.tiny, "--resume"], [str(path), "truncated or corrupt"], None


def checkpoint_holding_python_objects(ctx: Ctx) -> tuple[list[str], list[str], None]:
    # weights_only=True refuses to unpickle arbitrary objects: such a file is never executed
    path = ctx.tmp / "pickled.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "hook": Path("x")}, path)
    return ["export", str(path), str(ctx.tmp / "out.safetensors")], [str(path), "cannot be read"], None


def folder_split_with_names_missing_from_the_dataset(ctx: Ctx) -> tuple[list[str], list[str], None]:
    path = ctx.tmp / "names.txt"
    cls = wnid(0)
    path.write_text(f"{cls}_1.JPEG\n{cls}_2.JPEG\n{cls}_999.JPEG\nn09999999_1.JPEG\n")
    return (
        [*PRETRAIN, *_folder_overrides(ctx.folder, ctx.tmp / "runs"), f"data.split={path}"],
        [str(path), f"{cls}_999.JPEG", "n09999999_1.JPEG"],
        None,
    )


def folder_with_an_empty_class(ctx: Ctx) -> tuple[list[str], list[str], None]:
    root = ctx.folder_copy()
    empty = root / "train" / "n09999999"
    empty.mkdir()
    return [*PRETRAIN, *_folder_overrides(root, ctx.tmp / "runs")], ["n09999999", "no images"], None


def folder_path_missing(ctx: Ctx) -> tuple[list[str], list[str], None]:
    overrides = _folder_overrides(ctx.tmp / "missing", ctx.tmp / "runs")
    return [*PRETRAIN, *overrides], [str(ctx.tmp / "missing" / "train"), "does not exist"], None


def ffcv_file_without_its_sidecar(ctx: Ctx) -> tuple[list[str], list[str], None]:
    beton = ctx.tmp / "train.beton"
    beton.write_bytes(b"\0" * 4096)  # the sidecar check comes before the file is read
    overrides = [o for o in _folder_overrides(ctx.folder, ctx.tmp / "runs") if not o.startswith("data.")]
    args = [*PRETRAIN, *overrides, "data.dataset=imagefolder", "data.format=ffcv", f"data.path={beton}"]
    if importlib.util.find_spec("ffcv") is None or importlib.util.find_spec("numba") is None:
        # FFCV is an optional extra: without it the first thing to fix is its installation (exit 2 as well).
        return args, ["data.format=ffcv needs FFCV", "data.format=folder"], None
    return args, [f"{beton}.index.json", "convert-dataset imagefolder"], None


CASES: list[Case] = [
    recipe_typo_in_a_section_name,
    recipe_typo_in_a_nested_key,
    override_typo,
    environment_variable_typo,
    negative_learning_rate,
    sharpen_temperature_zero,
    sharpen_temperature_negative_in_a_recipe,
    support_larger_than_the_labelled_set,
    split_with_too_few_images_in_a_class,
    split_index_beyond_the_dataset,
    split_of_file_names_for_an_array_dataset,
    split_file_missing,
    dataset_path_missing,
    checkpoint_of_another_architecture,
    finetune_from_a_checkpoint_of_another_architecture,
    resume_with_another_architecture,
    corrupt_checkpoint_for_evaluation,
    corrupt_checkpoint_on_resume,
    checkpoint_holding_python_objects,
    folder_split_with_names_missing_from_the_dataset,
    folder_with_an_empty_class,
    folder_path_missing,
    ffcv_file_without_its_sidecar,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_exits_2_naming_the_culprit(
    case: Case,
    tmp_path: Path,
    tiny_overrides: list[str],
    tiny_dataset: Path,
    trained: tuple[Path, list[str]],
    folder_template: Path,
) -> None:
    ctx = Ctx(tmp_path, [*tiny_overrides, "run.num_threads=1"], tiny_dataset, *trained, folder_template)
    args, expected, env = case(ctx)
    code, output = _invoke(args, env)
    assert code == 2, output
    assert output.startswith("error:") or " error: " in output, output
    for text in expected:
        assert _flat(text) in output, f"{text!r} not in: {output}"
    assert "Traceback" not in output


# ----------------------------------------------------------------------- unreadable images met while training


def _damage(root: Path) -> tuple[Path, Path]:
    """Truncate one JPEG (half its bytes) and overwrite another with garbage; return both."""
    truncated = root / "train" / wnid(1) / f"{wnid(1)}_3.JPEG"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    garbage = root / "train" / wnid(2) / f"{wnid(2)}_5.JPEG"
    garbage.write_bytes(b"this is not a JPEG" * 50)
    return truncated, garbage


def _pretrain_subprocess(overrides: list[str]) -> subprocess.CompletedProcess[str]:
    # A time limit: a DataLoader worker that hung on a bad file would otherwise block the suite.
    return subprocess.run(
        [sys.executable, "-m", "paws_cli", "pretrain", "--recipe", "fmnist_demo", *overrides],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=240,
        env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "COLUMNS": "400"},
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_image_with_bad_images_stop_exits_2_naming_it(
    folder_template: Path, tmp_path: Path, workers: int
) -> None:
    root = Path(shutil.copytree(folder_template, tmp_path / "imagenet"))
    truncated, garbage = _damage(root)
    overrides = [
        *_folder_overrides(root, tmp_path / "runs"),
        "data.bad_images=stop",
        f"data.num_workers={workers}",
    ]
    out = _pretrain_subprocess(overrides)
    output = _flat(out.stdout + out.stderr)
    assert out.returncode == 2, output
    assert "Traceback" not in output
    assert (str(truncated) in output or str(garbage) in output) and "data.bad_images=skip" in output


def test_unreadable_images_with_bad_images_skip_are_counted_and_named(
    folder_template: Path, tmp_path: Path
) -> None:
    """One epoch visits every image once: both damaged files are met, replaced, counted and reported."""
    root = Path(shutil.copytree(folder_template, tmp_path / "imagenet"))
    truncated, garbage = _damage(root)
    out = _pretrain_subprocess([*_folder_overrides(root, tmp_path / "runs"), "data.bad_images=skip"])
    output = _flat(out.stdout + out.stderr)
    assert out.returncode == 0, output
    # Counted per read (an image may be read as an unlabelled image and as a support): at least the 2 files.
    found = re.search(r"warning: unreadable images were met (\d+) time\(s\)", output)
    assert found and int(found.group(1)) >= 2, output
    assert "2 distinct file(s) here" in output, output
    assert truncated.name in output or garbage.name in output
    assert load_checkpoint(tmp_path / "runs" / "folder" / "checkpoint.pt")["step"] == 4  # the epoch completed
