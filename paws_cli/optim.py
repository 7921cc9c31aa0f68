"""Optimiser and per-step learning-rate schedule, shared by every method.

LARS (its definition, groups and state; stepped by torch's fused SGD kernel) and the warm-up + cosine
schedule come from timm. What is ours is the parameter grouping: biases and
*every* normalisation parameter are excluded from weight decay and LARS adaptation by module type (the reference
matched parameter names and missed the downsample BatchNorm weights).
"""

from __future__ import annotations

import math

import torch
from timm.optim import Lars
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.optim.sgd import sgd as fused_sgd  # torch's functional SGD; called with fused=True

from paws_cli.config.schema import OptimSettings

NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
)


def split_decay_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(adapted, excluded): excluded holds biases and all parameters of normalisation modules."""
    adapted: list[nn.Parameter] = []
    excluded: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            is_norm = isinstance(module, NORM_LAYERS) or type(module).__name__.lower().endswith("norm2d")
            (excluded if is_norm or name == "bias" or param.ndim <= 1 else adapted).append(param)
    return adapted, excluded


class FusedLars(Lars):
    """timm's LARS (same arguments, parameter groups, state and arithmetic) stepped by torch's fused SGD kernel.

    Why not timm's step: its multi-tensor path makes about eight passes over the parameters per step and
    allocates two temporary copies of the gradients. Here the layer-wise trust ratio (and weight decay) is
    folded into the gradients in place, then torch's fused SGD kernel does momentum, Nesterov and the update in
    one pass. At ResNet-50 scale (31M parameters) on the CPU: 172 ms -> 24 ms per step (benchmarks/step.py
    shows the effect on a whole step). The step consumes the gradients (they hold the adapted update after it);
    the training loop clears them before the next backward anyway. Checkpoints are interchangeable with timm's.
    """

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201  (torch's Optimizer.step signature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if any(g.is_sparse for g in grads):
                raise RuntimeError("LARS does not support sparse gradients")
            weight_decay = group["weight_decay"]
            if weight_decay != 0 or group["always_adapt"]:
                w_norm = torch.stack(torch._foreach_norm(params))
                g_norm = torch.stack(torch._foreach_norm(grads))
                trust = group["trust_coeff"] * w_norm / (g_norm + w_norm * weight_decay + group["eps"])
                # timm's rule: a ratio of 1 (plain SGD) where the weight or the gradient norm is 0
                trust = torch.where((w_norm > 0) & (g_norm > 0), trust, torch.ones_like(trust))
                if group["trust_clip"]:
                    trust = torch.clamp(trust / group["lr"], max=1.0)
                if weight_decay != 0:
                    torch._foreach_add_(grads, params, alpha=weight_decay)
                torch._foreach_mul_(grads, list(trust.unbind(0)))
            state = [self.state[p] for p in params]
            # The fused kernel starts buffers (buf = grad) only when every buffer of its call is new, so
            # parameters met for the first time go in a call of their own.
            new = [i for i, st in enumerate(state) if "momentum_buffer" not in st]
            old = [i for i, st in enumerate(state) if "momentum_buffer" in st]
            for chosen in (new, old):
                if not chosen:
                    continue
                buffers = [state[i].get("momentum_buffer") for i in chosen]
                fused_sgd(
                    [params[i] for i in chosen],
                    [grads[i] for i in chosen],
                    buffers,
                    fused=True,
                    weight_decay=0.0,
                    momentum=group["momentum"],
                    lr=group["lr"],
                    dampening=group["dampening"],
                    nesterov=group["nesterov"],
                    maximize=False,
                )
                if group["momentum"] != 0:
                    for i, buf in zip(chosen, buffers, strict=True):
                        state[i]["momentum_buffer"] = buf
        return loss


def create_optimizer(model: nn.Module, cfg: OptimSettings) -> torch.optim.Optimizer:
    """LARS (timm) or SGD over two groups; the learning rate is set per step by the schedule."""
    adapted, excluded = split_decay_params(model)
    if cfg.optimizer == "lars":
        # always_adapt keeps LARS on for the main group even with weight_decay=0; the excluded group has
        # weight_decay 0 and always_adapt False, which timm's Lars treats as plain SGD with momentum.
        groups = [
            {"params": adapted, "weight_decay": cfg.weight_decay, "always_adapt": True},
            {"params": excluded, "weight_decay": 0.0, "always_adapt": False},
        ]
        return FusedLars(
            groups,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            trust_coeff=cfg.trust_coefficient,
        )
    groups = [
        {"params": adapted, "weight_decay": cfg.weight_decay},
        {"params": excluded, "weight_decay": 0.0},
    ]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def schedule_lengths(cfg: OptimSettings, steps_per_epoch: int) -> tuple[int, int]:
    """(total, warm-up) steps of a run: as given in steps (optim.total_steps, optim.warmup_steps), or epochs x
    steps per epoch, rounded. A warm-up that is not shorter than training is an error naming the settings."""
    if cfg.total_steps is not None:
        total, total_text = cfg.total_steps, f"optim.total_steps={cfg.total_steps}"
    else:
        assert cfg.epochs is not None  # the settings validator gives one of the two
        total = max(round(cfg.epochs * steps_per_epoch), 1)
        total_text = f"optim.epochs={cfg.epochs:g}, {total} steps of {steps_per_epoch} per epoch"
    if cfg.warmup_steps is not None:
        warmup, warmup_text = cfg.warmup_steps, f"optim.warmup_steps={cfg.warmup_steps}"
    else:
        assert cfg.warmup_epochs is not None
        warmup = round(cfg.warmup_epochs * steps_per_epoch)
        warmup_text = (
            f"optim.warmup_epochs={cfg.warmup_epochs:g}, {warmup} steps of {steps_per_epoch} per epoch"
        )
    if warmup > 0 and warmup >= total:
        fix = "optim.warmup_steps" if cfg.warmup_steps is not None else "optim.warmup_epochs"
        raise ValueError(
            f"the warm-up ({warmup_text}) is not shorter than training ({total_text}); lower {fix} "
            f"(e.g. optim.warmup_steps={max(total // 10, 0)}) or lengthen training"
        )
    return total, warmup


class StepSchedule:
    """Linear warm-up from start_lr to lr, then cosine to final_lr reached exactly at the last step.

    Wraps timm's CosineLRScheduler, stepped per update; `set(step)` is all resume needs (no hidden state).
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, cfg: OptimSettings, total_steps: int, steps_per_epoch: int
    ):
        self.total_steps = total_steps
        warmup = (
            cfg.warmup_steps
            if cfg.warmup_steps is not None
            else round((cfg.warmup_epochs or 0) * steps_per_epoch)
        )
        self.warmup_steps = min(warmup, max(total_steps - 1, 0))
        self.optimizer = optimizer
        for group in optimizer.param_groups:  # timm takes the peak from the groups' initial_lr
            group["lr"] = group["initial_lr"] = cfg.lr
        self._timm = CosineLRScheduler(
            optimizer,
            # the cosine spans the remaining steps so that its end value lands on the last step (total - 1)
            t_initial=max(total_steps - self.warmup_steps - 1, 1),
            lr_min=cfg.final_lr,
            warmup_t=self.warmup_steps,
            warmup_lr_init=cfg.start_lr,
            warmup_prefix=True,
            cycle_limit=1,
            t_in_epochs=False,
        )

    def set(self, step: int) -> float:
        """Set the learning rate of every group for `step` (0-based) and return it."""
        self._timm.step_update(step)
        return float(self.optimizer.param_groups[0]["lr"])

    def set_progress(self, fraction: float) -> float:
        """Set the learning rate for a fraction of training done (time-budgeted runs)."""
        return self.set(min(math.floor(fraction * self.total_steps), self.total_steps - 1))
