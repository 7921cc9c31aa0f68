"""Multi-process training on the CPU (gloo, 2 processes spawned from pytest).

The parity tests guard the most subtle part of the method: for the same global inputs, the PAWS loss and the
parameter gradients after DDP's averaging must equal one process computing the whole global batch (supports
concatenated in rank order). They hold only if the support gather's backward sums every process's gradient and
the me-max mean's backward is the identity (paws_cli/collectives.py). On the CPU, BatchNorm runs in eval mode
with running statistics set to the global batch's (torch's SyncBatchNorm needs a GPU, and per-process batch
statistics would differ from the global ones); on a machine with CUDA the same test also runs in training
mode with SyncBatchNorm (both processes on cuda:0, gloo).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console
from torch import nn

from paws_cli.collectives import all_reduce_mean, gather_with_grad, max_over_processes, mean_over_processes
from paws_cli.config import load_settings
from paws_cli.data.sampling.batch import Batch
from paws_cli.data.sampling.samplers import SupportSampler, UnlabelledOrder
from paws_cli.methods import create_method
from paws_cli.train.checkpoint_io import CheckpointError, load_checkpoint
from paws_cli.train.loop import train
from paws_cli.train.process_group import (
    DistContext,
    init_distributed,
    main_first,
    shutdown,
    sync_batchnorm,
    wrap_model,
)

WORLD = 2
QUIET = Console(quiet=True)
# Per process: B unlabelled images, M small views, K classes x P images of support.
B, M, K, P = 3, 2, 2, 2

#: name -> (overrides, support views V)
CASES: dict[str, tuple[list[str], int]] = {
    "pred_unique": (["model.pred_hidden_dim=8", "paws.unique_classes_per_rank=true"], 1),
    "nopred_unique": (["model.pred_hidden_dim=null", "paws.unique_classes_per_rank=true"], 1),
    "pred_shared": (["model.pred_hidden_dim=8", "paws.unique_classes_per_rank=false"], 1),
    "nopred_shared_2views": (["model.pred_hidden_dim=null", "paws.unique_classes_per_rank=false"], 2),
    "no_memax_no_smoothing": (["model.pred_hidden_dim=8", "paws.me_max=false", "paws.label_smoothing=0"], 1),
}


def _case_settings(name: str) -> Any:
    base = [
        "model.backbone=cnn_w16",
        "model.proj_hidden_dim=32",
        "model.proj_out_dim=16",
        "model.proj_layers=2",
        "model.channels_last=false",
        "paws.label_smoothing=0.1",
        "run.precision=fp32",
    ]
    return load_settings("fmnist_demo", [*base, *CASES[name][0]], environ={})


def _global_inputs(name: str) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """The global batch of all processes: views (W*B rows each), V support views, support classes."""
    settings, views_per_support = _case_settings(name), CASES[name][1]
    gen = torch.Generator().manual_seed(7)
    views = [torch.randn(WORLD * B, 1, 8, 8, generator=gen) for _ in range(2)]
    views += [torch.randn(WORLD * B, 1, 4, 4, generator=gen) for _ in range(M)]
    supports = [torch.randn(WORLD * K * P, 1, 8, 8, generator=gen) for _ in range(views_per_support)]
    unique = settings.paws.unique_classes_per_rank
    # The sampler's layout: P rounds of one image per class; each process its own K classes (or the same K).
    classes = torch.cat(
        [torch.arange(r * K if unique else 0, (r + 1) * K if unique else K).repeat(P) for r in range(WORLD)]
    )
    return views, supports, classes


def _rank_slice(name: str, rank: int) -> Batch:
    views, supports, classes = _global_inputs(name)
    rows, srows = slice(rank * B, (rank + 1) * B), slice(rank * K * P, (rank + 1) * K * P)
    return Batch([v[rows] for v in views], [s[srows] for s in supports], classes[srows])


@torch.no_grad()
def _calibrate_batchnorm(model: nn.Module, name: str, device: torch.device) -> None:
    """Running statistics = the global batch's statistics, identically in every process.

    BatchNorm then runs in eval mode (the same per-sample function on 1 or 2 processes) yet still normalises;
    with the initial statistics (0, 1) the random network maps every input to nearly the same embedding, the
    predictions are uniform and the gradients tiny, which would make the comparison weak.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calls of this one pass
    views, supports, _ = _global_inputs(name)
    model.train()
    model([s.to(device) for s in supports] + [v.to(device) for v in views])
    for m in norms:
        m.momentum = 0.1


