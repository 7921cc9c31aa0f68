"""One optimisation step, shared by pretraining and fine-tuning: autocast, the loss scaler, backward and the
optimiser step."""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast for the network's forward; the losses switch it off for themselves (float32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("run.precision=fp16 needs a CUDA device; use run.precision=bf16 on the CPU")
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 on CUDA (bf16 has fp32's range and needs none); None otherwise."""
    return torch.amp.GradScaler("cuda") if precision == "fp16" and device.type == "cuda" else None


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
