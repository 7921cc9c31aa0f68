"""The training loop's speed switches, each on the CPU: bf16 autocast (the loss stays float32), the fp16 grad
scaler's step, channels_last, torch.compile of the backbone, and the resolution-grouped forward under them."""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from timm.optim import Lars
from torch import nn

from paws_cli.config import load_settings
from paws_cli.data.sampling.batch import Batch
from paws_cli.losses import paws_loss, support_label_matrix
from paws_cli.methods import create_method
from paws_cli.train import step as train_step
from paws_cli.train.banner import describe_compute, slow_bf16_warning
from paws_cli.train.loop import train
from paws_cli.train.process_group import DistContext, compile_backbone, wrap_model
from paws_cli.train.step import autocast_for, backward_and_step, make_grad_scaler, resolve_precision

CPU = torch.device("cpu")
B, M, K, P = 4, 2, 4, 2  # unlabelled images, small views, support classes x images


def _method(*extra: str) -> Any:
    base = [
        "model.backbone=cnn_w16",
        "model.proj_hidden_dim=32",
        "model.proj_out_dim=16",
        "model.proj_layers=2",
    ]
    settings = load_settings("fmnist_demo", [*base, "model.pred_hidden_dim=8", *extra], environ={})
    return create_method(settings, in_chans=1, num_classes=K)


def _model(method: Any) -> nn.Module:
    torch.manual_seed(0)
    return method.build_model()


def _batch(seed: int = 3) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    views = [torch.randn(B, 1, 8, 8, generator=gen) for _ in range(2)]
    views += [torch.randn(B, 1, 4, 4, generator=gen) for _ in range(M)]
    supports = [torch.randn(K * P, 1, 8, 8, generator=gen)]
    return Batch(views, supports, torch.arange(K).repeat(P))


def _loss_and_grad(
    method: Any, model: nn.Module, batch: Batch, precision: str = "fp32"
) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with autocast_for(CPU, precision):
        loss, _ = method.loss(model, batch)
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten().double() for p in model.parameters()])


