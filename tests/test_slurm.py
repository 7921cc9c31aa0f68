"""SLURM launcher: SLURM -> torchrun variables, the sbatch script, submission checks, and real local jobs that
train, get preempted/timed out, requeue themselves and resume exactly."""

from __future__ import annotations

import json
import os
import pickle
import signal
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from rich.console import Console

from paws_cli.config import Settings, load_settings
from paws_cli.train.checkpoint_io import load_checkpoint
from paws_cli.train.loop import train
from paws_cli.train.rundir import RunDirError

submitit = pytest.importorskip("submitit")
cloudpickle = pytest.importorskip("cloudpickle")

from paws_cli.launch import slurm  # noqa: E402  (needs submitit, skipped above without it)

QUIET = Console(quiet=True)
# Single-threaded jobs: deterministic and kind to the shared cores.
LOCAL = ["run.launcher=slurm", "slurm.cluster=local", "slurm.gpus_per_node=0", "run.num_threads=1"]


def _settings(overrides: list[str]) -> Settings:
    return load_settings("fmnist_demo", overrides, environ={})


def _submit(overrides: list[str], job: type[slurm.SlurmPretrainJob] | None = None, **kwargs: object):
    """submit_pretrain, optionally with a SlurmPretrainJob subclass (the tests' preemption stand-in)."""
    return slurm.submit_pretrain(
        _settings(overrides), console=QUIET, default_name="run", job_class=job, **kwargs
    )


# --- SLURM's variables -> torchrun's ---


def _slurm_env(monkeypatch: pytest.MonkeyPatch, **values: str) -> object:
    for key in [k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_"))]:
        monkeypatch.delenv(key)
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    from submitit.slurm.slurm import SlurmJobEnvironment

    return SlurmJobEnvironment()


def test_torchrun_environment_for_8_nodes_of_8_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    common = {
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "64",
        "SLURM_JOB_NUM_NODES": "8",
        "SLURM_JOB_NODELIST": "gpu[003-004,010-014],cpu7",
    }
    env = slurm.torchrun_environment(
        _slurm_env(monkeypatch, **common, SLURM_PROCID="13", SLURM_LOCALID="5", SLURM_NODEID="1")
    )
    port = 20000 + zlib.crc32(b"4242") % 20000
    assert env == {
        "WORLD_SIZE": "64",
        "RANK": "13",
        "LOCAL_RANK": "5",
        "LOCAL_WORLD_SIZE": "8",
        "GROUP_RANK": "1",
        "MASTER_ADDR": "gpu003",
        "MASTER_PORT": str(port),
    }
    # Every task of the job agrees on the rendezvous without talking to the others.
    other = slurm.torchrun_environment(
        _slurm_env(monkeypatch, **common, SLURM_PROCID="63", SLURM_LOCALID="7", SLURM_NODEID="7")
    )
    assert (other["MASTER_ADDR"], other["MASTER_PORT"], other["RANK"]) == ("gpu003", str(port), "63")
    assert slurm.master_port("4243") != port


def test_torchrun_environment_single_node_and_uneven_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    env = slurm.torchrun_environment(
        _slurm_env(
            monkeypatch,
            SLURM_JOB_ID="7",
            SLURM_NTASKS="2",
            SLURM_JOB_NUM_NODES="1",
            SLURM_JOB_NODELIST="node-that-may-not-resolve",
            SLURM_PROCID="1",
            SLURM_LOCALID="1",
        )
    )
    assert (env["MASTER_ADDR"], env["WORLD_SIZE"], env["RANK"], env["LOCAL_WORLD_SIZE"]) == (
        "127.0.0.1",
        "2",
        "1",
        "2",
    )
    uneven = _slurm_env(monkeypatch, SLURM_JOB_ID="7", SLURM_NTASKS="9", SLURM_JOB_NUM_NODES="2")
    with pytest.raises(slurm.SlurmLaunchError, match="9 task"):
        slurm.torchrun_environment(uneven)


def test_global_numbers() -> None:
    lines = slurm.describe_submission(
        _settings(["slurm.nodes=8", "slurm.gpus_per_node=8", "optim.batch_size=64", "world_size=64"])
    )
    text = "\n".join(lines)
    assert "processes: 64 = 8 node(s) x 8 GPU(s)" in text
    assert "global unlabelled batch: 4096 (64 per process)" in text
    assert "warning" not in text
    s, views = _settings([]).paws, _settings([]).augment.support_views  # the recipe's K, P and V
    assert f"global support: {s.classes_per_batch * 64} classes" in text
    assert f"= {s.classes_per_batch * s.images_per_class * views * 64} per step" in text
    cpu = "\n".join(slurm.describe_submission(_settings(["slurm.nodes=2", "slurm.gpus_per_node=0"])))
    assert "processes: 2 = 2 node(s) x 1 CPU process" in cpu and "warning" in cpu


# --- submission checks and the sbatch script ---


def _fake_slurm_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sbatch/srun stand-ins on PATH: sbatch answers like SLURM does, so submitit writes its real script."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, answer in (("sbatch", "Submitted batch job 4242"), ("srun", "")):
        path = bin_dir / tool
        path.write_text(f"#!/bin/sh\necho '{answer}'\n")
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_sbatch_script_for_8_nodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_slurm_tools(tmp_path, monkeypatch)
    overrides = [
        "run.launcher=slurm",
        "slurm.nodes=8",
        "slurm.gpus_per_node=8",
        "slurm.partition=learnfair",
        "slurm.account=paws",
        "slurm.constraint=volta32gb",
        f"run.out_dir={tmp_path / 'runs'}",
        "run.name=r50",
    ]
    job = _submit(overrides)
    assert job.job_id == "4242"
    folder = tmp_path / "runs" / "r50" / "slurm"
    script = (folder / "4242_submission.sh").read_text()
    for line in (
        "--nodes=8",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--cpus-per-task=10",
        "--partition=learnfair",
        "--account=paws",
        "--constraint=volta32gb",
        "--time=4320",
        "--signal=USR2@90",
        "--job-name=paws-r50",
    ):
        assert f"#SBATCH {line}\n" in script, line
    assert "--mem" not in script  # mem_gb=0 keeps the partition default (--mem=0 would take the whole node)
    with (folder / "4242_submitted.pkl").open("rb") as fh:
        delayed = pickle.load(fh)
    assert isinstance(delayed.function, slurm.SlurmPretrainJob)
    assert delayed.function.settings["slurm"]["nodes"] == 8 and delayed.function.resume is False
    assert delayed._timeout_countdown == 20  # slurm.max_requeues -> submitit's max_num_timeout


def test_submission_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_overrides: list[str]
) -> None:
    with pytest.raises(slurm.SlurmLaunchError, match=r"slurm\.nodes=2"):
        _submit([*tiny_overrides, *LOCAL, "slurm.nodes=2"])
    run_dir = Path(_settings(tiny_overrides).run.out_dir) / "tiny"
    # The run directory policy holds before anything is queued.
    with pytest.raises(RunDirError, match="no checkpoint"):
        _submit([*tiny_overrides, *LOCAL], resume=True)
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunDirError, match="--overwrite"):
        _submit([*tiny_overrides, *LOCAL])
    assert not (run_dir / "slurm").exists()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(slurm.SlurmLaunchError, match="`sbatch` and `srun` not on PATH"):
        _submit([*tiny_overrides, "run.launcher=slurm"], overwrite=True)


