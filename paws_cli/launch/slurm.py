"""Submit `paws pretrain` to SLURM through submitit (the optional extra `paws-cli[slurm]`).

The job runs one task per GPU. Each task turns SLURM's variables into torchrun's (WORLD_SIZE, RANK, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) and calls the ordinary training loop, so a SLURM job trains exactly as
`torchrun --nnodes N --nproc-per-node G` would. On preemption or time-out submitit calls the job's
`checkpoint()` on rank 0, which returns a copy of the job set to resume from the run directory's
checkpoint.pt (written every epoch), and requeues it; no user action is needed.
"""

from __future__ import annotations

import copy
import os
import shutil
import zlib
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from rich.console import Console

from paws_cli.config import Settings
from paws_cli.config.schema import SlurmSettings
from paws_cli.methods.sizes import global_sizes
from paws_cli.train.rundir import CHECKPOINT, prepare_run_dir, run_dir_of

if TYPE_CHECKING:
    from paws_cli.train.loop import TrainResult

try:  # the optional extra; every entry point calls require_submitit() first, which explains a missing install
    from submitit.helpers import Checkpointable
except ImportError:  # pragma: no cover - only without the extra, where no job object can be built anyway
    Checkpointable = object  # type: ignore[assignment,misc]

INSTALL_HINT = "pip install 'paws-cli[slurm]'"


class SlurmLaunchError(ValueError):
    """The submission cannot be made as configured; the message names the setting and the fix."""


class MissingExtraError(ImportError, ValueError):
    """submitit is not installed (a ValueError too, so the CLI prints it as a one-line user error)."""


def require_submitit() -> ModuleType:
    """Import submitit, or raise MissingExtraError saying how to install it."""
    try:
        import submitit
    except ImportError as exc:
        raise MissingExtraError(
            f"run.launcher=slurm needs the optional dependency submitit, which is not installed: run "
            f"`{INSTALL_HINT}`, or train in this process with run.launcher=local"
        ) from exc
    return submitit


def processes_per_node(slurm: SlurmSettings) -> int:
    """One task per GPU; gpus_per_node=0 means one CPU process per node."""
    return max(slurm.gpus_per_node, 1)


def process_count(slurm: SlurmSettings) -> int:
    return slurm.nodes * processes_per_node(slurm)


def master_port(job_id: str) -> int:
    """A rendezvous port in [20000, 40000) that every task of a job derives alike from the job id.

    Deriving it (rather than picking a free one) needs no communication between nodes, and differs between
    jobs sharing a node; a requeued job keeps its id and so its port, which its dead predecessor released.
    """
    return 20000 + zlib.crc32(job_id.encode()) % 20000


