"""Shared fixtures: a tiny real-format dataset that every end-to-end test can train on in seconds."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from paws_cli.data.datasets.arrays import write_array_dataset


def _class_images(rng: np.random.Generator, label: int, count: int, size: int = 16) -> np.ndarray:
    """Gray images whose class is a stripe orientation/position pattern plus noise (learnable, not trivial)."""
    yy, xx = np.mgrid[0:size, 0:size]
    patterns = [(xx // 3) % 2, (yy // 3) % 2, ((xx + yy) // 3) % 2, (np.abs(xx - yy) < 4).astype(int)]
    base = patterns[label % len(patterns)] * 170 + 40
    noise = rng.normal(0, 30, size=(count, size, size))
    shift = rng.integers(-2, 3, size=count)
    images = np.stack([np.roll(base, s, axis=1) for s in shift]) + noise
    return np.clip(images, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes, 64 train + 16 test images per class, 16x16 gray, in the toolkit's array format."""
    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("tiny") / "dataset"
    splits = {}
    for split, per_class in (("train", 64), ("test", 16)):
        images = np.concatenate([_class_images(rng, c, per_class) for c in range(4)])
        labels = np.repeat(np.arange(4), per_class).astype(np.int64)
        order = rng.permutation(len(labels))
        splits[split] = (images[order], labels[order])
    write_array_dataset(out, "tiny-stripes", splits["train"], splits["test"], ["a", "b", "c", "d"], "tests")
    return out


@pytest.fixture()
def tiny_overrides(tiny_dataset: Path, tmp_path: Path) -> list[str]:
    """Overrides on top of the fmnist_demo recipe that train on the tiny dataset: 16 steps per epoch."""
    return [
        "data.dataset=array",
        f"data.path={tiny_dataset}",
        "data.labels_per_class=4",
        "augment.large_size=16",
        "augment.small_size=8",
        "augment.num_small=2",
        "paws.classes_per_batch=4",
        "paws.images_per_class=2",
        "supervised.classes_per_batch=4",  # the baseline's labelled batch (method=supervised)
        "supervised.images_per_class=2",
        "optim.batch_size=16",
        "optim.epochs=2",
        "optim.warmup_epochs=0.5",
        "model.proj_hidden_dim=64",
        "run.precision=fp32",
        "run.device=cpu",  # exact-resume and parity checks are CPU promises (CUDA kernels are not deterministic)
        "model.channels_last=false",
        "model.proj_out_dim=64",
        f"run.out_dir={tmp_path / 'runs'}",
        "run.name=tiny",
        "run.progress=false",
        "run.log_every=4",
        # SimCLRv2's fine-tuning protocol, which the fine-tuning tests were written for (fmnist_demo's own
        # protocol, a prototype classifier on all labels, is tested in test_finetune_protocol.py)
        "finetune.classifier_init=zero",
        "finetune.normalize_features=false",
        "finetune.keep_projection_layers=1",
        "finetune.backbone_lr_scale=1.0",
        "finetune.select=accuracy",
        "finetune.val_per_class=2",
    ]


@pytest.fixture()
def ctrl_c_enabled() -> Iterator[None]:
    """SIGINT as an interactive terminal has it (Python's KeyboardInterrupt handler) for the test's duration.

    A shell starts background jobs (and CI may start the suite) with SIGINT ignored; training then rightly leaves
    the signal alone, so tests of Ctrl-C handling must first give the process an ordinary SIGINT."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def sigint_default_in_child() -> None:
    """preexec_fn for subprocesses that must react to SIGINT even when this process ignores it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
