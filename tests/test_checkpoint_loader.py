"""The shared checkpoint loader: toolkit checkpoints and the authors' released (suncet) PAWS checkpoints.

The released layout is rebuilt here from its description (DDP ``module.`` prefix, torchvision/timm ResNet keys,
projection head ``fc.fc1 fc.bn1 fc.fc2 fc.bn2 fc.fc3``, prediction head ``pred.bn1 pred.fc1 pred.bn2 pred.fc2``),
independently of the loader's renaming, and every tensor is randomised so that a swapped layer shows.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from rich.console import Console

from paws_cli.config import ConfigError, load_settings
from paws_cli.data.datasets.arrays import write_array_dataset
from paws_cli.eval.knn_eval import knn_eval_command
from paws_cli.finetune.command import finetune_command
from paws_cli.methods.paws import PAWSModel
from paws_cli.models import PAWSEncoder, create_encoder
from paws_cli.pretrained import load_pretrained, resolve_settings
from paws_cli.train.checkpoint_io import CheckpointError, save_checkpoint

QUIET = Console(quiet=True)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread (small inputs gain nothing from more; robust on a busy machine); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: PAWSEncoder head names -> the released checkpoints' names (from the reference's init_model).
TO_SUNCET = {
    "projection.first.fc.": "fc.fc1.",
    "projection.first.bn.": "fc.bn1.",
    "projection.middle.0.fc.": "fc.fc2.",
    "projection.middle.0.bn.": "fc.bn2.",
    "projection.last.": "fc.fc3.",
    "prediction.bn_in.": "pred.bn1.",
    "prediction.fc1.": "pred.fc1.",
    "prediction.bn1.": "pred.bn2.",
    "prediction.fc2.": "pred.fc2.",
}


def to_suncet(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PAWSEncoder state -> the released checkpoints' `encoder` state (DDP-prefixed)."""
    out = {}
    for key, value in state.items():
        if key.startswith("backbone."):
            name = key[len("backbone.") :]
        else:
            prefix = next(p for p in TO_SUNCET if key.startswith(p))
            name = TO_SUNCET[prefix] + key[len(prefix) :]
        out[f"module.{name}"] = value
    return out


def randomised(encoder: PAWSEncoder) -> PAWSEncoder:
    """Random BatchNorm parameters/statistics and biases on top of the (seeded) random weights: every layer
    differs from every other, and the activations stay well scaled, so outputs are far from constant."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in encoder.state_dict().items():
            if name.endswith("num_batches_tracked"):
                tensor.fill_(7)
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            elif name.endswith(("running_mean", "bias")):
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)
            elif tensor.ndim == 1:  # normalisation weights
                tensor.copy_(1 + 0.1 * torch.randn(tensor.shape, generator=gen))
    return encoder.eval()


@pytest.fixture(scope="module")
def suncet_file(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, PAWSEncoder, dict[str, torch.Tensor]]:
    """A released-layout RN50 checkpoint (projection 2048-2048-256, prediction 256-64-256) and its source."""
    torch.manual_seed(0)
    encoder = randomised(create_encoder("resnet50x1", 3, None, 256, 3, 64))
    encoder_state = to_suncet(encoder.state_dict())
    path = tmp_path_factory.mktemp("released") / "paws_imgnt_10percent_300ep.pth.tar"
    raw = {"encoder": encoder_state, "opt": {"state": {}, "param_groups": []}, "epoch": 300, "lr": 6.4}
    torch.save({**raw, "world_size": 64, "amp": {"scale": 65536.0}, "unlabel_prob": 0.9}, path)
    return path, encoder, encoder_state


def test_released_layout_loads_and_computes_the_same(suncet_file, tmp_path: Path) -> None:
    path, encoder, _ = suncet_file
    weights = load_pretrained(path)
    assert weights.kind == "suncet" and weights.settings is None and weights.meta["epoch"] == 300
    arch = weights.architecture
    assert (arch.backbone, arch.in_chans, arch.proj_layers) == ("resnet50x1", 3, 3)
    assert (arch.proj_hidden_dim, arch.proj_out_dim, arch.pred_hidden_dim) == (2048, 256, 64)
    loaded = weights.build_encoder()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for which in ("backbone", "projection", "prediction"):
            torch.testing.assert_close(loaded.embed(x, which), encoder.embed(x, which), rtol=0, atol=0)
    for key, value in encoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_released_backbone_keys_are_torchvision_resnet50() -> None:
    """The released backbone keys are torchvision's ResNet-50 names, which the renaming keeps unchanged."""
    with torch.device("meta"):
        ours = create_encoder("resnet50x1", 3, None, 256, 3, 64).backbone.state_dict()
        reference = torchvision.models.resnet50().state_dict()
    assert set(ours) == {k for k in reference if not k.startswith("fc.")}