def torchrun_environment(job_env: Any) -> dict[str, str]:
    """torchrun's environment variables for this task, from a submitit JobEnvironment (SLURM or local).

    SLURM_PROCID -> RANK, SLURM_NTASKS -> WORLD_SIZE, SLURM_LOCALID -> LOCAL_RANK, SLURM_NODEID -> GROUP_RANK;
    MASTER_ADDR is the first host of SLURM_JOB_NODELIST (loopback on a single node, where the hostname may
    not resolve).
    """
    nodes, tasks = int(job_env.num_nodes), int(job_env.num_tasks)
    if nodes < 1 or tasks % nodes:
        raise SlurmLaunchError(
            f"the job has {tasks} task(s) on {nodes} node(s); PAWS needs the same number of tasks on every node "
            "(tasks_per_node = slurm.gpus_per_node)"
        )
    return {
        "WORLD_SIZE": str(tasks),
        "RANK": str(job_env.global_rank),
        "LOCAL_RANK": str(job_env.local_rank),
        "LOCAL_WORLD_SIZE": str(tasks // nodes),
        "GROUP_RANK": str(job_env.node),
        "MASTER_ADDR": job_env.hostnames[0] if nodes > 1 else "127.0.0.1",
        "MASTER_PORT": str(master_port(str(job_env.job_id))),
    }


def describe_submission(settings: Settings) -> list[str]:
    """The resolved global numbers to check before the job spends GPU-hours (sizes in settings are per process)."""
    slurm, optim = settings.slurm, settings.optim
    world = process_count(slurm)
    sizes = global_sizes(settings, world)
    per_node = f"{slurm.gpus_per_node} GPU(s)" if slurm.gpus_per_node else "1 CPU process"
    lines = [
        f"processes: {world} = {slurm.nodes} node(s) x {per_node}"
        + (f" (recipe written for {settings.world_size})" if world != settings.world_size else ""),
        f"global unlabelled batch: {sizes.batch} ({optim.batch_size} per process)",
        *([sizes.support_line()] if sizes.support is not None else []),
        f"lr: {optim.lr} peak (absolute, for the global batch above); {optim.length_text()}",
    ]
    if world != settings.world_size:
        lines.append(
            f"warning: {world} processes but the recipe was written for {settings.world_size}; the global "
            "batch, support and learning rate differ from the recipe's"
        )
    return lines


def _checkpoint_stamp(path: Path) -> tuple[int, int, int] | None:
    """Identity of the checkpoint file: atomic rewrites change its inode and mtime, so a new save is visible."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class SlurmPretrainJob(Checkpointable):
    """One `paws pretrain` run as a picklable submitit job; every task of the job calls it.

    Holds the settings as plain data and the user's --resume/--overwrite. A start that is a restart (requeued
    by `checkpoint()`, or by SLURM itself: SLURM_RESTART_COUNT > 0) resumes from checkpoint.pt when this run
    wrote one, and otherwise starts again from scratch; see `run_dir_policy`.
    """

    def __init__(self, settings: Settings, *, resume: bool, overwrite: bool, default_name: str) -> None:
        self.settings: dict[str, Any] = settings.model_dump(mode="json")
        self.resume = resume
        self.overwrite = overwrite
        self.default_name = default_name
        # Jobs start in the submission directory under sbatch and the local executor alike; chdir anyway so
        # relative paths in the settings (run.out_dir, data.path) mean what they meant at submission.
        self.workdir = os.getcwd()
        self.attempt = 0
        # The checkpoint as it was at submission: one that is still this file afterwards is not this run's
        # (a run started with --overwrite over an old one) and is never resumed.
        self._submitted_stamp = _checkpoint_stamp(self.checkpoint_path)

    @property
    def checkpoint_path(self) -> Path:
        run_dir = run_dir_of(Settings.model_validate(self.settings), self.default_name)
        return Path(self.workdir) / run_dir / CHECKPOINT

    def run_dir_policy(self) -> tuple[bool, bool]:
        """(resume, overwrite) for this start: the user's flags at first, then whatever a restart needs.

        Every task decides alike before training starts: nothing writes the checkpoint until all have joined.
        """
        restarted = self.attempt > 0 or int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
        if not restarted:
            return self.resume, self.overwrite
        stamp = _checkpoint_stamp(self.checkpoint_path)
        resume = stamp is not None and (self.resume or stamp != self._submitted_stamp)
        # Without a checkpoint of its own the run starts again, over the logs of the interrupted start.
        return resume, not resume

    def __call__(self) -> TrainResult:
        """Set up torchrun's environment from SLURM's and train (resuming when the policy says so)."""
        submitit = require_submitit()
        os.chdir(self.workdir)
        os.environ.update(torchrun_environment(submitit.JobEnvironment()))
        resume, overwrite = self.run_dir_policy()
        if resume != self.resume or overwrite != self.overwrite:
            action = (
                f"resuming from {self.checkpoint_path}" if resume else "no checkpoint of this run, restarting"
            )
            print(f"restarted job: {action}", flush=True)

        from paws_cli.train.loop import train  # torch is loaded only inside the job

        return train(
            Settings.model_validate(self.settings),
            resume=resume,
            overwrite=overwrite,
            default_name=self.default_name,
        )

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit on rank 0 at preemption/time-out: the job to requeue (a DelayedSubmission).

        The training loop saves checkpoint.pt every epoch, so nothing is saved here; the requeued copy only
        counts the restart, and `run_dir_policy` resumes it from the latest checkpoint when it starts.
        """
        submitit = require_submitit()
        requeued = copy.copy(self)
        requeued.attempt = self.attempt + 1
        return submitit.helpers.DelayedSubmission(requeued, *args, **kwargs)


