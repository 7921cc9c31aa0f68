"""`paws reproduce`: the published numbers, the plan and its cost estimate, step states, the runner's handling
of failures, the report, the CLI's errors, and (slow) the smoke scale end to end, resumed and re-run."""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from typer.testing import CliRunner

from paws_cli.cli import app
from paws_cli.config import load_settings
from paws_cli.reproduce import estimate
from paws_cli.reproduce.command import ffcv_available
from paws_cli.reproduce.paper import SEMPPL, TABLE1, TABLE2
from paws_cli.reproduce.plan import SMOKE_METHOD, SMOKE_PRETRAIN, Plan, PlanOptions, build_plan
from paws_cli.reproduce.report import render_json, write_report
from paws_cli.reproduce.runner import run_plan
from paws_cli.reproduce.status import step_status, total_steps

# Typed from PAWS-SPEC.md section 8 (= the paper's Tables 1 and 2): (epochs, labels, metric) -> top-1 %.
SPEC_TABLE1 = {
    (100, "1%", "finetune"): 63.8,
    (100, "10%", "finetune"): 73.9,
    (200, "1%", "finetune"): 66.1,
    (200, "10%", "finetune"): 75.0,
    (300, "1%", "finetune"): 66.5,
    (300, "10%", "finetune"): 75.5,
    (100, "1%", "paws_nn"): 61.5,
    (100, "10%", "paws_nn"): 71.0,
    (200, "1%", "paws_nn"): 63.2,
    (200, "10%", "paws_nn"): 71.9,
    (300, "1%", "paws_nn"): 64.2,
    (300, "10%", "paws_nn"): 73.1,
}
SPEC_TABLE2 = {
    ("r50x2", 100, "1%"): 68.2,
    ("r50x2", 100, "10%"): 77.0,
    ("r50x2", 200, "1%"): 69.6,
    ("r50x2", 200, "10%"): 77.8,
    ("r50x4", 100, "1%"): 69.8,
    ("r50x4", 100, "10%"): 78.5,
    ("r50x4", 200, "1%"): 69.9,
    ("r50x4", 200, "10%"): 79.0,
}

# Typed from SEMPPL-SPEC.md section 11 (the paper's abstract): (architecture, labels) -> fine-tuned top-1 %.
SPEC_SEMPPL = {
    ("ResNet-50", "1%"): 68.5,
    ("ResNet-50", "10%"): 76.0,
    ("ResNet-50 + SK", "1%"): 72.3,
    ("ResNet-50 + SK", "10%"): 78.3,
}
NO_SK = "not reproducible: no SK backbone in the toolkit"


def _plan(tmp_path: Path, table: str = "table1", scale: str = "full", fmt: str = "ffcv") -> Plan:
    imagenet = tmp_path / "imagenet" if scale == "full" else tmp_path / "work" / "smoke_imagenet"
    options = PlanOptions(table, scale, imagenet, tmp_path / "work", tmp_path / "reports", fmt)  # type: ignore[arg-type]
    return build_plan(options)


