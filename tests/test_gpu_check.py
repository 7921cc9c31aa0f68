"""benchmarks/gpu_check.py (issue 16): its clear exit without CUDA, its pure parts (rows, verdicts, table, JSON,
arguments, the JPEG folder), the plumbing of its checks at toy sizes on the CPU, and, where there is a GPU, the
real thing (`--quick`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from rich.console import Console

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(REPO / "benchmarks"))  # the script imports its parts (and step.py) as it runs
import gpu_check  # noqa: E402
import gpu_check_parts as parts  # noqa: E402

HAS_FFCV = True
try:
    import ffcv  # noqa: F401
except ImportError:
    HAS_FFCV = False

#: Toy sizes for the checks' plumbing on the CPU (the recipes' ResNet-50 at 224 px would take minutes).
TOY = [
    "model.backbone=cnn_w16",
    "run.precision=fp32",
    "optim.batch_size=8",
    "paws.classes_per_batch=4",
    "paws.images_per_class=2",
    "model.proj_hidden_dim=32",
    "model.proj_out_dim=32",
    "model.pred_hidden_dim=8",
    "augment.large_size=32",
    "augment.small_size=16",
    "augment.num_small=2",
]


def toy_context(tmp_path: Path, *extra: str) -> gpu_check.Context:
    return gpu_check.Context(
        torch.device("cpu"), True, tmp_path, parts.Budget(600), None, [*TOY, *extra], say=lambda _: None
    )


# ----------------------------------------------------------------------------------------------- no CUDA


def test_without_cuda_it_exits_2_with_one_line_at_once() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", "never-written.json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr == parts.NO_CUDA_LINE + "\n"
    assert done.stdout == ""
    assert not (REPO / "never-written.json").exists()
    assert time.monotonic() - start < 60  # torch's import, nothing more
    assert "paws_cli" not in done.stderr


# ----------------------------------------------------------------------------------------------- pure parts


def test_verdicts_and_exit_code() -> None:
    assert parts.at_most(1.05, 1.10) == parts.MET and parts.at_most(1.2, 1.10) == parts.MISSED
    assert parts.at_least(3.0, 3.0) == parts.MET and parts.at_least(2.9, 3.0) == parts.MISSED
    assert parts.agrees(1e-6, 1e-4) == parts.OK and parts.agrees(1e-3, 1e-4) == parts.FAILED
    assert parts.agrees(float("nan"), 1e-4) == parts.FAILED
    rows = [parts.Row("c", "s", "r", "", v) for v in (parts.OK, parts.MISSED, parts.SKIPPED, parts.INFO)]
    assert parts.exit_code(rows) == 0  # a missed target is a finding, not a failure
    assert parts.exit_code([*rows, parts.Row("c", "s", "r", "", parts.FAILED)]) == 1
    with pytest.raises(ValueError, match="verdict must be one of"):
        parts.Row("c", "s", "r", "", "fine")


def test_guarded_turns_an_exception_into_one_failed_row() -> None:
    def boom() -> list[parts.Row]:
        raise RuntimeError("CUDA error: an illegal memory access\nwas encountered")

    (row,) = parts.guarded("3 memory", boom)
    assert row.verdict == parts.FAILED and row.check == "3 memory"
    assert row.result == "FAILED: RuntimeError: CUDA error: an illegal memory access was encountered"
    assert parts.guarded("x", list)[0].verdict == parts.FAILED  # a check that returns nothing failed too
    good = [parts.Row("x", "s", "r")]
    assert parts.guarded("x", lambda: good) == good
    assert len(parts.one_line("word " * 500)) == 300


def test_table_has_the_five_columns_and_every_row(tmp_path: Path) -> None:
    rows = [
        parts.Row(
            "1 FFCV on CUDA", "loading", "12,000 views/s", "wait <= 10%", parts.MET, {"views_per_s": 12e3}
        ),
        parts.failed_row("5 knn-eval", "(the whole check)", ValueError("bad [bank]")),
        parts.skipped_row("4 SyncBN (NCCL)", "2 processes", "1 GPU"),
    ]
    console = Console(record=True, width=200)
    console.print(parts.build_table(rows, "gpu_check: test"))
    text = console.export_text()
    for word in (*parts.COLUMNS, "12,000 views/s", "FAILED: ValueError: bad [bank]", "skipped: 1 GPU", "met"):
        assert word in text
    out = tmp_path / "out" / "table.json"
    parts.write_json(out, rows, {"device": "test"})
    data = json.loads(out.read_text())
    assert data["exit_code"] == 1 and data["meta"] == {"device": "test"}
    assert [r["verdict"] for r in data["rows"]] == [parts.MET, parts.FAILED, parts.SKIPPED]
    assert data["rows"][0]["values"] == {"views_per_s": 12000.0}


def test_methods_hook_adds_semppl_once_registered() -> None:
    assert parts.step_methods(["paws", "supervised"]) == ["paws"]
    assert parts.step_methods(["paws", "semppl", "supervised"]) == ["paws", "semppl"]
    assert parts.step_methods(["paws", "semppl"], ["semppl", "semppl"]) == ["semppl"]
    from paws_cli.method_registry import method_names

    measured = parts.step_methods(method_names())
    assert measured[0] == "paws" and ("semppl" in measured) == ("semppl" in method_names())


def test_budget_counts_from_its_start() -> None:
    now = [100.0]
    budget = parts.Budget(60, clock=lambda: now[0])
    now[0] = 130.0
    assert budget.used() == 30 and budget.left() == 30
    assert budget.allows(30) and not budget.allows(31)


def test_jpeg_folder_is_imagenet_style(tmp_path: Path) -> None:
    from data_tools.convert_imagefolder import scan_imagefolder

    train = parts.make_jpeg_folder(tmp_path, classes=2, per_class=3, size=(40, 30))
    assert train == tmp_path / "train"
    classes, files = scan_imagefolder(train)
    assert classes == ["n01440764", "n01441764"]
    assert [Path(f).name for f, _ in files][:3] == [f"n01440764_{i}.JPEG" for i in (1, 2, 3)]
    assert [label for _, label in files] == [0, 0, 0, 1, 1, 1]
    for path, _ in files:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            w, h = image.size
            portrait = Path(path).stem.endswith("_3")  # every third image
            assert (h > w) == portrait and min(w, h) >= 24 and max(w, h) <= 48
    again = parts.make_jpeg_folder(tmp_path / "again", classes=2, per_class=3, size=(40, 30))
    assert (again / "n01441764/n01441764_2.JPEG").read_bytes() == (
        train / "n01441764/n01441764_2.JPEG"
    ).read_bytes()
    with pytest.raises(ValueError, match="at least one class"):
        parts.make_jpeg_folder(tmp_path, classes=0)


def test_arguments() -> None:
    args = parts.parse_args([])
    assert (args.quick, args.out, args.budget_s, args.methods, args.only) == (
        False,
        None,
        450,
        None,
        [1, 2, 3, 4, 5, 6],
    )
    args = parts.parse_args(["--quick", "--out", "t.json", "--methods", "paws, semppl", "--only", "3,1"])
    assert (args.budget_s, args.out, args.methods, args.only) == (
        90,
        Path("t.json"),
        ["paws", "semppl"],
        [1, 3],
    )
    for bad in (["--only", "7"], ["--only", "x"], ["--budget-s", "0"]):
        with pytest.raises(SystemExit):
            parts.parse_args(bad)


def test_main_runs_every_check_and_one_failure_hides_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """main() on a pretend GPU with stub checks: every check runs, a raising one is its own FAILED row, the
    table is printed in check order and written as JSON, and the exit code says a check failed."""
    ran = []

    def stub(number: int) -> object:
        def check(ctx: gpu_check.Context) -> list[parts.Row]:
            ran.append(number)
            assert ctx.data_dir.is_dir() and ctx.quick
            if number == 4:
                raise RuntimeError("NCCL error: unhandled system error")
            return [parts.Row(f"{number} stub", "s", f"result {number}", "", parts.OK)]

        return check

    monkeypatch.setattr(gpu_check, "CHECKS", {n: (f"{n} stub", stub(n)) for n in range(1, 7)})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Pretend H100")
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--quick", "--out", str(out)]) == 1
    assert ran == list(gpu_check.RUN_ORDER)
    data = json.loads(out.read_text())
    assert [r["check"] for r in data["rows"]] == [f"{n} stub" for n in range(1, 7)]
    assert data["rows"][3]["result"] == "FAILED: RuntimeError: NCCL error: unhandled system error"
    assert data["meta"]["device"] == "Pretend H100" and data["exit_code"] == 1
    printed = capsys.readouterr().out
    assert "Pretend H100" in printed and "exit 1" in printed
    ran.clear()
    assert gpu_check.main(["--quick", "--only", "2,6"]) == 0 and ran == [6, 2]


# ----------------------------------------------------------------------------------------------- the checks' plumbing


def test_cpu_colour_draws_give_a_device_generator_the_cpu_draws() -> None:
    from paws_cli.data.augment.views import ViewSpec
    from paws_cli.data.backends import ffcv_loader

    spec = ViewSpec(16, (0.3, 1.0), jitter_p=0.8, grayscale_p=0.2, blur_p=0.5)
    cpu = torch.Generator().manual_seed(1234)
    expected = [ffcv_loader.sample_colour_params(6, spec, cpu) for _ in range(2)]

    class DeviceGenerator:  # what a CUDA generator shows of itself here: its device and its seed
        device = torch.device("cuda", 0)

        def initial_seed(self) -> int:
            return 1234

    device_gen = DeviceGenerator()
    with gpu_check.cpu_colour_draws():
        got = [ffcv_loader.sample_colour_params(6, spec, device_gen) for _ in range(2)]  # the stream goes on
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a.factors, b.factors) and torch.equal(a.jitter_order, b.jitter_order)
        assert torch.equal(a.sigma, b.sigma) and torch.equal(a.grayscale, b.grayscale)
    assert ffcv_loader.sample_colour_params is not None and "drawn_on_cpu" not in repr(
        ffcv_loader.sample_colour_params
    )  # restored


def test_colour_differences_find_a_garbled_view() -> None:
    gen = torch.Generator().manual_seed(0)
    step = [torch.randn(4, 3, 8, 8, generator=gen), torch.randn(2, 3, 4, 4, generator=gen), torch.arange(2)]
    same = parts.colour_differences([step], [[t.clone() for t in step]])
    assert same["per_channel"] == [0.0, 0.0, 0.0] and same["worst_view"] == 0 and same["views"] == 6
    garbled = [t.clone() for t in step]
    garbled[0][1] = torch.randn(3, 8, 8, generator=gen)  # one view from another buffer
    garbled[-1] = torch.tensor([1, 0])
    d = parts.colour_differences([step], [garbled])
    assert d["worst_view"] > 0.5 and 0 < max(d["per_channel"]) < d["worst_view"] and not d["classes_equal"]


@pytest.mark.parametrize("method", ["paws", "semppl"])
def test_step_check_on_the_cpu(method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Check 2's rows on a toy model: the method's batch, benchmarks/step.py's Bench timing the full step and the
    bare network, and the row it makes (on r50_10pct with method=NAME: the plumbing, not a method's recipe)."""
    from paws_cli.config.loader import RECIPES_DIR
    from paws_cli.method_registry import method_names

    if method not in method_names():
        pytest.skip(f"method {method!r} is not registered (yet)")
    own = (RECIPES_DIR / f"{method}_r50_10pct.yaml").is_file()
    assert gpu_check.step_recipe(method) == (
        (f"{method}_r50_10pct", []) if own and method != "paws" else ("r50_10pct", [f"method={method}"])
    )
    monkeypatch.setattr(gpu_check, "step_recipe", lambda name: ("r50_10pct", [f"method={name}"]))
    ctx = toy_context(tmp_path, "optim.batch_size=16")  # SemPPL draws 10 negatives per image
    ctx.methods = [method]
    (row,) = gpu_check.check_steps(ctx)  # --quick: the recipe's precision, channels_last, eager
    assert row.check == f"2 step: {method}" and row.verdict in (parts.MET, parts.MISSED), row.result
    assert row.values["full_ms"] > 0 and row.values["net_ms"] > 0
    assert "fp32" in row.setting and "cnn_w16" in row.setting  # the toy overrides win: rows say what ran
    assert ("supports" in row.setting) == (method == "paws")