def _step(name: str, rank: int, world: int, device: torch.device) -> dict[str, Any]:
    """One forward/loss/backward of the PAWS method; world=1 computes the whole global batch at once."""
    settings = _case_settings(name)
    torch.manual_seed(0)
    method = create_method(settings, in_chans=1, num_classes=2 * K)
    model: nn.Module = method.build_model().to(device)
    if device.type == "cpu":
        _calibrate_batchnorm(model, name, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU's "no SyncBatchNorm" warning is tested on its own
        model = wrap_model(model, DistContext(world, rank, 0, device), settings.model)
    # Batch statistics per process differ from the global ones unless SyncBatchNorm runs (GPU only).
    model.train(device.type == "cuda")
    batch = _rank_slice(name, rank) if world > 1 else Batch(*_global_inputs(name))
    batch = Batch(
        [v.to(device) for v in batch.views],
        [s.to(device) for s in batch.supports],
        batch.support_classes.to(device),
    )
    loss, _ = method.loss(model, batch)
    loss.backward()
    inner = getattr(model, "module", model)
    grads = {n: p.grad.detach().double().cpu() for n, p in inner.named_parameters()}
    return {"loss": loss.item(), "grads": grads, "wrapper": type(model).__name__}


def _collective_checks(rank: int) -> dict[str, Any]:
    """The collectives' values and gradients on hand-computable inputs."""
    x = (torch.arange(3, dtype=torch.float64) + 10 * rank).requires_grad_()
    gathered = gather_with_grad(x)
    weights = torch.arange(6, dtype=torch.float64) * (rank + 1)
    (gathered * weights).sum().backward()
    y = (torch.arange(3, dtype=torch.float64) * (rank + 1)).requires_grad_()
    mean = all_reduce_mean(y)
    (mean * torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)).sum().backward()
    return {
        "gathered": gathered.detach(),
        "gather_grad": x.grad,
        "mean": mean.detach(),
        "mean_grad": y.grad,
        "metrics": mean_over_processes({"a": float(rank), "b": torch.tensor(2.0 * rank)}),
        "max": max_over_processes([float(rank), torch.tensor(-float(rank))]),
    }


def _main_first_checks(rank: int, tmp: Path) -> dict[str, Any]:
    ctx = DistContext(WORLD, rank, rank, torch.device("cpu"))
    marker = tmp / "made-by-rank0.txt"
    seen = main_first(ctx, lambda: marker.write_text("0") and "main", lambda: marker.read_text())
    try:
        main_first(ctx, lambda: (_ for _ in ()).throw(ValueError("boom in the cache")))
        failure = None
    except (ValueError, RuntimeError) as exc:
        failure = f"{type(exc).__name__}: {exc}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = wrap_model(
            create_method(_case_settings("pred_unique"), in_chans=1, num_classes=4).build_model(),
            ctx,
            _case_settings("pred_unique").model,
        )
    return {
        "seen": seen,
        "failure": failure,
        "sync_warnings": [str(w.message) for w in caught if "SyncBatchNorm" in str(w.message)],
        "syncbn_layers": sum(isinstance(m, nn.SyncBatchNorm) for m in wrapped.modules()),
        "ddp_flags": (wrapped.broadcast_buffers, wrapped.find_unused_parameters),
    }


