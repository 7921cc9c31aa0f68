"""SemPPL on several processes (gloo on the CPU, 2 processes spawned from pytest).

Gradient parity: for the same global batch, queue and step counter, SemPPL's loss averaged over processes and the
parameter gradients after DDP's averaging must equal one process computing the whole global batch (the rows
concatenated in rank order). The method draws its negatives and semantic positives for the whole global batch
from a generator that does not depend on the rank, gathers the target projections (and, for
``softmax_over=onlines`` or ``inv_mode=rowcol``, the online predictions with gradient), and labels each anchor
from the same queue, so nothing but the summation order may differ. As in test_distributed.py, BatchNorm runs in
eval mode with running statistics set to the global batch's (SyncBatchNorm needs CUDA).

L_SEMPOS and I_SEMPOS are means over the anchors that have a positive; each process divides its sum by the
global number of such anchors (``semppl_loss(sem_valid_all=...)``), without which the processes' means would
not average to the global one whenever the valid anchors are spread unevenly (checked on the loss alone too).

Queue identity: real 2-process training runs leave the same queues (vectors, labels, ids, pointer), step
counter and target parameters on both ranks, after every step, and the checkpoint (rank 0's) holds them; a run
cut on 2 processes and resumed on 1 with the same global batch continues with the same draws. The parity steps
and the training runs share one spawn (a process's imports take seconds); the runs only when a selected test
needs them.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console
from torch import nn

import paws_cli.methods.semppl as semppl_module
from paws_cli.config import load_settings
from paws_cli.data.sampling.batch import Batch
from paws_cli.losses.semppl import semppl_loss
from paws_cli.methods import create_method
from paws_cli.methods.semppl import SemPPLMethod
from paws_cli.train.checkpoint_io import load_checkpoint
from paws_cli.train.loop import train
from paws_cli.train.process_group import DistContext, shutdown, wrap_model

WORLD = 2
QUIET = Console(quiet=True)
# Per process: B anchors; L large (8 px) and S small (4 px) views; a queue of Q slots (F filled), C classes.
B, L, S, Q, F, C = 4, 2, 1, 24, 20, 4
CALLS = 5  # the method's step counter: seeds this step's draws
STEPS, CUT = 6, 3  # the training runs' steps, and where the resumed one is cut

#: name -> overrides of the parity case
CASES: dict[str, list[str]] = {
    "targets_swap": [],  # the defaults
    "onlines_swap": ["semppl.softmax_over=onlines"],
    "targets_rowcol": ["semppl.inv_mode=rowcol"],
    "onlines_rowcol": ["semppl.softmax_over=onlines", "semppl.inv_mode=rowcol"],
    "target_query_k3": ["semppl.knn_query=target_proj", "semppl.knn_k=3", "semppl.knn_weighted=true"],
}


def _case_settings(name: str) -> Any:
    base = [
        "model.backbone=cnn_w16",
        "model.proj_hidden_dim=32",
        "model.proj_out_dim=16",
        "model.proj_layers=2",
        "model.pred_hidden_dim=16",
        "model.channels_last=false",
        "run.precision=fp32",
        f"augment.num_small={S}",
        f"semppl.num_large={L}",
        "semppl.num_negatives=5",
        "semppl.num_positives=2",
        f"semppl.queue_size={Q}",
        "semppl.labelled_batch.classes_per_batch=0",
    ]
    return load_settings("semppl_fmnist_demo", [*base, *CASES[name]], environ={})


def _global_batch() -> Batch:
    """The global batch of all processes (W*B rows in rank order): some anchors labelled, the others not."""
    gen = torch.Generator().manual_seed(7)
    n = WORLD * B
    views = [torch.randn(n, 1, 8, 8, generator=gen) for _ in range(L)]
    views += [torch.randn(n, 1, 4, 4, generator=gen) for _ in range(S)]
    true_labels = torch.tensor([0, 1, 2, 3, 1, 3, 0, 2])
    # Labelled: rank 0 rows 0, 1 (class 1) and rank 1 row 5 (class 3: absent from the queue, no positive).
    labelled = torch.tensor([True, True, False, False, False, True, False, False])
    labels = torch.where(labelled, true_labels, -1)
    ids = torch.arange(n) + 100
    return Batch(views, [], torch.empty(0, dtype=torch.long), labels=labels, ids=ids, true_labels=true_labels)


def _rank_slice(rank: int) -> Batch:
    full, rows = _global_batch(), slice(rank * B, (rank + 1) * B)
    return Batch(
        [v[rows] for v in full.views],
        [],
        full.support_classes,
        labels=full.labels[rows],
        ids=full.ids[rows],
        true_labels=full.true_labels[rows],
    )


def _fill_queue(method: SemPPLMethod) -> None:
    """The same queue everywhere: F random unit vectors of classes 0..2 (class 3 never), some empty slots, and
    slots holding batch images' own ids (which the k-NN and the positive draw must skip)."""
    gen = torch.Generator().manual_seed(11)
    vectors = torch.randn(L, F, method.queue.dim, generator=gen)
    labels = torch.arange(F) % (C - 1)
    ids = torch.arange(F) + 1000
    ids[:3] = torch.tensor([100, 102, 105])
    method.queue.enqueue(vectors, labels, ids)
    method.calls = CALLS