def test_missing_submitit_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "submitit", None)  # what `import submitit` sees when it is not installed
    with pytest.raises(slurm.MissingExtraError, match=r"pip install 'paws-cli\[slurm\]'"):
        slurm.submit_pretrain(_settings(["run.launcher=slurm"]), console=QUIET)
    assert issubclass(slurm.MissingExtraError, ValueError)  # printed by the CLI as a one-line error


# --- what a preempted job requeues as ---


def _replace_checkpoint(path: Path, content: bytes) -> None:
    """Write like save_checkpoint does: a new file renamed over the old one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)


def _requeued(job: slurm.SlurmPretrainJob) -> slurm.SlurmPretrainJob:
    delayed = job.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    return delayed.function


def test_restarts_resume_only_from_the_runs_own_checkpoint(
    tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    settings = _settings(tiny_overrides)
    ckpt = Path(settings.run.out_dir) / "tiny" / "checkpoint.pt"

    fresh = slurm.SlurmPretrainJob(settings, resume=False, overwrite=False, default_name="run")
    assert fresh.checkpoint_path.resolve() == ckpt.resolve()
    assert fresh.run_dir_policy() == (False, False)  # the first start keeps the user's flags
    requeued = _requeued(fresh)
    assert requeued.attempt == 1 and fresh.attempt == 0 and requeued.settings == fresh.settings
    # Preempted before the first epoch ended: start again, over the interrupted start's logs.
    assert requeued.run_dir_policy() == (False, True)
    ckpt.parent.mkdir(parents=True)
    _replace_checkpoint(ckpt, b"epoch 1")
    assert requeued.run_dir_policy() == (True, False)
    # SLURM requeueing the job by itself reruns the submitted job (attempt 0): it resumes too.
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert fresh.run_dir_policy() == (True, False)

    # --overwrite over an old run: its checkpoint is never resumed, only one this run wrote.
    again = slurm.SlurmPretrainJob(settings, resume=False, overwrite=True, default_name="run")
    assert again.run_dir_policy() == (False, True) == _requeued(again).run_dir_policy()
    _replace_checkpoint(ckpt, b"new epoch 1")
    assert again.run_dir_policy() == (True, False)

    # --resume keeps resuming, new checkpoint or not.
    resumed = slurm.SlurmPretrainJob(settings, resume=True, overwrite=False, default_name="run")
    assert _requeued(resumed).run_dir_policy() == (True, False)


# --- real jobs through submitit's local executor ---


class PreemptedOnce(slurm.SlurmPretrainJob):
    """The first start trains `preempt_at` steps, then receives the cluster's USR2 preemption/time-out signal.

    Sending the signal from inside the job, right after a known step, stands in for SLURM without racing a
    clock; everything after it (submitit's handler, checkpoint(), requeue, restart) is the production path.
    """

    preempt_at = 20
    preempted = False

    def __call__(self):
        if self.preempted:
            return super().__call__()
        self.preempted = True
        full = self.settings
        self.settings = json.loads(json.dumps(full))
        self.settings["run"]["max_steps"] = self.preempt_at
        try:
            super().__call__()
        finally:
            self.settings = full
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(30)  # the handler exits the process long before this ends
        raise AssertionError("the preemption signal did not stop the job")


@pytest.fixture()
def job_class_by_value():
    """Ship this module's job subclass inside the pickle: the job's interpreter cannot import test modules."""
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    yield
    cloudpickle.unregister_pickle_by_value(module)


@pytest.fixture()
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_local_job_trains_and_checkpoints(tiny_overrides: list[str]) -> None:
    job = _submit([*tiny_overrides, *LOCAL])
    result = job.result()
    assert result.steps == 32
    state = load_checkpoint(result.checkpoint)
    assert state["step"] == 32 and state["epoch_complete"]
    assert result.checkpoint == Path(_settings(tiny_overrides).run.out_dir) / "tiny" / "checkpoint.pt"
    log = job.stdout()
    assert "Job completed successfully" in log and str(result.run_dir) in log  # rank 0's output is logged


@pytest.mark.slow
def test_two_task_job_forms_a_process_group(tiny_overrides: list[str]) -> None:
    # Two CPU tasks the way SLURM would start two GPU tasks on a node: each maps its task variables to
    # torchrun's, and the training loop joins them into one gloo group of 2 (8 steps per epoch, not 16).
    two = [*LOCAL, "slurm.gpus_per_node=2", "run.device=cpu", "run.dist_backend=gloo", "optim.epochs=1"]
    two.append("paws.classes_per_batch=2")  # K x W = 4 distinct classes, all the tiny set has
    job = _submit([*tiny_overrides, *two])
    results = job.results()
    assert [r.steps for r in results] == [8, 8]
    assert [(r.world_size, r.is_main) for r in results] == [(2, True), (2, False)]
    assert load_checkpoint(results[0].checkpoint)["step"] == 8


@pytest.mark.slow
def test_timed_out_job_requeues_and_resumes_exactly(
    tiny_overrides: list[str], job_class_by_value: None, keep_threads: None
) -> None:
    # time_min=10 makes submitit count the signal as a time-out (the last 10 minutes of the limit), so the
    # requeue also spends one of slurm.max_requeues.
    overrides = [*tiny_overrides, *LOCAL, "slurm.time_min=10", "slurm.max_requeues=1"]
    job = _submit(overrides, job=PreemptedOnce)
    result = job.result()
    log = job.stdout()
    assert "this job is timed-out" in log and "(0 remaining timeouts)" in log
    assert "restarted job: resuming from" in log
    assert result.steps == 32

    # The step counter continued across the requeue: one log line per 4 steps, none repeated or skipped.
    run_dir = result.run_dir
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(4, 33, 4))

    # The requeued start continued the epoch the first one stopped in (a restart would have reset the logs).
    epochs = [json.loads(line) for line in (run_dir / "epochs.jsonl").read_text().splitlines()]
    assert [(e["epoch"], e["step"], e["complete"]) for e in epochs] == [
        (0, 16, True),
        (1, 20, False),
        (1, 32, True),
    ]

    # Bit-identical to the same run trained in one go by `paws pretrain` without a launcher.
    straight = train(
        _settings([*tiny_overrides, "run.name=straight", "run.num_threads=1"]),
        console=QUIET,
        default_name="x",
    )
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(result.checkpoint)
    assert a["step"] == b["step"] == 32
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


@pytest.mark.slow
def test_job_out_of_requeues_stops_with_its_checkpoint(
    tiny_overrides: list[str], job_class_by_value: None
) -> None:
    class PreemptedEarly(PreemptedOnce):
        preempt_at = 3

    job = _submit([*tiny_overrides, *LOCAL, "slurm.time_min=10", "slurm.max_requeues=0"], job=PreemptedEarly)
    with pytest.raises(submitit.core.utils.FailedJobError, match="timed-out too many times"):
        job.result()
    state = load_checkpoint(Path(_settings(tiny_overrides).run.out_dir) / "tiny" / "checkpoint.pt")
    assert state["step"] == 3  # the next `paws pretrain --resume` continues from here