def _save_variant(path: Path, state: dict[str, torch.Tensor]) -> Path:
    torch.save({"encoder": state, "epoch": 1}, path)
    return path


def test_errors_list_missing_unexpected_and_mismatched_keys(suncet_file, tmp_path: Path) -> None:
    _, _, state = suncet_file
    extra = {
        **state,
        "module.layer4.2.conv4.weight": torch.zeros(1),
        "module.pred.fc3.weight": torch.zeros(1),
    }
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\) in the heads: module\.pred\.fc3\.weight"):
        load_pretrained(_save_variant(tmp_path / "a.pth.tar", extra))
    extra.pop("module.pred.fc3.weight")
    with pytest.raises(CheckpointError, match=r"1 unexpected: backbone\.layer4\.2\.conv4\.weight"):
        load_pretrained(_save_variant(tmp_path / "b.pth.tar", extra))
    missing = {k: v for k, v in state.items() if k != "module.layer2.1.bn2.running_var"}
    with pytest.raises(CheckpointError, match=r"1 missing: backbone\.layer2\.1\.bn2\.running_var"):
        load_pretrained(_save_variant(tmp_path / "c.pth.tar", missing))
    wrong = {**state, "module.layer3.0.conv2.weight": torch.zeros(256, 256, 1, 1)}
    with pytest.raises(
        CheckpointError, match=r"shape mismatch: backbone\.layer3\.0\.conv2\.weight: checkpoint"
    ):
        load_pretrained(_save_variant(tmp_path / "d.pth.tar", wrong))
    wrn = {"conv1.weight": torch.zeros(16, 3, 3, 3), "conv1.bias": torch.zeros(16)}
    with pytest.raises(CheckpointError, match="WRN-28-2"):
        load_pretrained(_save_variant(tmp_path / "e.pth.tar", wrn))
    torch.save({"something": torch.zeros(1)}, tmp_path / "f.pt")
    with pytest.raises(CheckpointError, match=r"neither a paws checkpoint.*'something'"):
        load_pretrained(tmp_path / "f.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nothing.pth.tar")


def test_batch_counters_absent_in_old_files_are_filled(suncet_file, tmp_path: Path) -> None:
    _, encoder, state = suncet_file
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    weights = load_pretrained(_save_variant(tmp_path / "old.pth.tar", old))
    counters = sum(k.endswith("num_batches_tracked") for k in encoder.state_dict())
    assert weights.meta["filled_batch_counters"] == counters > 50
    assert torch.equal(weights.encoder_state["backbone.bn1.running_mean"], encoder.backbone.bn1.running_mean)


def test_released_checkpoints_need_data_settings(suncet_file, tiny_overrides: list[str]) -> None:
    path, _, _ = suncet_file
    weights = load_pretrained(path)
    with pytest.raises(ConfigError, match=r"carries no settings.*--recipe.*data\.\*"):
        resolve_settings(weights, None, ["eval.knn_k=5"], environ={})
    settings, notes = resolve_settings(weights, "fmnist_demo", ["data.labels_per_class=4"], environ={})
    assert settings.model.backbone == "resnet50x1" and settings.model.pred_hidden_dim == 64
    assert any("model.backbone: the recipe says 'cnn_w16'" in note for note in notes)
    with pytest.raises(ConfigError, match=r"fixed by the checkpoint.*model\.proj_out_dim=128"):
        resolve_settings(weights, "fmnist_demo", ["model.proj_out_dim=128"], environ={})