def _network_grad(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(h and z, parameter gradients) of the network alone, with fixed output gradients.

    Layout switches change only the network; comparing here keeps the loss's sharpening (T=0.25, tau=0.1),
    which magnifies float32 rounding of a random network many times, out of the comparison.
    """
    model.zero_grad(set_to_none=True)
    h, z = model(batch.supports + batch.views)
    gen = torch.Generator().manual_seed(11)
    grad_h, grad_z = torch.randn(h.shape, generator=gen), torch.randn(z.shape, generator=gen)
    torch.autograd.backward([h, z], [grad_h, grad_z])
    outputs = torch.cat([h.detach().flatten(), z.detach().flatten()])
    return outputs, torch.cat([p.grad.flatten() for p in model.parameters()])


def _assert_same_network(a: nn.Module, b: nn.Module) -> None:
    batch = _batch()
    out_a, grad_a = _network_grad(a, batch)
    out_b, grad_b = _network_grad(b, batch)
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=2e-5 * out_a.abs().max().item())
    # other kernels sum in another order (measured: ~2e-6 of the largest entry); allowed 2e-5
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-4, atol=2e-5 * grad_a.abs().max().item())


def test_bf16_autocast_runs_the_network_in_bf16_and_the_loss_in_fp32() -> None:
    method = _method()
    model, batch = _model(method), _batch()
    with autocast_for(CPU, "bf16"):
        h, z = model(batch.supports + batch.views)
    assert h.dtype == z.dtype == torch.bfloat16
    # The loss switches autocast off and upcasts: on the same bf16 network outputs it equals the float32
    # computation exactly (a bf16 soft-NN/softmax would be off by ~1e-2).
    s = K * P
    labels = support_label_matrix(batch.support_classes, 0.1)
    args = (z[s:], z[:s], labels, h[s : s + 2 * B], h[:s])
    with autocast_for(CPU, "bf16"):
        ce16, me16 = paws_loss(*args, multicrop=M)
    ce32, me32 = paws_loss(*(a.float() for a in args), multicrop=M)
    assert ce16.dtype == me16.dtype == torch.float32
    torch.testing.assert_close(torch.stack([ce16, me16]), torch.stack([ce32, me32]), rtol=1e-6, atol=1e-6)
    # The whole step in bf16 stays close to fp32: bf16 rounds activations to 8 mantissa bits, which the
    # sharpened targets (T=0.25, tau=0.1) amplify; with these seeds the gradient cosine is about 0.94.
    loss16, grad16 = _loss_and_grad(method, model, batch, "bf16")
    loss32, grad32 = _loss_and_grad(method, model, batch, "fp32")
    assert loss16.dtype == loss32.dtype == torch.float32
    assert loss16 != loss32 and abs(loss16 - loss32) < 0.02 * abs(loss32) + 0.01
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.9


def test_fp16_is_for_cuda_and_the_scaled_step_equals_the_plain_step() -> None:
    with pytest.raises(ValueError, match=r"run\.precision=fp16 needs a CUDA device"):
        autocast_for(CPU, "fp16")
    assert make_grad_scaler(CPU, "fp16") is None and make_grad_scaler(CPU, "bf16") is None
    # The loop's fp16 step order (scale, backward, unscale inside step, update) with LARS, which reads
    # gradient norms: a scaled step must move the weights exactly like the unscaled one.
    method = _method()
    plain, scaled = _model(method), _model(method)
    opts = [Lars(m.parameters(), lr=0.5, momentum=0.9, trust_coeff=0.001) for m in (plain, scaled)]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    for seed in (3, 4):
        for model, opt, sc in ((plain, opts[0], None), (scaled, opts[1], scaler)):
            with autocast_for(CPU, "fp32"):
                loss, _ = method.loss(model, _batch(seed))
            backward_and_step(loss, opt, sc)
    for (name, a), b in zip(plain.named_parameters(), scaled.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    assert not torch.equal(
        plain.encoder.projection.last.weight, _model(method).encoder.projection.last.weight
    )
    # A step with an infinite gradient is skipped and the scale halves
    before = [p.detach().clone() for p in scaled.parameters()]
    scale = scaler.get_scale()
    with autocast_for(CPU, "fp32"):
        loss, _ = method.loss(scaled, _batch(5))
    backward_and_step(loss * float("inf"), opts[1], scaler)
    assert all(torch.equal(p, q) for p, q in zip(scaled.parameters(), before, strict=True))
    assert scaler.get_scale() == scale / 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast with a grad scaler is a CUDA path")
def test_fp16_with_grad_scaler_on_cuda() -> None:
    device = torch.device("cuda")
    assert isinstance(make_grad_scaler(device, "fp16"), torch.amp.GradScaler)
    method = _method()
    model = _model(method).to(device)
    batch = _batch()
    batch = Batch(
        [v.to(device) for v in batch.views],
        [s.to(device) for s in batch.supports],
        batch.support_classes.to(device),
    )
    with autocast_for(device, "fp16"):
        loss, _ = method.loss(model, batch)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_channels_last_gives_the_same_outputs_and_gradients() -> None:
    method = _method()
    plain = _model(method)
    fast = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    convs = [m.weight for m in fast.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    plain_convs = [m.weight for m in plain.modules() if isinstance(m, nn.Conv2d)]
    assert any(not w.is_contiguous(memory_format=torch.channels_last) for w in plain_convs)
    _assert_same_network(plain, fast)


def test_grouped_forward_is_kept_under_the_speed_switches() -> None:
    """bf16 + channels_last: still one backbone call for supports + large views, one for the small views."""
    method = _method()
    model = _model(method).to(memory_format=torch.channels_last)
    shapes: list[tuple[int, ...]] = []
    model.encoder.backbone.register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0].shape)))
    with autocast_for(CPU, "bf16"):
        method.loss(model, _batch())
    assert shapes == [(K * P + 2 * B, 1, 8, 8), (M * B, 1, 4, 4)]


def test_compiled_backbone_matches_eager_and_keeps_checkpoint_keys() -> None:
    method = _method("model.compile=true")
    eager = _model(method)
    # wrap_model compiles in place and lazily (nothing is compiled before the first call)
    wrapped = wrap_model(copy.deepcopy(eager), DistContext(1, 0, 0, CPU), method.settings.model)
    assert wrapped.encoder.backbone._compiled_call_impl is not None
    assert list(wrapped.state_dict()) == list(eager.state_dict())  # no "_orig_mod." prefixes
    # Numerics through dynamo's graph capture and AOT autograd, without inductor's C++ code generation
    # (30-60 s cold on 2 cores; benchmarks/step.py model.compile=true runs the real thing).
    _assert_same_network(eager, compile_backbone(copy.deepcopy(eager), backend="aot_eager"))
    with pytest.raises(ValueError, match=r"no \.encoder\.backbone"):
        compile_backbone(nn.Linear(2, 2))


def test_training_run_with_bf16_and_channels_last(tiny_overrides: list[str], tmp_path: Path) -> None:
    out = io.StringIO()
    overrides = [*tiny_overrides, "run.precision=bf16", "model.channels_last=true", "run.max_steps=4"]
    result = train(load_settings("fmnist_demo", overrides, environ={}), console=Console(file=out, width=200))
    assert result.steps == 4 and result.is_main and result.world_size == 1
    assert "compute: device cpu, bf16 autocast (loss in fp32), channels_last, eager" in out.getvalue()
    assert all(torch.isfinite(torch.tensor(v)) for v in result.last_epoch.values())


@pytest.mark.parametrize("has_kernels", [False, True])
def test_auto_precision_is_bf16_only_on_cpus_with_bf16_kernels(
    has_kernels: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run.precision=auto: bf16 where oneDNN has bf16 kernels, fp32 on AVX2-only CPUs (where bf16 autocast was
    measured ~10x slower); an explicit bf16 there is kept, with a warning that names the fix."""
    monkeypatch.setattr(train_step, "cpu_has_bf16_kernels", lambda: has_kernels)
    expected = "bf16" if has_kernels else "fp32"
    assert resolve_precision(CPU, "auto") == expected
    assert [resolve_precision(CPU, p) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    with autocast_for(CPU, "auto"):
        out = nn.Linear(4, 4)(torch.ones(2, 4))
    assert out.dtype == (torch.bfloat16 if has_kernels else torch.float32)
    assert make_grad_scaler(CPU, "auto") is None
    with pytest.raises(ValueError, match=r"run\.precision must be"):
        resolve_precision(CPU, "fp8")

    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=CPU)
    auto = load_settings("fmnist_demo", ["run.precision=auto"], environ={})
    line = describe_compute(auto, ctx)
    kernels = "has bf16 kernels" if has_kernels else "has no bf16 kernels"
    assert f"{expected}" in line and f"(run.precision=auto: this CPU {kernels})" in line
    assert slow_bf16_warning(auto, ctx) is None
    explicit = load_settings("fmnist_demo", ["run.precision=bf16"], environ={})
    warning = slow_bf16_warning(explicit, ctx)
    assert (warning is None) == has_kernels
    if warning:
        assert "run.precision=fp32" in warning and "auto" in warning


def test_this_cpus_bf16_kernels_are_reported_by_onednn() -> None:
    """The probe answers a bool on any CPU (no exception), the same on every call."""
    assert isinstance(train_step.cpu_has_bf16_kernels(), bool)
    assert train_step.cpu_has_bf16_kernels() == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
