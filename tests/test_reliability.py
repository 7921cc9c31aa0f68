"""Fault injection (issue 6): kill -9 mid-epoch and resume exactly, failed checkpoint writes, non-finite losses,
and two runs in one run directory. Every test injects the fault for real (a signal, a write that fails, a NaN
loss, a second process) and checks what the toolkit promises afterwards."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from imagefolder_fixture import make_imagefolder
from rich.console import Console
from typer.testing import CliRunner

from paws_cli.cli import app
from paws_cli.config import load_settings
from paws_cli.methods.paws import PAWSMethod
from paws_cli.optim import StepSchedule, create_optimizer
from paws_cli.train import loop
from paws_cli.train.checkpoint_io import CheckpointError, load_checkpoint, save_checkpoint
from paws_cli.train.loop import NonFiniteLossError, TrainResult, train
from paws_cli.train.rundir import RunDirError

pytestmark = pytest.mark.slow  # end-to-end training runs (seconds each); make test runs them

QUIET = Console(quiet=True)
REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 16  # tiny_overrides: 256 images / batch 16


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread for in-process runs (as the subprocesses use), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(overrides: list[str], **kwargs: Any) -> TrainResult:
    return train(
        load_settings("fmnist_demo", [*overrides, "run.num_threads=1"], environ={}), console=QUIET, **kwargs
    )


def _assert_same_training_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Bitwise-equal weights, BatchNorm statistics and optimiser state; same step and sampler positions."""
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for index, slot in a["optimizer"]["state"].items():
        for name, value in slot.items():
            other = b["optimizer"]["state"][index][name]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), (index, name)
    assert a["data"] == b["data"]


def _paws_cmd(overrides: list[str], *flags: str) -> list[str]:
    return [sys.executable, "-m", "paws_cli", "pretrain", "--recipe", "fmnist_demo", *overrides, *flags]


def _subprocess_env() -> dict[str, str]:
    # Settings come from the command line only: a PAWS_* variable of the caller must not leak in.
    return {k: v for k, v in os.environ.items() if not k.startswith("PAWS_")}


# --- 1. kill -9 in the middle of an epoch, then --resume -------------------------------------------------------