def test_toolkit_checkpoint_round_trip(tiny_overrides: list[str], tmp_path: Path) -> None:
    settings = load_settings("fmnist_demo", tiny_overrides, environ={})
    torch.manual_seed(0)
    encoder = randomised(create_encoder("cnn_w16", 1, 64, 64, 2, None))
    model = PAWSModel(encoder)
    path = save_checkpoint(
        tmp_path / "checkpoint.pt",
        {"method": "paws", "settings": settings.model_dump(mode="json"), "model": model.state_dict()},
    )
    weights = load_pretrained(path)
    assert weights.kind == "paws" and weights.architecture.in_chans == 1 and not weights.extra_state
    assert set(weights.encoder_state) == set(encoder.state_dict())
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            weights.build_encoder().embed(x, "projection"), encoder.embed(x, "projection")
        )
    # knn-eval banks a toolkit checkpoint on its stored labelled subset, or on the settings' one without it
    quiet = [*tiny_overrides, "eval.knn_k=3"]
    result = knn_eval_command(path, None, quiet, output=tmp_path / "a.json", console=QUIET, environ={})
    assert result.bank_size == 16 and result.embedding == "projection" and result.queries == 64
    stored = torch.arange(0, 80, 10)
    payload = {"method": "paws", "settings": settings.model_dump(mode="json"), "model": model.state_dict()}
    path = save_checkpoint(
        tmp_path / "with_labels.pt", {**payload, "labelled": stored, "labelled_source": "x"}
    )
    result = knn_eval_command(path, None, quiet, output=tmp_path / "b.json", console=QUIET, environ={})
    assert result.bank_size == 8 and "the run's labelled subset: x" in result.bank


@pytest.fixture(scope="module")
def rgb_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 colour classes (a different channel carries a stripe pattern), 16 train + 8 test per class, 16x16."""
    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("rgb") / "dataset"
    splits = {}
    for split, per_class in (("train", 16), ("test", 8)):
        images = rng.integers(0, 60, size=(4 * per_class, 16, 16, 3))
        labels = np.repeat(np.arange(4), per_class)
        stripes = (np.arange(16) // 2 % 2 * 180)[None, :, None]
        for i, label in enumerate(labels):
            images[i, :, :, label % 3] += stripes[..., 0] if label < 3 else stripes[..., 0].T
        splits[split] = (np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64))
    write_array_dataset(out, "tiny-rgb", splits["train"], splits["test"], ["r", "g", "b", "t"], "tests")
    return out


def test_knn_eval_and_finetune_accept_released_checkpoints(
    suncet_file, rgb_dataset: Path, tiny_overrides: list[str], tmp_path: Path
) -> None:
    path, encoder, _ = suncet_file
    data = ["data.dataset=array", f"data.path={rgb_dataset}", "data.labels_per_class=4", "run.num_threads=1"]
    result = knn_eval_command(path, None, [*data, "eval.knn_k=3"], output=tmp_path / "k.json", console=QUIET)
    assert result.bank_size == 16 and result.queries == 32 and result.embedding == "prediction"
    # independent float64 PAWS-NN with the source encoder and the same bank
    from paws_cli.data.augment.views import eval_transform
    from paws_cli.data.backends.memory import as_nchw, labelled_indices
    from paws_cli.data.datasets.arrays import load_array_dataset

    ds = load_array_dataset(rgb_dataset)
    settings = load_settings("fmnist_demo", data, environ={})
    labelled, _ = labelled_indices(settings.data, ds)
    with torch.no_grad():
        bank = encoder.embed(eval_transform(as_nchw(ds.train_images[labelled]), ds.mean, ds.std)).double()
        queries = encoder.embed(eval_transform(as_nchw(ds.test_images), ds.mean, ds.std)).double()
    sims = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(bank, dim=1).T
    onehot = torch.nn.functional.one_hot(torch.as_tensor(ds.train_labels[labelled]), 4).double()
    probs = torch.softmax(sims / 0.1, dim=1) @ onehot
    top2 = probs.topk(2, dim=1).values
    assert (
        top2[:, 0] - top2[:, 1]
    ).min() > 1e-6  # no near-ties: float32 and float64 must agree on the winner
    expected = 100.0 * (probs.argmax(1) == torch.as_tensor(ds.test_labels)).double().mean().item()
    assert result.paws_nn_top1 == pytest.approx(expected, abs=1e-9)
    assert (tmp_path / "k.json").is_file()

    ft = finetune_command(
        path,
        None,
        [
            *data,
            *(f"run.out_dir={tmp_path}", "run.progress=false", "augment.large_size=16", "run.precision=fp32"),
            *("finetune.epochs=1", "finetune.batch_size=4", "finetune.val_per_class=1"),
        ],
        console=QUIET,
        resume=False,
        overwrite=False,
    )
    assert ft.complete and ft.pretrained_kind == "suncet" and ft.train_images == 12
    assert Path(ft.run_dir).name == "paws_imgnt_10percent_300ep_finetune"
    with pytest.raises(ValueError, match="3-channel images"):
        grey = [o for o in tiny_overrides if not o.startswith("model.")]  # the architecture is the file's
        finetune_command(path, "fmnist_demo", grey, console=QUIET, resume=False, overwrite=False)