def _check_settings(settings: Settings) -> None:
    slurm = settings.slurm
    if slurm.cluster == "local" and slurm.nodes > 1:
        raise SlurmLaunchError(
            f"slurm.cluster=local runs on this machine only, but slurm.nodes={slurm.nodes}; set slurm.nodes=1 "
            "or slurm.cluster=slurm"
        )
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if slurm.cluster == "slurm" and missing:
        raise SlurmLaunchError(
            f"slurm.cluster=slurm but {' and '.join(f'`{t}`' for t in missing)} not on PATH: submit from a SLURM "
            "login node, or set slurm.cluster=local to run the same job on this machine"
        )


def build_executor(settings: Settings, folder: Path, job_name: str) -> Any:
    """A submitit AutoExecutor for slurm.cluster with every slurm.* setting applied (nothing is submitted)."""
    submitit = require_submitit()
    slurm = settings.slurm
    executor = submitit.AutoExecutor(
        folder=folder,
        cluster=slurm.cluster,
        slurm_max_num_timeout=slurm.max_requeues,
        local_max_num_timeout=slurm.max_requeues,
    )
    executor.update_parameters(
        name=job_name,
        nodes=slurm.nodes,
        tasks_per_node=processes_per_node(slurm),
        # None leaves a value unset: --gpus-per-node=0 is rejected by some SLURM versions and --mem=0 means
        # "all of the node's memory", neither of which the defaults 0 are meant to say.
        gpus_per_node=slurm.gpus_per_node or None,
        cpus_per_task=slurm.cpus_per_task,
        mem_gb=slurm.mem_gb or None,
        timeout_min=slurm.time_min,
        slurm_partition=slurm.partition,
        slurm_account=slurm.account,
        slurm_qos=slurm.qos,
        slurm_constraint=slurm.constraint,
    )
    return executor


def submit_pretrain(
    settings: Settings,
    *,
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    default_name: str = "run",
    job_class: type[SlurmPretrainJob] | None = None,
) -> Any:
    """Submit pretraining as a SLURM (or local submitit) job; return the submitit job (result(): rank 0's).

    The run directory policy is checked now, before queueing: an existing run is refused unless `resume` or
    `overwrite` is given, and `resume` needs its checkpoint. `job_class` swaps in a SlurmPretrainJob subclass.
    """
    require_submitit()
    console = console or Console()
    _check_settings(settings)
    run_dir = prepare_run_dir(run_dir_of(settings, default_name), resume=resume, overwrite=overwrite)
    folder = Path(settings.slurm.folder) if settings.slurm.folder else run_dir / "slurm"
    folder = folder.resolve()
    name = settings.run.name or default_name
    executor = build_executor(settings, folder, f"paws-{name}")
    job = executor.submit(
        (job_class or SlurmPretrainJob)(settings, resume=resume, overwrite=overwrite, default_name=name)
    )

    where = "SLURM" if settings.slurm.cluster == "slurm" else "local submitit"
    console.print(f"[bold]submitted {where} job {job.job_id}[/] -> {run_dir}")
    console.print(f"  logs: {folder} ({job.job_id}_0_log.out is rank 0)")
    for line in describe_submission(settings):
        console.print(f"  {line}")
    console.print(
        f"  requeued on preemption and up to {settings.slurm.max_requeues} time-out(s) of "
        f"{settings.slurm.time_min} min; each start resumes from {run_dir / CHECKPOINT}"
    )
    return job