def test_step_bench_runs_the_loops_step_on_the_cpu(tmp_path: Path) -> None:
    settings = gpu_check.settings_for("r50_10pct", toy_context(tmp_path))
    bench = parts.StepBench(settings, torch.device("cpu"))
    before = [p.detach().clone() for p in bench.model.parameters()]
    bench.full_step(0)
    assert any(not torch.equal(a, p) for a, p in zip(before, bench.model.parameters()))
    assert parts.describe_batch(settings) == "B=8 x (2x32 + 2x16) + 4x2 supports"


def test_fused_lars_check_on_the_cpu(tmp_path: Path) -> None:
    rows = gpu_check.check_fused_lars(toy_context(tmp_path), steps=2)
    assert [r.verdict for r in rows] == [parts.INFO, parts.OK]
    assert rows[1].values["rel_diff"] <= 1e-3


def test_knn_check_on_the_cpu(tmp_path: Path) -> None:
    rows = gpu_check.check_knn(toy_context(tmp_path), bank=2048, dim=32, classes=10)
    assert len(rows) == 3 and rows[1].verdict == parts.OK and rows[2].verdict == parts.OK
    assert rows[0].values["row_sum_error"] < 1e-4


def test_memory_check_halves_the_batch_after_an_oom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Check 3's rows with a pretend GPU where more than 16 images per step do not fit (x2) or nothing does (x4)."""
    tried: list[tuple[str, int, int]] = []

    def pretend(settings, device):
        tried.append((settings.model.backbone, settings.optim.batch_size, settings.paws.images_per_class))
        if settings.model.backbone == "resnet50x4" or settings.optim.batch_size > 16:
            return None, "CUDA out of memory. Tried to allocate 2.00 GiB"
        return 30 * 2**30, None

    monkeypatch.setattr(gpu_check, "peak_of_steps", pretend)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=80 * 2**30)
    )
    ctx = toy_context(tmp_path)
    ctx.overrides, ctx.quick = [], False  # the recipes as they are
    x2, x4 = gpu_check.check_wide_memory(ctx)
    assert [b for name, b, _ in tried if name == "resnet50x2"] == [64, 32, 16]
    assert x2.verdict == parts.MISSED and "OOM at the recipe batch" in x2.result and "B=16 x" in x2.result
    assert x2.values["batch_size"] == 16 and "peak 30.0 GiB" in x2.result
    assert [(b, p) for name, b, p in tried if name == "resnet50x4"][-1] == (1, 1)  # halved down to 1 + 15x1
    assert x4.verdict == parts.FAILED and x4.result.startswith("OOM even at B=1")


