"""One optimisation step, shared by pretraining and fine-tuning: autocast, the loss scaler, backward and the
optimiser step."""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Literal

import torch

Precision = Literal["fp32", "bf16", "fp16"]


@functools.cache
def cpu_has_bf16_kernels() -> bool:
    """Whether oneDNN has bfloat16 kernels for this CPU (AVX512 or AMX). Without them (AVX2 CPUs such as AMD
    Zen 3) CPU autocast to bf16 runs reference code, measured about 100x slower per matmul and 10x per
    convolution than fp32 on a Zen 3 (benchmarks/step.py)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN: no fast bf16 either
        return False


@functools.cache
def _cuda_has_bf16() -> bool:
    # asked once per process: autocast_for resolves the precision at every step
    return torch.cuda.is_bf16_supported()


def resolve_precision(device: torch.device, precision: str) -> Precision:
    """The precision a run uses: ``auto`` is bf16 on CUDA GPUs that support it (fp16 on older ones) and on CPUs
    with bf16 kernels, fp32 on other CPUs; any other value is itself."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if _cuda_has_bf16() else "fp16"
        return "bf16" if cpu_has_bf16_kernels() else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"run.precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    return precision  # type: ignore[return-value]


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast for the network's forward; the losses switch it off for themselves (float32)."""
    precision = resolve_precision(device, precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("run.precision=fp16 needs a CUDA device; use run.precision=bf16 or auto on the CPU")
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 on CUDA (bf16 has fp32's range and needs none); None otherwise."""
    fp16 = resolve_precision(device, precision) == "fp16"
    return torch.amp.GradScaler("cuda") if fp16 and device.type == "cuda" else None


def backward_and_step(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None
) -> None:
    """Gradients of `loss` and one optimiser step; with a scaler the gradients are unscaled before the step
    (LARS reads their norms) and steps with inf/NaN gradients are skipped while the scale shrinks."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
        return
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