def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(
    tiny_overrides: list[str], tmp_path: Path
) -> None:
    """A real `paws pretrain` process is SIGKILLed in the middle of its 2nd or 3rd epoch, a few steps after a
    mid-epoch checkpoint; `--resume` ends with exactly the weights of an uninterrupted run, and the logs hold
    each step once (the steps logged after the checkpoint are trained and logged again, not twice)."""
    overrides = [
        *tiny_overrides,
        "optim.epochs=3",
        "run.checkpoint_every_steps=7",
        "run.log_every=1",
        "run.num_threads=1",
    ]
    env = _subprocess_env()
    straight = subprocess.run(
        _paws_cmd([*overrides, "run.name=straight"]), capture_output=True, text=True, env=env, timeout=300
    )
    assert straight.returncode == 0, straight.stderr

    run_dir = tmp_path / "runs" / "killed"
    checkpoint, metrics = run_dir / "checkpoint.pt", run_dir / "metrics.jsonl"

    def logged_steps() -> list[int]:
        text = metrics.read_text() if metrics.is_file() else ""
        return [json.loads(line)["step"] for line in text.splitlines(keepends=True) if line.endswith("\n")]

    proc = subprocess.Popen(
        _paws_cmd([*overrides, "run.name=killed"]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        seen_inode, saved_step, deadline = None, 0, time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            logged = logged_steps()  # read before the checkpoint: its step is then at least as recent
            try:
                inode = checkpoint.stat().st_ino  # each atomic save replaces the file: a new inode
            except FileNotFoundError:
                inode = None
            if inode is not None and inode != seen_inode:
                seen_inode = inode
                saved_step = torch.load(checkpoint, map_location="cpu", weights_only=True)["step"]
            # Checkpoints at 7, 14, 16 (epoch end), 21, 28, 32 (epoch end), 35, 42: kill 2 to 4 steps after one
            # inside epoch 1 or 2 (well before the next one), so some logged steps are lost with the kill.
            if (
                saved_step > 16
                and saved_step % 16
                and logged
                and saved_step + 2 <= logged[-1] <= saved_step + 4
            ):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, (
        f"the run ended before it could be killed: {proc.stderr.read()}"
    )
    proc.stderr.close()

    kept = load_checkpoint(checkpoint)
    assert kept["epoch"] >= 1 and not kept["epoch_complete"]
    assert max(logged_steps()) > kept["step"]  # the killed run had logged steps beyond its checkpoint
    position = kept["step"] - kept["epoch"] * STEPS_PER_EPOCH
    assert 0 < position < STEPS_PER_EPOCH and kept["data"]["unlabelled"]["position"] == position

    resumed = subprocess.run(
        _paws_cmd([*overrides, "run.name=killed"], "--resume"),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    a = load_checkpoint(tmp_path / "runs" / "straight" / "checkpoint.pt")
    b = load_checkpoint(checkpoint)
    assert b["step"] == 3 * STEPS_PER_EPOCH
    _assert_same_training_state(a, b)

    # The step log holds every logged step once, with the uninterrupted run's values (timings aside).
    def steps(name: str) -> list[dict[str, Any]]:
        lines = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
        timings = ("images_per_s", "data_wait_share")
        return [{k: v for k, v in json.loads(line).items() if k not in timings} for line in lines]

    assert steps("killed") == steps("straight")
    # The interrupted epoch's summary covers all its steps (the checkpoint carried the sums so far).
    epochs = {
        name: [json.loads(x) for x in (tmp_path / "runs" / name / "epochs.jsonl").read_text().splitlines()]
        for name in ("straight", "killed")
    }
    assert [e["epoch"] for e in epochs["killed"]] == [0, 1, 2]
    for x, y in zip(epochs["straight"], epochs["killed"], strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), key
    assert not list(run_dir.glob(".*.tmp.*"))  # a write the kill interrupted leaves nothing behind


def test_mid_epoch_checkpoints_are_written_every_n_steps(
    tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """run.checkpoint_every_steps=5 saves 'latest' at steps 5, 10, 15 of a 16-step epoch (and at its end)."""
    saved: list[tuple[int, bool]] = []
    real = loop.save_checkpoint

    def recording(path: Path, state: dict[str, Any]) -> Path:
        saved.append((state["step"], state["epoch_complete"]))
        return real(path, state)

    monkeypatch.setattr(loop, "save_checkpoint", recording)
    _train([*tiny_overrides, "optim.epochs=1", "run.checkpoint_every_steps=5"])
    monkeypatch.undo()
    assert saved == [(5, False), (10, False), (15, False), (16, True)]


class _Killed(BaseException):
    """Stands for a kill right after a checkpoint write (BaseException: nothing in the toolkit catches it)."""


def test_folder_data_mid_epoch_checkpoint_resumes_exactly_despite_prefetch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JPEG-folder data with 2 DataLoader workers prefetching ahead of training: a job stopped dead right after
    its mid-epoch checkpoint at step 6 (of 8 per epoch) resumes to the weights of an uninterrupted run."""
    root = make_imagefolder(tmp_path / "imagenet", num_classes=4, per_class=8, size=(64, 48))
    base = [
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
        "optim.batch_size=4",
        "optim.epochs=2",
        "optim.warmup_epochs=0.5",
        "model.proj_hidden_dim=32",
        "model.proj_out_dim=32",
        "model.channels_last=false",
        "run.precision=fp32",
        "run.device=cpu",
        f"run.out_dir={tmp_path / 'runs'}",
        "run.progress=false",
        "run.checkpoint_every_steps=3",
    ]
    straight = _train([*base, "run.name=straight"])
    real = loop.save_checkpoint

    def save_then_die(path: Path, state: dict[str, Any]) -> Path:
        real(path, state)
        if state["step"] == 6:
            raise _Killed
        return path

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        _train([*base, "run.name=killed"])
    monkeypatch.undo()
    kept = load_checkpoint(tmp_path / "runs" / "killed" / "checkpoint.pt")
    assert kept["step"] == 6 and not kept["epoch_complete"]
    assert kept["data"]["unlabelled"]["position"] == kept["data"]["supports"]["position"] == 6
    resumed = _train([*base, "run.name=killed"], resume=True)
    assert resumed.steps == 16
    _assert_same_training_state(load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint))


# --- 2. a checkpoint write that fails never damages the previous checkpoint ------------------------------------


def _state(step: int) -> dict[str, Any]:
    return {"step": step, "model": {"w": torch.arange(5000, dtype=torch.float32) * step}}


def _failing_save(after_bytes: int, error: int) -> Any:
    """A torch.save that writes `after_bytes` of the real payload, then fails as a full disk does."""
    real = torch.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        import io

        buffer = io.BytesIO()
        real(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()[:after_bytes]
        if hasattr(f, "write"):
            f.write(data)
        else:
            Path(f).write_bytes(data)
        raise OSError(error, os.strerror(error))

    return save


@pytest.mark.parametrize(
    "fault",
    ["torch.save: ENOSPC", "torch.save: EDQUOT", "os.fsync: EIO", "os.replace: EIO"],
)
def test_failed_checkpoint_write_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _state(1))
    before = path.read_bytes()
    where, code = fault.split(": ")
    error = getattr(errno, code)
    if where == "torch.save":
        monkeypatch.setattr(torch, "save", _failing_save(1000, error))
    else:
        _module, name = where.split(".")

        def fail(*args: Any, **kwargs: Any) -> None:
            raise OSError(error, os.strerror(error))

        monkeypatch.setattr(os, name, fail)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(path, _state(2))
    monkeypatch.undo()
    message = str(info.value)
    assert (
        str(path) in message
        and os.strerror(error) in message
        and "intact" in message
        and "--resume" in message
    )
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left behind


def test_real_write_limit_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    """No mock: a child process whose file-size limit (RLIMIT_FSIZE) is below the checkpoint's size gets a real
    EFBIG from the kernel half-way through the write."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _state(1))
    before = path.read_bytes()
    script = textwrap.dedent(
        f"""
        import resource, signal, sys, torch
        from paws_cli.train.checkpoint_io import CheckpointError, save_checkpoint
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        try:
            save_checkpoint({str(path)!r}, {{"step": 2, "model": {{"w": torch.ones(100000)}}}})
        except CheckpointError as exc:
            print(exc)
            sys.exit(3)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.returncode == 3, out.stderr
    assert "too large" in out.stdout.lower() and "intact" in out.stdout
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_disk_full_during_training_stops_cleanly_and_resumes_exactly(
    tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second mid-epoch checkpoint of a run hits a full disk: the run stops with a CheckpointError, the
    first checkpoint (step 4) is intact, and --resume from it ends identical to an uninterrupted run."""
    base = [*tiny_overrides, "optim.epochs=1", "run.checkpoint_every_steps=4"]
    straight = _train([*base, "run.name=straight"])
    real, calls = torch.save, []

    def full_disk_on_second(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 2:
            return _failing_save(300, errno.ENOSPC)(obj, f, *args, **kwargs)
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_on_second)
    with pytest.raises(CheckpointError, match="No space left on device") as info:
        _train([*base, "run.name=full"])
    monkeypatch.undo()
    checkpoint = straight.run_dir.parent / "full" / "checkpoint.pt"
    assert str(checkpoint) in str(info.value)
    assert load_checkpoint(checkpoint)["step"] == 4
    resumed = _train([*base, "run.name=full"], resume=True)
    _assert_same_training_state(load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint))


def test_every_checkpoint_the_toolkit_writes_loads_weights_only(
    tiny_overrides: list[str], tmp_path: Path
) -> None:
    """pretrain (latest, mid-epoch, per-epoch), finetune (latest, best) and export --format timm all write files
    that torch.load(..., weights_only=True) reads."""
    runner = CliRunner()
    args = ["pretrain", "--recipe", "fmnist_demo", *tiny_overrides, "run.num_threads=1"]
    result = runner.invoke(app, [*args, "run.checkpoint_every=1", "run.checkpoint_every_steps=5"])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "tiny"
    result = runner.invoke(
        app, ["finetune", str(run_dir / "checkpoint.pt"), "finetune.epochs=1", "run.num_threads=1"]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app, ["export", str(run_dir / "checkpoint.pt"), str(tmp_path / "b.pth"), "--format", "timm"]
    )
    assert result.exit_code == 0, result.output
    written = [*sorted((tmp_path / "runs").rglob("*.pt")), tmp_path / "b.pth"]
    names = {p.name for p in written}
    assert {"checkpoint.pt", "checkpoint-epoch1.pt", "checkpoint-epoch2.pt", "best.pt", "b.pth"} <= names
    assert len([p for p in written if p.name == "checkpoint.pt"]) == 2  # pretrain and finetune
    for path in written:
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(state, dict) and state, path


# --- 3. non-finite losses ------------------------------------------------------------------------------------------


_REAL_LOSS = PAWSMethod.loss


class _NanAt:
    """Makes PAWSMethod.loss return a NaN loss at the given calls (= steps of a run started in this call)."""

    def __init__(self, steps: set[int]) -> None:
        self.steps, self.calls = steps, 0

    def __call__(self, method: PAWSMethod, model: torch.nn.Module, batch: Any) -> Any:
        loss, logs = _REAL_LOSS(method, model, batch)
        step, self.calls = self.calls, self.calls + 1
        return (loss * float("nan"), logs) if step in self.steps else (loss, logs)


def _inject_nan(monkeypatch: pytest.MonkeyPatch, steps: set[int]) -> _NanAt:
    nan = _NanAt(steps)
    monkeypatch.setattr(PAWSMethod, "loss", lambda self, model, batch: nan(self, model, batch))
    return nan


def test_nonfinite_loss_stops_naming_step_lr_and_kept_checkpoint(
    tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    base = [*tiny_overrides, "optim.epochs=1", "run.checkpoint_every_steps=4"]
    clean = _train([*base, "run.name=clean", "run.max_steps=8"])
    _inject_nan(monkeypatch, {10})
    with pytest.raises(NonFiniteLossError) as info:
        _train([*base, "run.name=nan"])
    message = str(info.value)
    checkpoint = clean.run_dir.parent / "nan" / "checkpoint.pt"
    settings = load_settings("fmnist_demo", base, environ={})
    schedule = StepSchedule(create_optimizer(torch.nn.Linear(2, 2), settings.optim), settings.optim, 16, 16)
    lr = schedule.set(10)
    assert lr != schedule.set(8)  # the message must name the failing step's lr, not the last logged one
    assert f"at step 10 (epoch 0, lr {lr:.4g})" in message and f"{checkpoint} (kept)" in message
    # The kept checkpoint is the last good one: exactly the state of a clean run stopped at step 8.
    _assert_same_training_state(load_checkpoint(clean.checkpoint), load_checkpoint(checkpoint))


def test_nonfinite_loss_with_no_checkpoint_yet_says_so(
    tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _inject_nan(monkeypatch, {2})
    with pytest.raises(NonFiniteLossError, match=r"at step 2 .*last good checkpoint: none yet"):
        _train(tiny_overrides)


def test_skip_nonfinite_steps_skips_without_update_and_is_bounded(
    tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With run.skip_nonfinite_steps=2, a bad step 5 changes nothing (weights, BatchNorm statistics, optimiser):
    after 6 steps the state equals a clean run's after 5. A third bad step stops the run, naming the count."""
    base = [*tiny_overrides, "optim.epochs=1"]
    clean = _train([*base, "run.name=clean", "run.max_steps=5"])
    _inject_nan(monkeypatch, {5})
    skipped = _train([*base, "run.name=skip", "run.max_steps=6", "run.skip_nonfinite_steps=2"])
    a, b = load_checkpoint(clean.checkpoint), load_checkpoint(skipped.checkpoint)
    assert b["step"] == 6 and b["nonfinite_skipped"] == 1
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for index, slot in a["optimizer"]["state"].items():
        for name, value in slot.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][index][name]))
    records = [json.loads(x) for x in (skipped.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 6 and records[-1]["skipped_nonfinite"] == 1

    _inject_nan(monkeypatch, {3, 7, 11})
    with pytest.raises(
        NonFiniteLossError, match=r"at step 11 .*after skipping 2 \(run\.skip_nonfinite_steps=2\)"
    ):
        _train([*base, "run.name=bounded", "run.skip_nonfinite_steps=2"])


def test_skip_count_survives_resume(tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The bound is over the whole run: one skip before a resume and one after exhaust skip_nonfinite_steps=1."""
    base = [*tiny_overrides, "optim.epochs=1", "run.skip_nonfinite_steps=1", "run.name=r"]
    _inject_nan(monkeypatch, {2})
    assert _train([*base, "run.max_steps=4"]).steps == 4
    _inject_nan(monkeypatch, {3})  # calls restart at 0 in the resumed run: its 4th step is step 7
    with pytest.raises(NonFiniteLossError, match=r"at step 7 .*after skipping 1"):
        _train(base, resume=True)


def test_nonfinite_loss_through_the_cli_exits_2(tiny_overrides: list[str]) -> None:
    """A real divergence (plain SGD at lr 1e30) through the command line: exit code 2 and the message."""
    result = CliRunner().invoke(
        app,
        ["pretrain", "--recipe", "fmnist_demo", *tiny_overrides, "optim.optimizer=sgd", "optim.lr=1e30"],
    )
    output = result.output + (result.stderr if result.stderr_bytes else "")
    assert result.exit_code == 2, output
    assert "the loss is nan at step" in " ".join(output.split()) and "none yet" in output


# --- 5. two runs writing to one run directory --------------------------------------------------------------------


def test_second_run_in_a_run_dir_refuses_unless_resume_or_overwrite(tiny_overrides: list[str]) -> None:
    runner = CliRunner()
    args = ["pretrain", "--recipe", "fmnist_demo", *tiny_overrides, "run.max_steps=2", "run.num_threads=1"]
    assert runner.invoke(app, args).exit_code == 0
    again = runner.invoke(app, args)
    output = again.output + (again.stderr if again.stderr_bytes else "")
    assert (
        again.exit_code == 2
        and "already holds a run" in output
        and "--resume" in output
        and "--overwrite" in output
    )
    assert runner.invoke(app, [*args, "run.max_steps=3", "--resume"]).exit_code == 0
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0


def test_a_live_run_locks_its_directory_even_against_resume_and_overwrite(
    tiny_overrides: list[str], tmp_path: Path
) -> None:
    """A second process that holds the run directory (as a running `paws pretrain` does) makes every other run
    there refuse, naming its pid; once it is SIGKILLed the lock is gone with it and the run goes ahead."""
    _train([*tiny_overrides, "run.max_steps=2"])
    run_dir = tmp_path / "runs" / "tiny"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from paws_cli.train.rundir import prepare_run_dir; "
            f"prepare_run_dir(Path({str(run_dir)!r}), resume=True, overwrite=False, lock=True); "
            "print('locked', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        for flags in ({"resume": True}, {"overwrite": True}):
            with pytest.raises(RunDirError, match=rf"in use by a running job \(pid {holder.pid} on "):
                _train([*tiny_overrides, "run.max_steps=3"], **flags)
        # fine-tuning into the same directory is refused alike (exit 2, naming the holder)
        finetune = CliRunner().invoke(
            app, ["finetune", str(run_dir / "checkpoint.pt"), "run.name=tiny", "--overwrite"]
        )
        flat = " ".join(finetune.output.split())
        assert finetune.exit_code == 2 and f"in use by a running job (pid {holder.pid} on " in flat, flat
        assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == 2  # untouched
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    assert _train([*tiny_overrides, "run.max_steps=5"], resume=True).steps == 5  # max_steps: the run's total
