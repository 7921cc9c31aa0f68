"""Multi-process set-up: the process group (torchrun, SLURM or a test's own), the device, the model wrapping.

One process per GPU (or several CPU processes with gloo). `init_distributed` reads torchrun's environment
(WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); without it, or with WORLD_SIZE=1, the run is a
single process and nothing here creates a process group. `wrap_model` adds SyncBatchNorm, DDP and
torch.compile as the settings ask. The collectives with the right gradients for the PAWS loss live in
`paws_cli.collectives`.
"""

from __future__ import annotations

import atexit
import inspect
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from paws_cli.config.schema import ModelSettings, RunSettings

__all__ = [
    "DistContext",
    "barrier",
    "compile_backbone",
    "init_distributed",
    "main_first",
    "resolve_device",
    "shutdown",
    "sync_batchnorm",
    "sync_batchnorm_supported",
    "wrap_model",
]

T = TypeVar("T")


@dataclass
class DistContext:
    """Where this process stands: world size, global rank, rank on its node, and its device."""

    world_size: int
    rank: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, logs and the progress bar."""
        return self.rank == 0

    def describe(self) -> str:
        """One line for the start of a run, e.g. '8 processes, nccl, cuda:0..7'."""
        if self.world_size == 1:
            return f"1 process on {self.device}"
        backend = dist.get_backend() if dist.is_initialized() else "no process group"
        return f"{self.world_size} processes ({backend}), rank {self.rank} on {self.device}"


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> CUDA when available, else CPU; CUDA devices are picked by the process's local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("run.device=cuda but no CUDA device is available; use run.device=cpu or auto")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(
                f"LOCAL_RANK={local_rank} but this node has only {count} CUDA device(s); start at most "
                f"{count} processes per node (torchrun --nproc_per_node)"
            )
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ValueError(f"run.device must be auto, cpu or cuda, got {name!r}")
    return torch.device("cpu")


def _env_int(name: str, default: int | None) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        if default is None:
            raise ValueError(
                f"WORLD_SIZE is set but the environment variable {name} is not; start the run with torchrun "
                "(torchrun --nproc_per_node N -m paws_cli pretrain ...) or set all of WORLD_SIZE, RANK, "
                "LOCAL_RANK, MASTER_ADDR and MASTER_PORT"
            )
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer") from None
    if value < 0:
        raise ValueError(f"environment variable {name}={value} must be >= 0")
    return value


def _backend_for(run: RunSettings, device: torch.device) -> str:
    backend = run.dist_backend
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(
            f"run.dist_backend=nccl needs CUDA devices but this run trains on {device}; use "
            "run.dist_backend=gloo (or auto) for CPU processes"
        )
    return backend


def init_distributed(run: RunSettings) -> DistContext:
    """Join (or create) the process group and pick this process's device; idempotent.

    - A process group that is already up (a second `train()` in the same process, a test, a launcher that
      initialised it) is used as it is.
    - Otherwise WORLD_SIZE absent or 1 means a single process: no process group.
    - Otherwise the group is created from torchrun's environment (env:// rendezvous), with the backend of
      run.dist_backend (auto: NCCL on CUDA, gloo on the CPU), and the CUDA device is cuda:LOCAL_RANK.
    """
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        local_rank = _env_int("LOCAL_RANK", rank)
        device = resolve_device(run.device, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return DistContext(world, rank, local_rank, device)
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistContext(1, 0, 0, resolve_device(run.device))
    rank, local_rank = _env_int("RANK", None), _env_int("LOCAL_RANK", None)
    if rank >= world:
        raise ValueError(f"RANK={rank} must be smaller than WORLD_SIZE={world}")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise ValueError(
                f"WORLD_SIZE={world} but {name} is not set; start the run with torchrun, which sets it"
            )
    if not dist.is_available():
        raise ValueError("this torch build has no torch.distributed; run a single process (WORLD_SIZE=1)")
    device = resolve_device(run.device, local_rank)
    backend = _backend_for(run, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # device_id binds NCCL to this GPU up front (no guessing in barrier(), faster first collective).
    dist.init_process_group(
        backend,
        init_method="env://",
        world_size=world,
        rank=rank,
        device_id=device if backend == "nccl" else None,
    )
    # A process that leaves without destroying its group gets a warning (and NCCL may hang at exit).
    atexit.register(shutdown)
    return DistContext(world, rank, local_rank, device)


def barrier() -> None:
    """Wait for every process; a no-op in a single process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    """Destroy the process group if there is one; safe to call twice."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main_first(ctx: DistContext, on_main: Callable[[], T], on_others: Callable[[], T] | None = None) -> T:
    """Run `on_main` on rank 0, then `on_others` (default: the same) on the other ranks once it succeeded.

    For work that must happen once before the others may start (converting a dataset into the cache,
    creating the run directory). If rank 0 fails, the other ranks raise too instead of waiting forever.
    """
    if ctx.world_size == 1:
        return on_main()
    result: T | None = None
    error: BaseException | None = None
    if ctx.is_main:
        try:
            result = on_main()
        except Exception as exc:  # re-raised below, after the other ranks have been told
            error = exc
    message = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0] is not None:
        raise RuntimeError(f"rank 0 failed while preparing the run, so rank {ctx.rank} stops: {message[0]}")
    if ctx.is_main:
        return result  # type: ignore[return-value]
    return (on_others or on_main)()


def sync_batchnorm_supported(device: torch.device) -> bool:
    """torch's SyncBatchNorm only synchronises on GPU-like devices; on the CPU its training forward raises."""
    return device.type != "cpu"