def _settings_args(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """(recipe, key=value overrides) of a `paws` command line."""
    recipe = argv[argv.index("--recipe") + 1] if "--recipe" in argv else None
    return recipe, [a for a in argv if "=" in a and not a.startswith("-")]


def test_published_numbers_are_the_spec_s() -> None:
    assert {(c.epochs, c.fraction, c.metric): c.paper_top1 for c in TABLE1} == SPEC_TABLE1
    assert {(c.recipe_prefix, c.epochs, c.fraction): c.paper_top1 for c in TABLE2} == SPEC_TABLE2
    assert all(c.metric == "finetune" for c in TABLE2)
    assert {c.recipe for c in TABLE1} == {"r50_1pct", "r50_10pct"}


def test_gpu_hour_estimate() -> None:
    r50 = load_settings("r50_1pct", ["data.path=x"], environ={})
    # calibration: the paper's 100 epochs in 8.2 h on 64 V100
    assert estimate.pretrain_hours(r50, 100) == pytest.approx(8.2 * 64)
    for name, factor in (("r50x2_1pct", 4), ("r50x4_10pct", 16)):
        wide = load_settings(name, ["data.path=x"], environ={})
        assert estimate.pretrain_hours(wide, 100) == pytest.approx(factor * 8.2 * 64)
    # 8 GPUs: 256 images and 560 x 3 = 1680 supports per step instead of 4096 and 6720
    small = load_settings("r50_10pct_8gpu", ["data.path=x"], environ={})
    base = 2 + 6 * (96 / 224) ** 2
    assert estimate.pretrain_hours(small, 100) / estimate.pretrain_hours(r50, 100) == pytest.approx(
        (base + 1680 / 256) / (base + 6720 / 4096)
    )
    per_pass = 8.2 * 64 / 100 / (1_281_167 * (base + 6720 / 4096))
    expected = (50 * (12_811 + 12_000 / 3) + 50_000 / 3) * per_pass
    assert estimate.finetune_hours(r50, "1%") == pytest.approx(expected)
    assert estimate.knn_eval_hours(r50, "10%") == pytest.approx((128_116 + 50_000) / 3 * per_pass)
    with pytest.raises(ValueError, match="no GPU-hour estimate for backbone 'resnet18'"):
        estimate.width_cost("resnet18")


def test_table1_plan(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    kinds = [s.kind for s in plan.steps]
    assert kinds.count("convert") == 1 and kinds.count("splits") == 2
    assert kinds.count("pretrain") == kinds.count("knn") == kinds.count("finetune") == 6
    seen: set[str] = set()
    for step in plan.steps:  # every step comes after what it needs
        assert set(step.needs) <= seen, step.id
        seen.add(step.id)
    pretrains = {s.id: s for s in plan.steps if s.kind == "pretrain"}
    for recipe in ("r50_1pct", "r50_10pct"):
        for epochs in (100, 200, 300):
            step = pretrains[f"pretrain-{recipe}_e{epochs}"]
            name, overrides = _settings_args(step.argv)
            assert name == recipe and f"optim.epochs={epochs}" in overrides
            settings = load_settings(name, overrides, environ={})  # the command's settings validate
            assert settings.data.format == "ffcv" and settings.data.path.endswith("train.beton")
            assert settings.data.split.endswith(f"{recipe.split('_')[1]}/labelled.txt")
            assert step.parallel and step.gpu_hours == pytest.approx(epochs / 100 * 8.2 * 64)
    knn = plan.step("knn-r50_1pct_e200")
    assert f"data.path={tmp_path / 'imagenet' / 'train'}" in knn.argv and "data.format=folder" in knn.argv
    finetune = plan.step("finetune-r50_10pct_e300")
    assert f"finetune.val_split={tmp_path / 'work' / 'splits' / '10pct' / 'val.txt'}" in finetune.argv
    splits = plan.step("splits-1pct")
    assert splits.argv[-3:] == ("--official", "1%", "--val")
    cells = {(c.cell.epochs, c.cell.fraction, c.cell.metric): c for c in plan.cells}
    assert set(cells) == set(SPEC_TABLE1)
    assert cells[(300, "10%", "paws_nn")].result == tmp_path / "work/runs/r50_10pct_e300/knn_eval.json"
    assert cells[(100, "1%", "finetune")].key == "test_top1"
    pretraining = sum(s.gpu_hours for s in plan.steps if s.kind == "pretrain")
    assert pretraining == pytest.approx(2 * (100 + 200 + 300) * 8.2 * 64 / 100)
    assert plan.gpu_hours == pytest.approx(sum(s.gpu_hours for s in plan.steps))
    assert 2 * 600 * 8.2 * 64 / 100 < plan.gpu_hours < 2 * 600 * 8.2 * 64 / 100 + 30


def test_table2_plan_and_the_smoke_plan_is_the_same_pipeline(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "table2")
    ids = [s.id for s in plan.steps]
    assert not any(i.startswith("knn-") for i in ids)
    assert sorted(i for i in ids if i.startswith("pretrain-")) == sorted(
        f"pretrain-r50x{w}_{f}pct_e{e}" for w in (2, 4) for f in (1, 10) for e in (100, 200)
    )
    for table in ("table1", "table2"):
        full, smoke = _plan(tmp_path, table), _plan(tmp_path, table, "smoke")
        assert [s.id for s in smoke.steps] == [s.id for s in full.steps]
        for step in smoke.steps:
            if step.kind == "pretrain":
                epochs = int(step.id.rsplit("_e", 1)[1])
                assert f"optim.epochs={epochs / 1000!r}" in step.argv
                assert set(SMOKE_PRETRAIN) <= set(step.argv) and not step.parallel
                name, overrides = _settings_args(step.argv)
                assert load_settings(name, overrides, environ={}).world_size == 1
            if step.kind == "splits":
                assert "--dataset-classes-only" in step.argv
    folder = _plan(tmp_path, fmt="folder")
    assert not any(s.kind == "convert" for s in folder.steps)
    assert f"data.path={tmp_path / 'imagenet' / 'train'}" in folder.step("pretrain-r50_1pct_e100").argv


def test_total_steps_is_the_training_loop_s_count() -> None:
    def state(images: int, batch: int, world: int, drop_last: int, epochs: float) -> dict:
        order = {"num_images": images, "batch_size": batch, "world_size": world, "drop_last": drop_last}
        return {"data": {"unlabelled": order}, "settings": {"optim": {"epochs": epochs}}}

    assert total_steps(state(561, 16, 1, 1, 0.1)) == 4  # 35 steps per epoch, round(3.5) = 4
    assert total_steps(state(561, 16, 1, 1, 0.3)) == 10  # round(10.5) = 10, as Python's round in the loop
    assert total_steps(state(561, 16, 1, 0, 0.2)) == 7  # 36 per epoch without drop_last, round(7.2)
    assert total_steps(state(1_281_167, 64, 64, 1, 100)) == 31_200  # 312 per epoch on ImageNet
    assert total_steps(state(100, 64, 64, 1, 0.001)) == 1  # at least one step


def test_a_damaged_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    plan = _plan(tmp_path, fmt="folder")
    step = plan.step("pretrain-r50_1pct_e100")
    step.result.parent.mkdir(parents=True)
    step.result.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"cannot read the checkpoint .*checkpoint\.pt.*remove"):
        step_status(step, plan)


def test_runner_failures_block_dependents_and_unfinished_steps_wait(tmp_path: Path) -> None:
    plan = _plan(tmp_path, fmt="folder")
    calls: list[list[str]] = []

    def execute(argv: Sequence[str], log: Path, parallel: bool) -> int:
        calls.append(list(argv))
        log.write_text("error: something broke\n")
        if argv[0] == "make-splits":
            if "1%" in argv:
                return 2
            out = Path(argv[2])
            out.mkdir(parents=True)
            (out / "labelled.txt").write_text("x\n")
            (out / "val.txt").write_text("x\n")
        return 0  # pretraining "succeeds" without a checkpoint, as a SLURM submission does

    (tmp_path / "work/runs/r50_10pct_e100").mkdir(parents=True)  # a run killed before its first checkpoint
    said: list[str] = []
    outcomes = {o.step: o for o in run_plan(plan, execute, said.append)}
    assert (
        outcomes["splits-1pct"].outcome == "failed"
        and outcomes["splits-1pct"].detail == "error: something broke"
    )
    assert outcomes["splits-10pct"].outcome == "ran"
    for epochs in (100, 200, 300):
        assert outcomes[f"pretrain-r50_1pct_e{epochs}"].outcome == "blocked"
        assert outcomes[f"pretrain-r50_10pct_e{epochs}"].outcome == "waiting"
        assert outcomes[f"knn-r50_10pct_e{epochs}"].outcome == "blocked"
        assert outcomes[f"finetune-r50_10pct_e{epochs}"].outcome == "blocked"
    pretrain_calls = {c[c.index("--recipe") + 1] + c[-1] for c in calls if c[0] == "pretrain"}
    assert "r50_10pct--overwrite" in pretrain_calls  # the directory without a checkpoint starts afresh
    assert len([c for c in calls if c[0] == "pretrain"]) == 3
    assert any("FAILED (exit 2)" in line for line in said)
    _, results = write_report(plan, list(outcomes.values()))
    by_cell = {(r.planned.cell.epochs, r.planned.cell.fraction, r.planned.cell.metric): r for r in results}
    assert by_cell[(100, "1%", "finetune")].missing == "failed"  # blocked by the failed split
    assert by_cell[(100, "10%", "finetune")].missing == "not run"  # waiting for its pretraining


def test_report_puts_ours_beside_the_paper_s(tmp_path: Path) -> None:
    plan = _plan(tmp_path, scale="smoke", fmt="folder")
    ft = tmp_path / "work/runs/r50_1pct_e100_finetune/finetune.json"
    knn = tmp_path / "work/runs/r50_10pct_e300/knn_eval.json"
    for path, doc in ((ft, {"test_top1": 64.3, "complete": True}), (knn, {"paws_nn_top1": 70.0})):
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(doc))
    md, results = write_report(plan)
    assert md == tmp_path / "reports" / "table1_smoke.md"
    text = md.read_text()
    assert "| ResNet-50 | PAWS (fine-tuned) | 100 | 63.8 | 64.30 | +0.5 | 73.9 | not run |  |" in text
    assert "| ResNet-50 | PAWS-NN (no fine-tuning) | 300 | 64.2 | not run |  | 73.1 | 70.00 | -3.1 |" in text
    assert "Smoke scale" in text
    doc = json.loads((tmp_path / "reports" / "table1_smoke.json").read_text())
    assert doc == render_json(plan, results)
    filled = {(c["epochs"], c["labels"], c["metric"]): c for c in doc["cells"] if c["ours_top1"] is not None}
    assert set(filled) == {(100, "1%", "finetune"), (300, "10%", "paws_nn")}
    assert filled[(300, "10%", "paws_nn")]["difference"] == pytest.approx(70.0 - 73.1)


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "300"})
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes else "")


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "reports"
    code, text = _cli("reproduce", "table1", "--dry-run", "--work", str(work), "--out", str(out))
    assert code == 0, text
    assert "paws pretrain --recipe r50_1pct" in text and "optim.epochs=300" in text
    assert "V100-hours in all" in text and f"{21 if ffcv_available() else 20} steps" in text
    assert not work.exists() and not out.exists()
    code, text = _cli("reproduce", "table2", "--dry-run", "--format", "folder", "--work", str(work))
    assert code == 0 and "paws finetune" in text and "paws knn-eval" not in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("table1",), "give the ImageNet folder: --imagenet"),
        (("table3", "--dry-run"), "unknown table 'table3'"),
        (("table1", "--scale", "smoke", "--imagenet", "/x"), "drop --imagenet"),
        (("table1", "--scale", "huge", "--dry-run"), "--scale must be full or smoke"),
        (("table1", "--format", "jpeg", "--dry-run"), "--format must be auto, ffcv or folder"),
    ],
)
def test_reproduce_errors(args: tuple[str, ...], message: str) -> None:
    code, text = _cli("reproduce", *args)
    assert code == 2 and message in " ".join(text.split()), text


