"""Optimiser grouping, LARS update and the per-step schedule against independent computations."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

from paws_cli.config.schema import OptimSettings
from paws_cli.optim import StepSchedule, create_optimizer, split_decay_params


def test_exclusion_by_module_type_catches_downsample_batchnorm() -> None:
    model = timm.create_model("resnet18", num_classes=0)
    adapted, excluded = split_decay_params(model)
    excluded_ids = {id(p) for p in excluded}
    downsample_bn = model.layer2[0].downsample[1]
    assert isinstance(downsample_bn, nn.BatchNorm2d)
    assert id(downsample_bn.weight) in excluded_ids and id(downsample_bn.bias) in excluded_ids
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert id(module.weight) in excluded_ids
        if isinstance(module, nn.Conv2d):
            assert id(module.weight) not in excluded_ids
    assert len(adapted) + len(excluded) == len(list(model.parameters()))


def _reference_lars_step(w, g, buf, lr, wd, eta, momentum, adapt):
    """float64 LARS step written from the LARS paper (trust = eta |w| / (|g| + wd |w|))."""
    w, g = w.double(), g.double()
    if adapt:
        wn, gn = w.norm().item(), g.norm().item()
        trust = eta * wn / (gn + wd * wn + 1e-8) if wn > 0 and gn > 0 else 1.0
        d = (g + wd * w) * trust
    else:
        d = g
    buf = d.clone() if buf is None else momentum * buf + d
    return w - lr * buf, buf


def test_lars_update_matches_reference_and_skips_excluded_group() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    cfg = OptimSettings(
        lr=0.5, weight_decay=1e-2, momentum=0.9, trust_coefficient=0.001, epochs=1, warmup_epochs=0
    )
    opt = create_optimizer(model, cfg)
    params = dict(model.named_parameters())
    before = {k: v.detach().clone() for k, v in params.items()}
    bufs: dict[str, torch.Tensor | None] = {k: None for k in params}
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 6)).square().sum().backward()
        grads = {k: v.grad.detach().clone() for k, v in params.items()}
        opt.step()
        for k in params:
            adapt = k in ("0.weight", "2.weight")
            before[k], bufs[k] = _reference_lars_step(
                before[k], grads[k], bufs[k], 0.5, 1e-2 if adapt else 0.0, 0.001, 0.9, adapt
            )
    for k, v in params.items():
        torch.testing.assert_close(v.detach().double(), before[k], rtol=1e-5, atol=1e-7, msg=k)


def _reference_lr(step, total, warmup, start, peak, final):
    if step < warmup:
        return start + step * (peak - start) / warmup
    progress = (step - warmup) / (total - warmup - 1)
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * progress))


def test_schedule_warmup_then_cosine_to_final_at_last_step() -> None:
    cfg = OptimSettings(lr=6.4, start_lr=0.3, final_lr=0.064, epochs=10, warmup_epochs=2)
    steps_per_epoch, total = 7, 70
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = StepSchedule(opt, cfg, total, steps_per_epoch)
    values = [sched.set(s) for s in range(total)]
    for s, v in enumerate(values):
        assert v == pytest.approx(_reference_lr(s, total, 14, 0.3, 6.4, 0.064), rel=1e-9), s
    assert values[0] == pytest.approx(0.3)
    assert values[14] == pytest.approx(6.4)
    assert values[-1] == pytest.approx(0.064)
    assert all(a >= b for a, b in zip(values[14:], values[15:]))  # never climbs again (reference bug)
    # resume is stateless: setting a step out of order gives the same value
    assert sched.set(33) == pytest.approx(values[33])


def _lars_pair(nesterov: bool, trust_clip: bool) -> tuple[list[nn.Parameter], list[nn.Parameter], dict]:
    torch.manual_seed(1)
    shapes = [(4, 3), (5,), (2, 2, 3, 3), (0, 3)]  # an empty tensor: norms 0, trust ratio 1
    ours = [nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    ours.append(nn.Parameter(torch.zeros(3, dtype=torch.float64)))  # zero weights: trust ratio 1
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    kwargs = dict(
        lr=0.3, momentum=0.9, nesterov=nesterov, trust_coeff=0.02, trust_clip=trust_clip, always_adapt=True
    )
    return ours, theirs, kwargs


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("trust_clip", [False, True])
def test_fused_lars_equals_timms_lars_and_shares_its_checkpoints(nesterov: bool, trust_clip: bool) -> None:
    from timm.optim import Lars

    from paws_cli.optim import FusedLars

    ours, theirs, kwargs = _lars_pair(nesterov, trust_clip)

    def groups(ps: list[nn.Parameter]) -> list[dict]:
        return [
            {"params": ps[:3], "weight_decay": 1e-2},
            {"params": ps[3:], "weight_decay": 0.0, "always_adapt": False},
        ]

    fused, reference = FusedLars(groups(ours), **kwargs), Lars(groups(theirs), foreach=False, **kwargs)
    gen = torch.Generator().manual_seed(2)
    for step in range(5):
        for k, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            # parameter 1 has no gradient at the first step: its momentum buffer starts one step late
            grad = (
                None if (step == 0 and k == 1) else torch.randn(a.shape, generator=gen, dtype=torch.float64)
            )
            a.grad = None if grad is None else grad.clone()
            b.grad = None if grad is None else grad.clone()
        if step == 3:  # resume: each optimiser continues from the other's checkpoint
            fused_state, reference_state = fused.state_dict(), reference.state_dict()
            fused.load_state_dict(reference_state)
            reference.load_state_dict(fused_state)
        fused.step()
        reference.step()
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert fused.state[ours[1]]["momentum_buffer"] is not None


def test_fused_lars_under_a_grad_scaler_steps_on_unscaled_gradients() -> None:
    from paws_cli.optim import FusedLars

    torch.manual_seed(3)
    models = [nn.Linear(4, 3) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [
        FusedLars(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, always_adapt=True) for m in models
    ]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randn(8, 4)
    models[0](x).square().sum().backward()
    opts[0].step()
    scaler.scale(models[1](x).square().sum()).backward()
    scaler.step(opts[1])
    scaler.update()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
