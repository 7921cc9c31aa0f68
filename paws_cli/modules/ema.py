"""EMA target network helpers for SemPPL (SEMPPL-SPEC.md 5.3, 8, 12).

The target encoder and projector follow xi <- gamma_t * xi + (1 - gamma_t) * theta after every optimiser
step, with gamma_t rising from gamma_base to 1 along a half cosine.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """gamma_t = 1 - (1 - base) * (1 + cos(pi * t / T)) / 2: ``base`` at t = 0, exactly 1 at t = T."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= step <= total_steps:
        raise ValueError(f"step must be in [0, total_steps={total_steps}], got {step}")
    if not 0.0 <= base <= 1.0:
        raise ValueError(f"base momentum must be in [0, 1], got {base}")
    return 1.0 - (1.0 - base) * (1.0 + math.cos(math.pi * step / total_steps)) / 2.0


def make_target(online: nn.Module) -> nn.Module:
    """A deep copy of ``online`` with every parameter frozen (requires_grad False).

    The copy keeps the online module's train/eval mode: the spec (5.3) runs the target's BN in train mode,
    i.e. on batch statistics.
    """
    target = copy.deepcopy(online)
    target.requires_grad_(False)
    return target


def _matched(
    kind: str, target: list[tuple[str, torch.Tensor]], online: list[tuple[str, torch.Tensor]]
) -> None:
    t_names, o_names = [n for n, _ in target], [n for n, _ in online]
    if t_names != o_names:
        only_t, only_o = sorted(set(t_names) - set(o_names)), sorted(set(o_names) - set(t_names))
        raise ValueError(
            f"target and online {kind} differ: only in target {only_t[:5]}, only in online {only_o[:5]}"
            + ("" if only_t or only_o else " (same names, different order)")
        )
    for (name, t), (_, o) in zip(target, online):
        if t.shape != o.shape:
            raise ValueError(
                f"{kind[:-1]} {name!r}: target shape {tuple(t.shape)} != online {tuple(o.shape)}"
            )


@torch.no_grad()
def update_momentum(target: nn.Module, online: nn.Module, m: float) -> None:
    """xi <- m * xi + (1 - m) * theta for every parameter; buffers (BN statistics) are copied from online.

    Parameters and buffers are matched by name, so ``target`` must be a copy of ``online`` (``make_target``).
    Pass the unwrapped module (not the DDP wrapper), and only the parts that have a target (encoder and
    projector; the predictor has none).
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum m must be in [0, 1], got {m}")
    t_params, o_params = list(target.named_parameters()), list(online.named_parameters())
    _matched("parameters", t_params, o_params)
    t_bufs, o_bufs = list(target.named_buffers()), list(online.named_buffers())
    _matched("buffers", t_bufs, o_bufs)
    if t_params:
        xi = [p for _, p in t_params]
        theta = [p.detach() for _, p in o_params]
        # Two fused multi-tensor kernels instead of a Python loop of small ops over every parameter.
        torch._foreach_mul_(xi, m)
        torch._foreach_add_(xi, theta, alpha=1.0 - m)
    for (_, t), (_, o) in zip(t_bufs, o_bufs):
        t.copy_(o)