def test_an_imagenet_folder_without_val_is_refused(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    code, text = _cli("reproduce", "table1", "--imagenet", str(tmp_path), "--dry-run")
    assert code == 2 and f"{tmp_path / 'val'} is not a folder" in " ".join(text.split())


# --------------------------------------------------------------------------------------------- smoke scale


def _reproduce(*args: str) -> tuple[int, str]:
    """`paws reproduce ...` in its own process, as `make reproduce-table1 SCALE=smoke` runs it."""
    cmd = [sys.executable, "-m", "paws_cli", "reproduce", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    return done.returncode, f"$ {shlex.join(cmd)}\n{done.stdout}{done.stderr}"


@pytest.fixture(scope="module")
def smoke_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("reproduce")
    return root / "work", root / "reports"


@pytest.mark.slow
def test_smoke_table1_end_to_end_resumable(smoke_dirs: tuple[Path, Path]) -> None:
    work, out = smoke_dirs
    args = ("table1", "--scale", "smoke", "--work", str(work), "--out", str(out))
    code, text = _reproduce(*args)
    assert code == 0, text
    assert ("convert-train: done" in text) == ffcv_available()  # the real .beton pipeline where FFCV exists
    doc = json.loads((out / "table1_smoke.json").read_text())
    assert len(doc["cells"]) == 12
    for cell in doc["cells"]:  # every cell filled, from its own result file
        assert cell["missing"] is None and 0.0 <= cell["ours_top1"] <= 100.0
        key = "paws_nn_top1" if cell["metric"] == "paws_nn" else "test_top1"
        assert json.loads(Path(cell["result_file"]).read_text())[key] == cell["ours_top1"]
        assert cell["difference"] == pytest.approx(cell["ours_top1"] - cell["paper_top1"])
    md = (out / "table1_smoke.md").read_text()
    assert "not run" not in md.split("Paper:")[0] and "failed" not in md.split("Paper:")[0]
    import torch

    for recipe in ("r50_1pct", "r50_10pct"):  # 561 images / 16 = 35 steps per epoch; 0.1/0.2/0.3 epochs
        for epochs, steps in ((100, 4), (200, 7), (300, 10)):
            state = torch.load(work / "runs" / f"{recipe}_e{epochs}" / "checkpoint.pt", weights_only=True)
            assert state["step"] == steps and state["settings"]["model"]["backbone"] == "cnn_w16"

    # a second run finds everything finished and runs nothing
    code, text = _reproduce(*args)
    assert code == 0, text
    assert text.count("finished earlier") == (21 if ffcv_available() else 20)
    assert "running" not in text

    # a lost result is made again, and only it; the evaluation is deterministic
    knn = work / "runs" / "r50_1pct_e200" / "knn_eval.json"
    before = json.loads(knn.read_text())["paws_nn_top1"]
    knn.unlink()
    code, text = _reproduce(*args)
    assert code == 0, text
    assert [line for line in text.splitlines() if "running" in line] == [
        line for line in text.splitlines() if "knn-r50_1pct_e200: running" in line
    ]
    assert json.loads(knn.read_text())["paws_nn_top1"] == before

    if ffcv_available():  # an image added after the conversion: the .beton no longer matches, loudly
        train = work / "smoke_imagenet" / "train"
        first = sorted(train.iterdir())[0]
        extra = first / "n01440764_99999999.JPEG"
        extra.write_bytes(next(first.iterdir()).read_bytes())
        code, text = _reproduce(*args)
        extra.unlink()
        assert code == 2 and "holds 1 image file(s) that" in " ".join(text.split()), text


@pytest.mark.slow
def test_smoke_table2_end_to_end(smoke_dirs: tuple[Path, Path]) -> None:
    work, out = smoke_dirs
    args = ("table2", "--scale", "smoke", "--work", str(work), "--out", str(out))
    # pretraining stopped early (as a killed or still-queued job leaves it): waiting, nothing evaluated yet
    code, text = _reproduce(*args, "--pretrain-set", "run.max_steps=2")
    assert code == 0, text
    assert (
        text.count("not finished yet (checkpoint at step 2 of") == 8
        and "8 step(s) are not finished yet and 8 wait" in text
    )
    assert all(
        c["missing"] == "not run" for c in json.loads((out / "table2_smoke.json").read_text())["cells"]
    )
    # the same command again continues every run from its checkpoint
    code, text = _reproduce(*args)
    assert code == 0, text
    log = (work / "logs" / "pretrain-r50x4_10pct_e200.log").read_text()
    assert log.count("$ paws pretrain") == 2 and log.splitlines()[-1] != "" and " --resume" in log
    doc = json.loads((out / "table2_smoke.json").read_text())
    assert len(doc["cells"]) == 8 and all(c["ours_top1"] is not None for c in doc["cells"])
    assert {c["recipe"] for c in doc["cells"]} == {"r50x2_1pct", "r50x2_10pct", "r50x4_1pct", "r50x4_10pct"}
    assert math.isclose(
        sum(c["paper_top1"] for c in doc["cells"]), sum(SPEC_TABLE2.values()), rel_tol=0, abs_tol=1e-9
    )


# --------------------------------------------------------------------------------------------- SemPPL's table


def test_semppl_numbers_are_the_spec_s() -> None:
    assert {(c.architecture, c.fraction): c.paper_top1 for c in SEMPPL} == SPEC_SEMPPL
    assert all(
        c.method == "SemPPL" and c.metric == "finetune" and c.label == "SemPPL (fine-tuned)" for c in SEMPPL
    )
    assert {c.recipe for c in SEMPPL if not c.unavailable} == {"semppl_r50_1pct", "semppl_r50_10pct"}
    assert [c.unavailable for c in SEMPPL if c.architecture.endswith("SK")] == [NO_SK, NO_SK]
    assert {c.label for c in TABLE1} == {"PAWS (fine-tuned)", "PAWS-NN (no fine-tuning)"}


def test_semppl_gpu_hours_count_its_views_and_its_target() -> None:
    r50 = load_settings("r50_1pct", ["data.path=x"], environ={})
    paws = 2 + 6 * (96 / 224) ** 2 + 6720 / 4096
    assert estimate.passes_per_image(r50) == pytest.approx(paws)  # PAWS: unchanged
    # SemPPL: 4 x 224 + 2 x 96 online views, forward and backward, + the 4 large views through the EMA target
    semppl = load_settings("semppl_r50_10pct", ["data.path=x"], environ={})
    passes = 4 + 2 * (96 / 224) ** 2 + 4 / 3
    assert estimate.passes_per_image(semppl) == pytest.approx(passes)
    assert estimate.pretrain_hours(semppl, 300) == pytest.approx(3 * 8.2 * 64 * passes / paws)
    # a labelled sub-batch joins the batch with all its views: 10 more images per 64
    demo = load_settings("semppl_fmnist_demo", environ={})
    views = 4 + 2 * (16 / 28) ** 2
    assert estimate.passes_per_image(demo) == pytest.approx((views + 4 / 3) * (1 + 10 / 64))


def test_semppl_plan_full_and_smoke(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "semppl")
    assert [s.id for s in plan.steps] == [
        "convert-train",
        "splits-1pct",
        "splits-10pct",
        "pretrain-semppl_r50_1pct_e300",
        "finetune-semppl_r50_1pct_e300",
        "pretrain-semppl_r50_10pct_e300",
        "finetune-semppl_r50_10pct_e300",
    ]
    passes = 4 + 2 * (96 / 224) ** 2 + 4 / 3
    for recipe in ("semppl_r50_1pct", "semppl_r50_10pct"):
        step = plan.step(f"pretrain-{recipe}_e300")
        name, overrides = _settings_args(step.argv)
        settings = load_settings(name, overrides, environ={})  # the command's settings validate
        assert name == recipe and settings.method == "semppl" and settings.optim.epochs == 300
        assert settings.data.format == "ffcv" and settings.data.split.endswith("/labelled.txt")
        per_pass = 8.2 * 64 / 100 / (1_281_167 * (2 + 6 * (96 / 224) ** 2 + 6720 / 4096))
        assert step.parallel and step.gpu_hours == pytest.approx(300 * 1_281_167 * passes * per_pass)
    by_cell = {(c.cell.architecture, c.cell.fraction): c for c in plan.cells}
    assert set(by_cell) == set(SPEC_SEMPPL)
    assert (
        by_cell[("ResNet-50", "10%")].result
        == tmp_path / "work/runs/semppl_r50_10pct_e300_finetune/finetune.json"
    )
    assert by_cell[("ResNet-50 + SK", "1%")].step is None and by_cell[("ResNet-50 + SK", "1%")].result is None
    smoke = _plan(tmp_path, "semppl", "smoke")
    assert [s.id for s in smoke.steps] == [s.id for s in plan.steps]
    step = smoke.step("pretrain-semppl_r50_1pct_e300")
    assert "optim.epochs=0.3" in step.argv and set(SMOKE_PRETRAIN) | set(SMOKE_METHOD["semppl"]) <= set(
        step.argv
    )
    assert not any(a.startswith("paws.") for a in step.argv)
    assert load_settings(*_settings_args(step.argv), environ={}).world_size == 1  # type: ignore[arg-type]
    # PAWS's smoke runs keep their support overrides
    assert set(SMOKE_METHOD["paws"]) <= set(
        _plan(tmp_path, "table1", "smoke").step("pretrain-r50_1pct_e100").argv
    )


def test_semppl_report_shows_the_sk_rows_as_not_reproducible(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "semppl", "smoke", "folder")
    ft = tmp_path / "work/runs/semppl_r50_1pct_e300_finetune/finetune.json"
    ft.parent.mkdir(parents=True)
    ft.write_text(json.dumps({"test_top1": 67.25, "complete": True}))
    md, results = write_report(plan)
    text = md.read_text()
    assert md.name == "semppl_smoke.md" and "Reproduction of the SemPPL paper's" in text
    assert "| ResNet-50 | SemPPL (fine-tuned) | 300 | 68.5 | 67.25 | -1.2 | 76.0 | not run |  |" in text
    assert f"| ResNet-50 + SK | SemPPL (fine-tuned) | 300 | 72.3 | {NO_SK} |  | 78.3 | {NO_SK} |  |" in text
    assert "PAWS-NN" not in text
    doc = json.loads((tmp_path / "reports" / "semppl_smoke.json").read_text())
    sk = [c for c in doc["cells"] if c["architecture"] == "ResNet-50 + SK"]
    assert len(sk) == 2 and all(c["missing"] == NO_SK and c["result_file"] is None for c in sk)
    assert [r.missing for r in results].count("not run") == 1


def test_semppl_dry_run(tmp_path: Path) -> None:
    work = tmp_path / "work"
    code, text = _cli("reproduce", "semppl", "--dry-run", "--work", str(work), "--out", str(tmp_path / "r"))
    assert code == 0, text
    text = " ".join(text.split())
    assert "paws pretrain --recipe semppl_r50_1pct" in text and "optim.epochs=300" in text
    assert "V100-hours in all" in text and f"{7 if ffcv_available() else 6} steps" in text
    assert f"not planned: SemPPL ResNet-50 + SK 1% (72.3): {NO_SK}" in text
    assert "paws knn-eval" not in text and not work.exists()


@pytest.mark.slow
def test_smoke_semppl_end_to_end(smoke_dirs: tuple[Path, Path]) -> None:
    work, out = smoke_dirs
    args = ("semppl", "--scale", "smoke", "--work", str(work), "--out", str(out))
    code, text = _reproduce(*args)
    assert code == 0, text
    doc = json.loads((out / "semppl_smoke.json").read_text())
    cells = {(c["architecture"], c["labels"]): c for c in doc["cells"]}
    assert set(cells) == set(SPEC_SEMPPL)
    for (arch, _), cell in cells.items():
        assert cell["paper_top1"] == SPEC_SEMPPL[(arch, cell["labels"])]
        if arch.endswith("SK"):
            assert cell["ours_top1"] is None and cell["missing"] == NO_SK
        else:
            assert cell["missing"] is None and 0.0 <= cell["ours_top1"] <= 100.0
            assert json.loads(Path(cell["result_file"]).read_text())["test_top1"] == cell["ours_top1"]
    import torch

    for recipe in ("semppl_r50_1pct", "semppl_r50_10pct"):  # 561 images / 16 = 35 steps per epoch; 0.3 epochs
        state = torch.load(work / "runs" / f"{recipe}_e300" / "checkpoint.pt", weights_only=True)
        assert state["step"] == 10 and state["settings"]["method"] == "semppl"
    code, text = _reproduce(*args)  # everything finished: nothing runs again
    assert (
        code == 0
        and "running" not in text
        and text.count("finished earlier") == (7 if ffcv_available() else 6)
    )