def _exact_fp32_on_cuda() -> None:
    """Parity at 1e-5 needs true fp32: Ampere+ GPUs otherwise run convs and matmuls in TF32 (10-bit mantissa),
    which moved the loss by 1e-4 on an H100."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _parity_worker(rank: int, init_file: str, out_dir: str, device_type: str) -> None:
    torch.set_num_threads(1)
    _exact_fp32_on_cuda()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        # Both processes share cuda:0 when there is one GPU: gloo carries CUDA tensors, SyncBatchNorm runs.
        device = torch.device(device_type, 0) if device_type == "cuda" else torch.device("cpu")
        results: dict[str, Any] = {"collectives": _collective_checks(rank)}
        if device_type == "cpu":
            results["setup"] = _main_first_checks(rank, Path(out_dir))
        results["cases"] = {name: _step(name, rank, WORLD, device) for name in CASES}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn_parity(tmp: Path, device_type: str) -> list[dict[str, Any]]:
    mp.spawn(_parity_worker, args=(str(tmp / "init"), str(tmp), device_type), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def cpu_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _spawn_parity(tmp_path_factory.mktemp("parity"), "cpu")


def _assert_parity(ranks: list[dict[str, Any]], name: str, device: torch.device) -> None:
    single = _step(name, 0, 1, device)
    assert ranks[0]["cases"][name]["wrapper"] == "DistributedDataParallel"
    # The loss of the global batch is the mean of the processes' losses (ce is a per-process mean of equal
    # sizes; me-max is the same global value everywhere).
    mean_loss = sum(r["cases"][name]["loss"] for r in ranks) / WORLD
    assert abs(mean_loss - single["loss"]) <= 1e-5, (mean_loss, single["loss"])
    grads0, grads1 = ranks[0]["cases"][name]["grads"], ranks[1]["cases"][name]["grads"]
    assert set(grads0) == set(single["grads"])
    for key, expected in single["grads"].items():
        assert torch.equal(grads0[key], grads1[key]), (
            f"{key}: DDP left different gradients on the two processes"
        )
        # The loss runs in float32 whatever the network's dtype: agreement to 1e-5 of each tensor's largest
        # entry (measured: at most 5e-6) is float32 rounding in another summation order.
        scale = expected.abs().max().item()
        if device.type == "cuda" and key.endswith(".bias") and scale < 1e-5:
            # A bias right before a BatchNorm in training mode has an exactly zero gradient (the batch mean
            # removes it): both sides must then be ~0, which a scale-relative tolerance cannot check.
            assert grads0[key].abs().max().item() < 1e-5, (
                f"{key}: should have ~zero gradient before BatchNorm"
            )
            continue
        assert scale > 1e-3, f"{key}: gradient too small ({scale}) for the comparison to mean anything"
        torch.testing.assert_close(
            grads0[key], expected, rtol=1e-5, atol=1e-5 * scale, msg=lambda m, k=key: f"{k}: {m}"
        )


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_after_ddp_equal_one_process_on_the_global_batch(
    cpu_ranks: list[dict[str, Any]], name: str
) -> None:
    _assert_parity(cpu_ranks, name, torch.device("cpu"))


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="SyncBatchNorm (BatchNorm in training mode) needs CUDA"
)
def test_gradients_with_syncbatchnorm_in_training_mode_on_cuda(tmp_path: Path) -> None:
    _exact_fp32_on_cuda()
    ranks = _spawn_parity(tmp_path, "cuda")
    for name in CASES:
        _assert_parity(ranks, name, torch.device("cuda", 0))


def test_collectives_values_and_gradients(cpu_ranks: list[dict[str, Any]]) -> None:
    for rank, result in enumerate(cpu_ranks):
        c = result["collectives"]
        assert c["gathered"].tolist() == [0, 1, 2, 10, 11, 12]  # rank order
        # d/dx_r of sum_q (gathered . w_q), w_q = arange(6) * (q + 1): (1 + 2) * arange(6)[own slice]
        assert c["gather_grad"].tolist() == [3.0 * i for i in range(3 * rank, 3 * rank + 3)]
        assert c["mean"].tolist() == [0.0, 1.5, 3.0]  # mean of arange(3) * 1 and arange(3) * 2
        assert c["mean_grad"].tolist() == [1.0, -2.0, 3.0]  # identity backward; DDP supplies the 1/W
        assert c["metrics"] == {"a": 0.5, "b": 1.0}
        assert c["max"] == [1.0, 0.0]


def test_main_first_and_cpu_wrapping(cpu_ranks: list[dict[str, Any]]) -> None:
    rank0, rank1 = cpu_ranks[0]["setup"], cpu_ranks[1]["setup"]
    assert rank0["seen"] == "main" and rank1["seen"] == "0"  # rank 1 ran after rank 0 had written the file
    assert rank0["failure"] == "ValueError: boom in the cache"
    assert (
        rank1["failure"].startswith("RuntimeError: rank 0 failed") and "boom in the cache" in rank1["failure"]
    )
    # CPU: plain BatchNorm, one warning (rank 0 only); DDP without buffer broadcasts or unused-param search
    assert len(rank0["sync_warnings"]) == 1 and rank1["sync_warnings"] == []
    assert rank0["syncbn_layers"] == rank1["syncbn_layers"] == 0
    assert rank0["ddp_flags"] == (False, False)


def test_sync_batchnorm_conversion_for_gpu_processes() -> None:
    """wrap_model's step for GPU processes (checked without a GPU): every BN a SyncBN, same params, keys."""
    settings = _case_settings("pred_unique")
    torch.manual_seed(0)
    model = create_method(settings, in_chans=1, num_classes=4).build_model()
    keys, params = list(model.state_dict()), [id(p) for p in model.parameters()]
    bn_count = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    x = [torch.randn(6, 1, 8, 8), torch.randn(6, 1, 4, 4)]
    expected = model.eval()(x)
    gpu_ctx = DistContext(8, 0, 0, torch.device("cuda", 0))
    converted = sync_batchnorm(model, gpu_ctx, settings.model)
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules()) == bn_count > 4
    assert list(converted.state_dict()) == keys and [id(p) for p in converted.parameters()] == params
    for got, want in zip(
        converted.eval()(x), expected, strict=True
    ):  # eval mode: running statistics, no sync
        torch.testing.assert_close(got, want)
    off = settings.model.model_copy(update={"sync_batchnorm": False})
    fresh = create_method(settings, in_chans=1, num_classes=4).build_model()
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in sync_batchnorm(fresh, gpu_ctx, off).modules())
    one = DistContext(1, 0, 0, torch.device("cuda", 0))
    assert not any(
        isinstance(m, nn.SyncBatchNorm) for m in sync_batchnorm(fresh, one, settings.model).modules()
    )