@torch.no_grad()
def _calibrate_batchnorm(model: nn.Module) -> None:
    """Running statistics = the global batch's, identically everywhere (online on all views, target on the
    large ones); BatchNorm then runs in eval mode, the same per-sample function on 1 or 2 processes."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    views = _global_batch().views
    model.train()
    model(views)
    model.target(views[:L])
    for m in norms:
        m.momentum = 0.1


def _step(name: str, rank: int, world: int) -> dict[str, Any]:
    """One loss/backward of SemPPL; world=1 computes the whole global batch at once."""
    settings = _case_settings(name)
    torch.manual_seed(0)
    method = create_method(settings, in_chans=1, num_classes=C)
    assert isinstance(method, SemPPLMethod)
    model: nn.Module = method.build_model()
    _calibrate_batchnorm(model)
    _fill_queue(method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU's "no SyncBatchNorm" warning
        model = wrap_model(model, DistContext(world, rank, 0, torch.device("cpu")), settings.model)
    model.eval()
    batch = _rank_slice(rank) if world > 1 else _global_batch()
    loss, metrics = method.loss(model, batch)
    loss.backward()
    inner = getattr(model, "module", model)
    grads = {n: p.grad.detach().double() for n, p in inner.named_parameters() if p.requires_grad}
    vectors, labels, ids = method._pending  # what after_step would enqueue
    return {
        "loss": loss.item(),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "grads": grads,
        "pending": (vectors.clone(), labels.clone(), ids.clone()),
        "calls": method.calls,
        "wrapper": type(model).__name__,
    }


def _spy(patch: Any) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
    """Record this process's SemPPL state after every step and, in call order, the negatives it draws for the
    global batch. ``patch(owner, name, value)`` installs the wrappers (setattr, or pytest's monkeypatch)."""
    log: list[dict[str, Any]] = []
    draws: list[torch.Tensor] = []
    after_step, draw = SemPPLMethod.after_step, semppl_module._draw_negatives

    def recording_after_step(self: SemPPLMethod, model: nn.Module, step: int, total_steps: int) -> None:
        after_step(self, model, step, total_steps)
        target = getattr(model, "module", model).target
        state = {k: v.detach().clone() for k, v in target.state_dict().items()}
        log.append({"step": step, "calls": self.calls, "queue": self.queue.state_dict(), "target": state})

    def recording_draw(
        batch: int, count: int, generator: torch.Generator, device: torch.device
    ) -> torch.Tensor:
        negatives = draw(batch, count, generator, device)
        draws.append(negatives.clone())
        return negatives

    patch(SemPPLMethod, "after_step", recording_after_step)
    patch(semppl_module, "_draw_negatives", recording_draw)
    return log, draws


def _training_overrides(tiny_dataset: Path, out: Path) -> list[str]:
    """Tiny SemPPL runs on the tiny dataset; per process sizes are added by the callers."""
    return [
        "data.dataset=array",
        f"data.path={tiny_dataset}",
        "data.labels_per_class=16",  # a quarter of the images: ~4 labelled images per global batch
        "augment.large_size=16",
        "augment.small_size=8",
        "model.pred_hidden_dim=32",
        "model.proj_hidden_dim=64",
        "model.proj_out_dim=32",
        "semppl.queue_size=16",  # the pointer wraps around within the run
        "semppl.num_negatives=6",
        f"run.max_steps={STEPS}",
        "run.precision=fp32",
        "model.channels_last=false",
        f"run.out_dir={out}",
        "run.progress=false",
        "run.log_every=2",
        "run.num_threads=1",
        "run.device=cpu",
    ]


def _training_runs(rank: int, common: list[str], out: Path) -> None:
    """train() in this process of the group: a straight run (recorded), one cut after CUT steps and one with the
    labelled sub-batch; 2 processes x 8 images = 1 process x 16 images (labelled images at their natural rate)."""
    log, draws = _spy(setattr)

    def run(*extra: str) -> None:
        overrides = [*common, "optim.batch_size=8", "semppl.labelled_batch.classes_per_batch=0", *extra]
        train(load_settings("semppl_fmnist_demo", overrides, environ={}), console=QUIET)

    run("run.name=straight")
    torch.save({"log": log, "draws": draws}, out / f"train-rank{rank}.pt")
    run("run.name=cut", f"run.max_steps={CUT}")
    # SemPPL's optional labelled sub-batch (2 classes x 1 image per process), for the resume below
    run("run.name=sub", "run.max_steps=1", "semppl.labelled_batch.classes_per_batch=2")


def _worker(rank: int, out_dir: str, training: list[str] | None) -> None:
    """One process of the group: the parity steps, then (when a selected test needs them) the training runs,
    which reuse the group as they would one made by a launcher. One spawn for both: a process's imports take
    seconds."""
    torch.set_num_threads(1)
    out = Path(out_dir)
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"file://{out / 'init'}", rank=rank, world_size=WORLD)
    try:
        torch.save({name: _step(name, rank, WORLD) for name in CASES}, out / f"parity-rank{rank}.pt")
        if training is not None:
            _training_runs(rank, training, out)
    finally:
        shutdown()