def compile_backbone(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """torch.compile the backbone inside `model` in place (state_dict keys stay the same); compiles lazily.

    `nn.Module.compile` is used rather than `torch.compile(module)`, whose wrapper would prefix every
    checkpoint key with `_orig_mod.`. dynamic=False: each resolution group (supports + large views, small
    views) has one fixed shape per run, so two static graphs beat one dynamic-shape graph. `backend` is
    torch.compile's (tests use "aot_eager": the same graph capture without code generation).
    """
    inner = getattr(model, "module", model)
    encoder = getattr(inner, "encoder", inner)
    backbone = getattr(encoder, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise ValueError(
            f"model.compile=true but {type(inner).__name__} has no .encoder.backbone to compile; "
            "set model.compile=false"
        )
    backbone.compile(dynamic=False, backend=backend)
    return model


def sync_batchnorm(model: nn.Module, ctx: DistContext, model_settings: ModelSettings) -> nn.Module:
    """Every BatchNorm made a SyncBatchNorm when several processes train on GPUs (model.sync_batchnorm).

    The parameters and buffers are moved over as they are (same objects, same state_dict keys). On the CPU the
    model is returned unchanged, with a warning from rank 0.
    """
    if ctx.world_size == 1 or not model_settings.sync_batchnorm:
        return model
    if sync_batchnorm_supported(ctx.device):
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if ctx.is_main:
        # torch's SyncBatchNorm has no CPU kernels (batch_norm_stats is CUDA-only) and raises in training mode
        # on the CPU, so CPU processes keep per-process BatchNorm statistics.
        warnings.warn(
            "model.sync_batchnorm=true but the processes train on the CPU, where torch's SyncBatchNorm does "
            "not run: BatchNorm statistics stay per process (the gradients are still averaged). Results "
            "match a single process only on GPUs.",
            stacklevel=2,
        )
    return model


def wrap_model(model: nn.Module, ctx: DistContext, model_settings: ModelSettings) -> nn.Module:
    """SyncBatchNorm (several processes, model.sync_batchnorm), optional torch.compile, then DDP (several).

    The model must already be on ctx.device. Parameters stay the same objects (SyncBatchNorm reuses them), so
    an optimiser may be built before or after; state_dict keys are unchanged, so checkpoints load anywhere.
    """
    model = sync_batchnorm(model, ctx, model_settings)
    if model_settings.compile:
        compile_backbone(model)
    if ctx.world_size == 1:
        return model
    # find_unused_parameters=False: every parameter gets a gradient in every step (backbone and both heads
    # feed the loss; a disabled head is absent, not unused), so the extra graph traversal would be waste.
    # No buffer broadcast at each forward: with SyncBatchNorm every process computes the same running
    # statistics; without it they are only read at evaluation, which loads rank 0's checkpoint. Broadcasting
    # them at every forward would be a collective per step for nothing.
    # One DDP forward per step: the method calls the wrapped model once with all views, and the encoder runs
    # its resolution groups inside that call, so a parameter used by both groups gets its two gradients summed
    # by autograd before DDP's hook fires once; no static_graph or no_sync tricks are needed.
    # (Newer torch calls the per-forward broadcast forward_sync_buffers; buffers are still synced at start.)
    buffers = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        else {"broadcast_buffers": False}
    )
    return DistributedDataParallel(
        model,
        device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
        find_unused_parameters=False,
        **buffers,
    )