# --- samplers resumed on another number of processes ---


def test_unlabelled_order_resumes_on_another_world_size_with_the_same_global_batch() -> None:
    ranks = [UnlabelledOrder(100, 4, world_size=2, rank=r, seed=3) for r in range(2)]
    iters = [iter(o) for o in ranks]
    for _ in range(5):
        for it in iters:
            next(it)
    one = UnlabelledOrder(100, 8, world_size=1, seed=3)
    one.load_state_dict(ranks[1].state_dict())
    rest_two = [torch.cat(pair) for pair in zip(*iters, strict=True)]  # rank order = the global batch
    rest_one = list(one)
    assert len(rest_one) == len(rest_two) == 100 // 8 - 5
    assert all(torch.equal(a, b) for a, b in zip(rest_one, rest_two, strict=True))
    with pytest.raises(ValueError, match=r"global batch: saved 8, this run 4.*not supported yet"):
        UnlabelledOrder(100, 4, world_size=1, seed=3).load_state_dict(ranks[0].state_dict())


@pytest.mark.parametrize("unique", [True, False])
def test_support_sampler_resumes_on_another_world_size_with_the_same_global_support(unique: bool) -> None:
    labels = torch.arange(8).repeat_interleave(10).numpy()
    kw = {"batches_per_epoch": 6, "unique_classes_per_rank": unique, "seed": 2}
    per_rank = {"classes_per_batch": 2, "images_per_class": 3}
    single = {"classes_per_batch": 4 if unique else 2, "images_per_class": 3 if unique else 6}
    ranks = [SupportSampler(labels, world_size=2, rank=r, **per_rank, **kw) for r in range(2)]
    iters = [iter(s) for s in ranks]
    for _ in range(2):
        for it in iters:
            next(it)
    one = SupportSampler(labels, world_size=1, **single, **kw)
    one.load_state_dict(ranks[0].state_dict())
    for batch, *rank_batches in zip(one, *iters, strict=True):
        # the same classes per step over all processes (the images come from per-process streams)
        expected = torch.cat([s.batch_labels(b) for s, b in zip(ranks, rank_batches, strict=True)])
        assert sorted(one.batch_labels(batch).tolist()) == sorted(expected.tolist())
    other = {**single, "images_per_class": single["images_per_class"] - 1}
    with pytest.raises(ValueError, match=r"world_size=2 but this run has world_size=1.*images per class"):
        SupportSampler(labels, world_size=1, **other, **kw).load_state_dict(ranks[0].state_dict())


# --- init_distributed from torchrun's environment ---


def test_single_process_without_torchrun_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    ctx = init_distributed(load_settings("fmnist_demo", ["run.device=cpu"], environ={}).run)
    assert (ctx.world_size, ctx.rank, ctx.is_main, ctx.device) == (1, 0, True, torch.device("cpu"))
    assert not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed(load_settings("fmnist_demo", ["run.device=cpu"], environ={}).run).world_size == 1