def test_syncbn_check_is_skipped_without_two_gpus(tmp_path: Path) -> None:
    (row,) = gpu_check.check_syncbn(toy_context(tmp_path))
    assert row.verdict == parts.SKIPPED and row.result.startswith("skipped: ")


@pytest.mark.slow
def test_syncbn_parity_plumbing_with_gloo_on_the_cpu() -> None:
    """2 spawned processes against 1 on the global batch. On the CPU BatchNorm runs in eval mode with its
    initial statistics (no SyncBatchNorm there), so the gradients are tiny and float32 cancellation dominates:
    this checks the plumbing (spawn, slicing, DDP averaging, comparison), not the 1e-4 of the CUDA run."""
    p = parts.syncbn_parity(backend="gloo", device_type="cpu")
    assert p["ranks_equal"] and p["tensors"] > 20 and p["syncbn_layers"] == 0
    assert p["loss_diff"] < 1e-6 and p["max_rel_grad_diff"] < 1e-2


@pytest.mark.slow
@pytest.mark.skipif(not HAS_FFCV, reason="FFCV is not installed")
def test_ffcv_check_on_the_cpu(tmp_path: Path) -> None:
    """Check 1 with the device path on the CPU (tensor colour ops) against the opencv path: the JPEG folder, the
    conversion, loading, training steps and the view-by-view comparison on the same draws."""
    rows = gpu_check.check_ffcv(toy_context(tmp_path))
    assert [r.verdict for r in rows][:1] == [parts.INFO] and len(rows) == 4, rows
    colour = rows[3]
    assert colour.verdict == parts.OK, colour.result
    assert colour.values["classes_equal"] and max(colour.values["per_channel"]) < 0.02
    assert 0 <= rows[2].values["data_wait_share"] <= 1 and rows[1].values["views_per_s"] > 0


# ----------------------------------------------------------------------------------------------- on a GPU


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quick_gpu_check_passes(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    data = json.loads(out.read_text())
    checks = {row["check"].split()[0] for row in data["rows"]}
    assert checks == {"1", "2", "3", "4", "5", "6"}
    assert not [r for r in data["rows"] if r["verdict"] == parts.FAILED]