@pytest.fixture(scope="module")
def spawned(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[str]]:
    """Run the 2 processes once for the whole module: (their output folder, the training overrides or [])."""
    out = tmp_path_factory.mktemp("semppl-ddp")
    training = any("two_process_runs" in item.fixturenames for item in request.session.items)
    common = _training_overrides(request.getfixturevalue("tiny_dataset"), out) if training else []
    mp.spawn(_worker, args=(str(out), common or None), nprocs=WORLD, join=True)
    return out, common


@pytest.fixture(scope="module")
def ranks(spawned: tuple[Path, list[str]]) -> list[dict[str, Any]]:
    """Each process's parity results."""
    return [torch.load(spawned[0] / f"parity-rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def two_process_runs(spawned: tuple[Path, list[str]]) -> tuple[Path, list[str], list[dict[str, Any]]]:
    """(output folder, overrides without per-process sizes, each process's record of its straight run)."""
    out, common = spawned
    assert common, "the training runs were not selected when the processes were spawned"
    return out, common, [torch.load(out / f"train-rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_after_ddp_equal_one_process_on_the_global_batch(
    ranks: list[dict[str, Any]], name: str
) -> None:
    single = _step(name, 0, 1)
    r0, r1 = ranks[0][name], ranks[1][name]
    assert r0["wrapper"] == "DistributedDataParallel"
    # The comparison means something: positives exist for some anchors and not for others.
    assert 0.0 < single["metrics"]["valid_positives"] < 1.0
    assert single["metrics"]["sempos"] > 0 and single["metrics"]["inv_augm"] > 0
    mean_loss = (r0["loss"] + r1["loss"]) / WORLD
    assert abs(mean_loss - single["loss"]) <= 1e-5, (mean_loss, single["loss"])
    for key in ("augm", "sempos", "inv_augm", "inv_sempos", "valid_positives"):
        mean = (r0["metrics"][key] + r1["metrics"][key]) / WORLD
        assert abs(mean - single["metrics"][key]) <= 1e-5, (key, mean, single["metrics"][key])
    # Every process queues the same (gathered) labelled targets as the single process would.
    for mine, theirs, expected in zip(r0["pending"], r1["pending"], single["pending"], strict=True):
        assert torch.equal(mine, theirs)
        torch.testing.assert_close(mine, expected, rtol=0, atol=1e-6)
    assert r0["calls"] == r1["calls"] == single["calls"] == CALLS + 1
    assert set(r0["grads"]) == set(single["grads"])
    assert not any(k.startswith("target.") for k in single["grads"])  # the target gets no gradient
    for key, expected in single["grads"].items():
        assert torch.equal(r0["grads"][key], r1["grads"][key]), f"{key}: DDP left different gradients"
        scale = expected.abs().max().item()
        assert scale > 1e-4, f"{key}: gradient too small ({scale}) for the comparison to mean anything"
        torch.testing.assert_close(
            r0["grads"][key], expected, rtol=1e-5, atol=1e-5 * scale, msg=lambda m, k=key: f"{k}: {m}"
        )


@pytest.mark.parametrize("softmax_over", ["targets", "onlines"])
@pytest.mark.parametrize("inv_mode", ["swap", "rowcol"])
def test_loss_of_anchor_halves_averages_to_the_global_batch(softmax_over: str, inv_mode: str) -> None:
    """The loss alone, without processes: two halves of the anchors (as two processes hold them) average to the
    global batch's terms and gradient when the global validity of the positives is passed, also when the valid
    anchors are spread unevenly; with each half's own count of valid anchors they do not."""
    gen = torch.Generator().manual_seed(3)
    V, N_sp, n, D = L + S, 2, WORLD * B, 16
    online = torch.randn(V, n, D, generator=gen, requires_grad=True)
    targets, sem_pos = torch.randn(L, n, D, generator=gen), torch.randn(L, N_sp, n, D, generator=gen)
    negatives = semppl_module._draw_negatives(n, 5, gen, torch.device("cpu"))
    valid = torch.ones(L, N_sp, n, dtype=torch.bool)
    valid[:, :, B + 1 :] = False  # the second half: one valid anchor, then none at all for (queue 1, draw 1)
    valid[1, 1, B] = False
    kw = {"tau": 0.2, "c": 0.3, "alpha": 0.2, "lam": 5.0, "inv_mode": inv_mode, "softmax_over": softmax_over}
    needs_all = softmax_over == "onlines" or inv_mode == "rowcol"
    full = semppl_loss(online, targets, negatives, sem_pos, valid, **kw)
    (expected,) = torch.autograd.grad(full.total, online)
    for valid_all in (valid, None):
        halves = []
        for rank in range(WORLD):
            rows = torch.arange(rank * B, (rank + 1) * B)
            halves.append(
                semppl_loss(
                    online if needs_all else online[:, rows],
                    targets,
                    negatives[rows],
                    sem_pos[:, :, rows],
                    valid[:, :, rows],
                    anchor_index=rows,
                    sem_valid_all=valid_all,
                    **kw,
                )
            )
        mean = {
            k: sum(getattr(h, k) for h in halves) / WORLD for k in ("augm", "sempos", "inv_sempos", "total")
        }
        if valid_all is None:  # each half divides by its own count of valid anchors: another objective
            assert (
                abs(mean["sempos"] - full.sempos) > 1e-3 and abs(mean["inv_sempos"] - full.inv_sempos) > 1e-4
            )
            continue
        for key, value in mean.items():
            torch.testing.assert_close(value, getattr(full, key), rtol=1e-6, atol=1e-6, msg=key)
        (got,) = torch.autograd.grad(mean["total"], online)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="sem_valid_all must be a bool tensor of shape"):
        semppl_loss(online, targets, negatives, sem_pos, valid, sem_valid_all=valid[:, :, :B], **kw)


# --- whole runs: train() in 2 processes; the queues, step counter and target agree on both ranks ---


def _assert_same_state(a: dict[str, Any], b: dict[str, Any], what: str) -> None:
    assert a["queue"]["ptr"] == b["queue"]["ptr"], what
    for key in ("vectors", "labels", "ids"):
        assert torch.equal(a["queue"][key], b["queue"][key]), f"{what}: queue {key}"
    assert int(a["calls"]) == int(b["calls"]), what


@pytest.mark.slow
def test_queues_step_counter_and_target_identical_on_both_ranks(
    two_process_runs: tuple[Path, list[str], list[dict[str, Any]]],
) -> None:
    out, _, ranks = two_process_runs
    logs = [r["log"] for r in ranks]
    assert [e["step"] for e in logs[0]] == [e["step"] for e in logs[1]] == list(range(1, STEPS + 1))
    for e0, e1 in zip(*logs, strict=True):
        what = f"after step {e0['step']}"
        _assert_same_state(e0, e1, what)
        assert e0["calls"] == e0["step"]
        for key, value in e0["target"].items():
            if key.endswith(("running_mean", "running_var")):
                continue  # BatchNorm statistics are copied from each process's own online network (no SyncBN)
            assert torch.equal(value, e1["target"][key]), f"{what}: target {key}"
    # The queues did something: every slot filled (the pointer went round), all 4 classes present.
    last = logs[1][-1]["queue"]
    assert bool((last["labels"] >= 0).all()) and set(last["labels"].unique().tolist()) == {0, 1, 2, 3}
    # What rank 0 checkpoints is what rank 1 holds.
    saved = load_checkpoint(out / "straight/checkpoint.pt")
    assert saved["step"] == STEPS and saved["world_size"] == WORLD
    _assert_same_state(saved["method_state"], logs[1][-1], "checkpoint vs rank 1")
    targets = {k: v for k, v in saved["model"].items() if k.startswith("target.")}
    assert {f"target.{k}" for k in logs[1][-1]["target"]} == set(targets)
    for key, value in logs[1][-1]["target"].items():
        if not key.endswith(("running_mean", "running_var")):
            assert torch.equal(targets[f"target.{key}"], value), key
    # The draws were made for the global batch (16 images), the same on both ranks.
    draws = [r["draws"] for r in ranks]
    assert len(draws[0]) == STEPS and all(d.shape == (16, 6) for d in draws[0])
    assert all(torch.equal(a, b) for a, b in zip(*draws, strict=True))


@pytest.mark.slow
def test_resume_on_one_process_continues_with_the_same_draws(
    two_process_runs: tuple[Path, list[str], list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 2-process run cut after CUT steps, resumed on 1 process with the same global batch: the step counter
    and queues continue from the checkpoint and every later step draws the negatives the 2-process run drew."""
    out, common, ranks = two_process_runs
    cut = load_checkpoint(out / "cut/checkpoint.pt")
    assert cut["step"] == CUT and cut["world_size"] == WORLD
    # The cut run is the straight run's first CUT steps: its checkpoint holds the queues of step CUT.
    _assert_same_state(cut["method_state"], ranks[0]["log"][CUT - 1], "cut checkpoint")
    log, draws = _spy(monkeypatch.setattr)
    one = [*common, "run.name=cut", "optim.batch_size=16", "semppl.labelled_batch.classes_per_batch=0"]
    result = train(load_settings("semppl_fmnist_demo", one, environ={}), console=QUIET, resume=True)
    state = load_checkpoint(result.checkpoint)
    assert result.steps == state["step"] == STEPS and state["world_size"] == 1
    assert [e["calls"] for e in log] == list(range(CUT + 1, STEPS + 1))
    assert len(draws) == STEPS - CUT
    for step, (mine, theirs) in enumerate(zip(draws, ranks[0]["draws"][CUT:], strict=True), start=CUT):
        assert torch.equal(mine, theirs), f"call {step}: other negatives than the 2-process run"


@pytest.mark.slow
def test_resume_on_one_process_with_the_labelled_sub_batch(
    two_process_runs: tuple[Path, list[str], list[dict[str, Any]]],
) -> None:
    """2 processes x (8 images + 2 classes x 1 labelled image) resumed as 1 x (16 images + 4 classes x 1)."""
    _, common, _ = two_process_runs
    one = [*common, "run.name=sub", "run.max_steps=2", "optim.batch_size=16"]
    one.append("semppl.labelled_batch.classes_per_batch=4")
    # The per-process sub-batch size may change with the process count when the global one stays (2 x 2 = 1 x 4).
    result = train(load_settings("semppl_fmnist_demo", one, environ={}), console=QUIET, resume=True)
    assert result.steps == 2 and load_checkpoint(result.checkpoint)["method_state"]["calls"] == 2