def test_bad_torchrun_environment_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    run = load_settings("fmnist_demo", ["run.device=cpu"], environ={}).run
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="RANK is not"):
        init_distributed(run)
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK='x' is not an integer"):
        init_distributed(run)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR is not set"):
        init_distributed(run)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    nccl = load_settings("fmnist_demo", ["run.device=cpu", "run.dist_backend=nccl"], environ={}).run
    with pytest.raises(ValueError, match=r"run\.dist_backend=nccl needs CUDA"):
        init_distributed(nccl)
    assert not dist.is_initialized()


# --- whole runs: train() in 2 processes, resume, another world size, torchrun ---


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_worker(rank: int, port: int, overrides: list[str]) -> None:
    # Exactly what torchrun sets; train() creates the process group from it (env:// rendezvous).
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(WORLD),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
    )
    try:

        def run(*extra: str, **kwargs: Any) -> None:
            train(load_settings("fmnist_demo", [*overrides, *extra], environ={}), console=QUIET, **kwargs)

        run("run.name=straight")
        run("run.name=resumed", "run.max_steps=5")
        run("run.name=resumed", resume=True)
        run("run.name=half", "run.max_steps=5")
        assert dist.get_world_size() == WORLD  # the group stays up between train() calls
    finally:
        shutdown()


@pytest.fixture(scope="module")
def two_process_runs(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("ddp-runs")
    common = [
        "data.dataset=array",
        f"data.path={tiny_dataset}",
        "data.labels_per_class=4",
        "augment.large_size=16",
        "augment.small_size=8",
        "augment.num_small=2",
        "paws.images_per_class=2",
        "optim.epochs=2",
        "optim.warmup_epochs=0.5",
        "model.proj_hidden_dim=64",
        "model.proj_out_dim=64",
        "run.precision=fp32",
        "model.channels_last=false",
        f"run.out_dir={out}",
        "run.progress=false",
        "run.log_every=4",
        "run.num_threads=1",
        "run.device=cpu",
    ]
    # 2 processes x (8 images, 2 classes) = the global batch of 1 process x (16 images, 4 classes)
    per_rank = [*common, "optim.batch_size=8", "paws.classes_per_batch=2"]
    mp.spawn(_train_worker, args=(_free_port(), per_rank), nprocs=WORLD, join=True)
    return out, common


def test_two_processes_resume_exactly(two_process_runs: tuple[Path, list[str]]) -> None:
    out, _ = two_process_runs
    straight, resumed = (
        load_checkpoint(out / "straight/checkpoint.pt"),
        load_checkpoint(out / "resumed/checkpoint.pt"),
    )
    assert straight["step"] == resumed["step"] == 32 and straight["world_size"] == 2
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert straight["data"] == resumed["data"]
    # rank 0 alone writes the logs: one line per logged step, no duplicates from rank 1
    lines = (out / "straight/metrics.jsonl").read_text().splitlines()
    assert len(lines) == 32 // 4


def test_resume_on_one_process_keeping_the_global_batch(two_process_runs: tuple[Path, list[str]]) -> None:
    _, common = two_process_runs
    wrong = [*common, "run.name=half", "optim.batch_size=8", "paws.classes_per_batch=4"]
    with pytest.raises(CheckpointError, match=r"global batch: saved 16, this run 8"):
        train(load_settings("fmnist_demo", wrong, environ={}), console=QUIET, resume=True)
    one = [*common, "run.name=half", "optim.batch_size=16", "paws.classes_per_batch=4"]
    result = train(load_settings("fmnist_demo", one, environ={}), console=QUIET, resume=True)
    state = load_checkpoint(result.checkpoint)
    assert result.steps == state["step"] == 32 and state["world_size"] == 1
    assert (state["data"]["unlabelled"]["epoch"], state["data"]["unlabelled"]["position"]) == (1, 16)


def test_torchrun_launches_pretrain(tiny_overrides: list[str], tmp_path: Path) -> None:
    """`torchrun --nproc_per_node 2 -m paws_cli pretrain` trains, with one set of start lines (rank 0's)."""
    overrides = [
        *tiny_overrides,
        "optim.batch_size=8",
        "paws.classes_per_batch=2",
        "run.max_steps=3",
        "run.num_threads=1",
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "paws_cli", "pretrain", "--recipe", "fmnist_demo", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.count("compute: 2 processes (gloo), rank 0 on cpu") == 1
    assert done.stdout.count("global unlabelled batch: 16 (8 per process)") == 1
    assert load_checkpoint(tmp_path / "runs/tiny/checkpoint.pt")["step"] == 3
