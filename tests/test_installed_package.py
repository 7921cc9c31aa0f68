"""The package as a user installs it: a wheel built from the sources, installed into a fresh virtual environment,
run from another directory. Recipes, the official split lists and everything else the commands read must ship in
the wheel; nothing may read a path relative to the checkout.

The fresh environment reaches torch and the other dependencies through a path entry to this environment's
site-packages (no network), but not this checkout's editable install: that needs the ``.pth`` hook of this
environment, which a plain path entry does not run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from paws_cli.data.datasets.arrays import write_array_dataset

pytestmark = pytest.mark.slow  # a wheel build, a fresh venv and a tiny `paws demo`: about half a minute

REPO = Path(__file__).resolve().parents[1]
#: What the wheel is built from (pyproject's packages and package data); copied so the build writes nothing here.
SOURCES = ("pyproject.toml", "README.md", "paws_cli", "data_tools")


def _run(args: list[str], cwd: Path, timeout: float = 300) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"COLUMNS": "80", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin/ folder of a fresh venv with the wheel of this source tree installed (no dependencies)."""
    root = tmp_path_factory.mktemp("installed")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(
                REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
            )
        else:
            shutil.copy2(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "./src", "-w", "dist"], cwd=root)
    (wheel,) = (root / "dist").glob("paws_cli-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=root)
    python = venv / "bin" / "python"
    purelib = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root).strip()
    )
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (purelib / "dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    _run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)], cwd=root)
    return venv / "bin"


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("elsewhere")


def test_the_installed_package_is_the_wheel_not_the_checkout(installed: Path, elsewhere: Path) -> None:
    code = (
        "import json, paws_cli, paws_cli.config.loader as l, data_tools; "
        "from paws_cli.data.splits.files import official_split; "
        "print(json.dumps([paws_cli.__file__, data_tools.__file__, str(l.RECIPES_DIR), "
        "len(official_split('1%')), len(official_split('cifar10-4000-152'))]))"
    )
    package, tools, recipes, imagenet_1pct, cifar = json.loads(
        _run([str(installed / "python"), "-c", code], elsewhere)
    )
    venv = installed.parent
    assert Path(package).is_relative_to(venv) and Path(tools).is_relative_to(venv), (package, tools)
    assert Path(recipes).is_relative_to(venv) and (Path(recipes) / "fmnist_demo.yaml").is_file()
    assert (
        imagenet_1pct == 12811 and cifar == 4000
    )  # the official lists ship, checked against their line counts


def test_recipes_ls_and_show_from_another_directory(installed: Path, elsewhere: Path) -> None:
    out = _run([str(installed / "paws"), "recipes", "ls"], elsewhere)
    lines = out.splitlines()
    for name in ("fmnist_demo", "semppl_fmnist_demo", "r50_10pct", "wrn28x2_cifar10_4000"):
        assert name in lines  # whole, on a line of its own at 80 columns
    assert all(len(line) <= 80 for line in lines)
    shown = _run([str(installed / "paws"), "recipes", "show", "r50_1pct"], elsewhere)
    assert (
        "_imagenet_base" in shown and "batch_size" in shown
    )  # its base: resolved from the installed recipes


def test_demo_runs_from_another_directory(installed: Path, elsewhere: Path) -> None:
    rng = np.random.default_rng(0)
    splits = {}
    for split, per_class in (("train", 48), ("test", 8)):
        images = rng.integers(0, 255, size=(4 * per_class, 16, 16), dtype=np.uint8)
        labels = np.repeat(np.arange(4), per_class).astype(np.int64)
        images[labels % 2 == 1, :, :8] //= 4  # two looks, so that the numbers mean something
        splits[split] = (images, labels)
    write_array_dataset(elsewhere / "tiny", "tiny", splits["train"], splits["test"], list("abcd"), "test")
    tiny = [
        "data.dataset=array",
        "data.path=tiny",  # relative to the working directory, as a user types it
        "data.labels_per_class=4",
        "augment.large_size=16",
        "augment.small_size=8",
        "augment.num_small=2",
        "paws.images_per_class=2",
        "supervised.images_per_class=2",
        "semppl.num_negatives=4",
        "optim.batch_size=16",
        "model.proj_hidden_dim=32",
        "model.proj_out_dim=32",
        "run.max_steps=3",
        "run.num_threads=1",
        "finetune.epochs=1",
        "finetune.val_per_class=1",
        "finetune.batch_size=4",
    ]
    out = _run([str(installed / "paws"), "demo", *tiny], elsewhere, timeout=600)
    assert "PAWS-NN (soft nearest neighbour)" in out and "supervised-only" in out
    results = json.loads((elsewhere / "runs" / "fmnist_demo" / "demo_results.json").read_text())
    assert results["labelled_images"] == 16 and results["test_images"] == 32
