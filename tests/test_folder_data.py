"""ImageFolder data (data.format=folder): the folder index, the per-view pipeline, batches from DataLoader
workers (shapes, normalisation, independence, worker-count and resume invariance, distributed sharding), split
resolution, unreadable images, the evaluation data, fine-tuning's folder batches and splits, and a short
`paws pretrain` (with a mid-epoch resume) + `paws knn-eval` + `paws finetune` on a folder.

Everything runs on a small ImageNet-layout folder of real JPEGs (tests/imagefolder_fixture.py).
"""

from __future__ import annotations

import gc
import json
import multiprocessing as mp
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from imagefolder_fixture import make_imagefolder
from PIL import Image
from torchvision.datasets import ImageFolder
from typer.testing import CliRunner

from paws_cli.cli import app
from paws_cli.config.schema import Settings
from paws_cli.data.backends import folder as fd
from paws_cli.data.backends.eval_data import FolderEvalData, build_eval_data, folder_eval_transform
from paws_cli.data.needs import needs_of
from paws_cli.data.sampling.samplers import UnlabelledOrder
from paws_cli.data.sources import TrainDataLike, build_train_data
from paws_cli.finetune.data import FinetuneData, FolderFinetuneBatches, make_finetune_splits

CPU = torch.device("cpu")
MEAN = torch.tensor(fd.IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(fd.IMAGENET_STD).view(1, 3, 1, 1)
NUM_CLASSES, PER_CLASS = 4, 8  # 32 train images: 4 steps of 8, or 4 steps of 2 x 4 with two ranks


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_imagefolder(
        tmp_path_factory.mktemp("folder") / "ds",
        num_classes=NUM_CLASSES,
        per_class=PER_CLASS,
        val_per_class=2,
        size=(80, 60),
    )


def settings_for(root: Path, **changes: object) -> Settings:
    """Tiny folder settings; ``changes`` are dotted keys (``data__num_workers=2`` -> data.num_workers)."""
    tree: dict[str, dict[str, object]] = {
        "data": {
            "dataset": "imagefolder",
            "format": "folder",
            "path": str(root / "train"),
            "val_path": str(root / "val"),
            "num_workers": 0,
            "labels_per_class": 4,
        },
        "augment": {"large_size": 24, "small_size": 12, "num_small": 2, "support_views": 2},
        "paws": {"classes_per_batch": 4, "images_per_class": 2},
        "optim": {"batch_size": 8},
    }
    for key, value in changes.items():
        section, name = key.split("__")
        tree.setdefault(section, {})[name] = value
    return Settings.model_validate(tree)


def all_batches(data: TrainDataLike, epoch: int = 0, first_step: int = 0) -> list[dict[str, object]]:
    out = []
    for batch in data.epoch(epoch, first_step):
        out.append({"views": batch.views, "supports": batch.supports, "classes": batch.support_classes})
    return out


def assert_same_batches(a: list[dict[str, object]], b: list[dict[str, object]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["classes"], y["classes"])
        for key in ("views", "supports"):
            assert len(x[key]) == len(y[key])
            for u, v in zip(x[key], y[key], strict=True):
                assert torch.equal(u, v)


# ----------------------------------------------------------------------------------------------- the index


def test_index_is_torchvision_imagefolder_order(dataset_root: Path) -> None:
    index = fd.scan_image_folder(dataset_root / "train")
    reference = ImageFolder(str(dataset_root / "train"))
    assert index.classes == reference.classes
    assert [index.path(i) for i in range(len(index))] == [p for p, _ in reference.samples]
    assert index.labels.tolist() == [c for _, c in reference.samples]


def test_folder_errors_name_the_path(dataset_root: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data\.path=.*nowhere does not exist"):
        fd.scan_image_folder(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"split folders \['train', 'val'\].*data\.path=.*train"):
        fd.scan_image_folder(dataset_root)
    copy = tmp_path / "copy"
    shutil.copytree(dataset_root / "train", copy)
    (copy / "n09999999").mkdir()
    (copy / "n09999999" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"1 class folder\(s\) of data\.path=.*hold no images: .*n09999999"):
        fd.scan_image_folder(copy)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="has no class folders"):
        fd.scan_image_folder(empty, key="data.val_path")


# ----------------------------------------------------------------------------------------------- one view


def test_same_image_gets_independent_views_per_position_and_view(dataset_root: Path) -> None:
    data = build_train_data(settings_for(dataset_root), device=CPU)
    views = data.views
    a = views[fd.Key(fd.UNLABELLED, 3, 0, 5)]
    again = views[fd.Key(fd.UNLABELLED, 3, 0, 5)]
    other_position = views[fd.Key(fd.UNLABELLED, 3, 1, 5)]
    other_step = views[fd.Key(fd.UNLABELLED, 4, 0, 5)]
    assert len(a.views) == 2 + 2  # 2 large + num_small small views
    for u, v in zip(a.views, again.views, strict=True):
        assert torch.equal(u, v)  # a pure function of (seed, rank, step, role, position, view)
    assert not torch.equal(a.views[0], a.views[1])  # the two large views of one sample differ
    assert not torch.equal(a.views[2], a.views[3])
    assert not torch.equal(a.views[0], other_position.views[0])
    assert not torch.equal(a.views[0], other_step.views[0])
    support = views[fd.Key(fd.SUPPORT, 3, 0, 5)]
    assert len(support.views) == 2 and not torch.equal(support.views[0], a.views[0])


# ----------------------------------------------------------------------------------------------- batches


def test_batches_have_the_right_shapes_and_normalisation(dataset_root: Path) -> None:
    data = build_train_data(settings_for(dataset_root), device=CPU)
    assert isinstance(data, fd.FolderTrainData) and isinstance(data, TrainDataLike)
    assert (data.num_classes, data.in_chans, data.steps_per_epoch) == (NUM_CLASSES, 3, 4)
    batches = list(data.epoch(0, 0))
    assert len(batches) == 4
    labels = data.index.labels
    for batch in batches:
        assert [tuple(v.shape) for v in batch.views] == [(8, 3, 24, 24)] * 2 + [(8, 3, 12, 12)] * 2
        assert [tuple(v.shape) for v in batch.supports] == [(8, 3, 24, 24)] * 2
        for view in [*batch.views, *batch.supports]:
            assert view.dtype == torch.float32 and view.device == CPU
            # undoing ImageNet normalisation gives 8-bit pixel values: x = (k / 255 - mean) / std
            pixels = (view.double() * STD.double() + MEAN.double()) * 255
            assert (pixels - pixels.round()).abs().max() < 1e-3
            assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3
        # the support layout is P rounds of the same K classes, and classes are the images' labels
        classes = batch.support_classes
        assert classes.dtype == torch.long and torch.equal(classes[:4], classes[4:])
        assert sorted(classes[:4].tolist()) == list(range(NUM_CLASSES))
        unlabelled_ids, support_ids = data.last_ids if data.last_ids else (None, None)
    assert torch.equal(torch.as_tensor(labels[support_ids.numpy()]), batches[-1].support_classes)
    assert set(support_ids.tolist()) <= set(data.labelled.tolist())
    assert unlabelled_ids is not None and len(unlabelled_ids) == 8


def test_results_do_not_depend_on_the_number_of_workers(dataset_root: Path) -> None:
    serial = all_batches(build_train_data(settings_for(dataset_root, data__num_workers=0), device=CPU))
    parallel = all_batches(build_train_data(settings_for(dataset_root, data__num_workers=2), device=CPU))
    assert_same_batches(serial, parallel)


def test_mid_epoch_state_round_trip_gives_the_same_batches(dataset_root: Path) -> None:
    settings = settings_for(dataset_root, data__num_workers=2)
    straight = all_batches(build_train_data(settings, device=CPU)) + all_batches(
        build_train_data(settings, device=CPU), epoch=1, first_step=4
    )
    straight_e0 = straight[:4]
    first = build_train_data(settings, device=CPU)
    seen = []
    batches = first.epoch(0, 0)
    for _ in range(2):
        batch = next(batches)
        seen.append({"views": batch.views, "supports": batch.supports, "classes": batch.support_classes})
    state = json.loads(json.dumps(first.state_dict()))  # plain data; the workers ran ahead, the state did not
    assert state["unlabelled"]["position"] == state["supports"]["position"] == 2
    del batches
    assert_same_batches(seen, straight_e0[:2])
    resumed = build_train_data(settings, device=CPU)
    resumed.load_state_dict(state)
    assert_same_batches(all_batches(resumed, epoch=0, first_step=2), straight_e0[2:])
    # the same object also continues where it was (not where its prefetching got to)
    assert_same_batches(all_batches(first, epoch=0, first_step=2), straight_e0[2:])
    second = build_train_data(settings, device=CPU)
    assert_same_batches(all_batches(second, 1, 4), straight[4:])


def test_ranks_cover_the_epoch_disjointly(dataset_root: Path) -> None:
    world = 2
    settings = settings_for(
        dataset_root, optim__batch_size=4, paws__classes_per_batch=2, paws__images_per_class=2
    )
    unlabelled: dict[int, list[int]] = {}
    support_classes: dict[int, list[set[int]]] = {}
    for rank in range(world):
        data = build_train_data(settings, device=CPU, world_size=world, rank=rank)
        assert data.steps_per_epoch == 4
        unlabelled[rank], support_classes[rank] = [], []
        for batch in data.epoch(0, 0):
            assert data.last_ids is not None
            unlabelled[rank] += data.last_ids[0].tolist()
            support_classes[rank].append(set(batch.support_classes.tolist()))
    covered = unlabelled[0] + unlabelled[1]
    assert sorted(covered) == list(range(NUM_CLASSES * PER_CLASS))  # every image once, no overlap
    # the same cut as the shared sampler makes
    orders = [UnlabelledOrder(32, 4, world_size=world, rank=r) for r in range(world)]
    assert [unlabelled[r] for r in range(world)] == [torch.cat(list(o)).tolist() for o in orders]
    for step in range(4):  # unique classes per rank: the two ranks' support classes are disjoint
        assert not support_classes[0][step] & support_classes[1][step]
        assert len(support_classes[0][step] | support_classes[1][step]) == 4


def test_supervised_method_gets_supports_only(dataset_root: Path) -> None:
    settings = settings_for(dataset_root)
    data = build_train_data(settings, replace(needs_of(settings), unlabelled_views=False), device=CPU)
    batch = next(iter(data.epoch(0, 0)))
    assert batch.views == [] and len(batch.supports) == 2


def test_workers_end_with_the_data_object_without_the_garbage_collector(dataset_root: Path) -> None:
    """No reference cycle holds a persistent DataLoader: dropping the data object (even mid-epoch, with the
    prefetch ahead) stops its workers at once. Freed by the collector instead, torch's workers stop late (and
    would hold inherited descriptors, such as a run directory's lock, meanwhile)."""
    gc.collect()
    baseline = len(mp.active_children())
    gc.disable()
    try:
        data = build_train_data(settings_for(dataset_root, data__num_workers=2), device=CPU)
        batches = data.epoch(0, 0)
        next(batches)
        assert len(mp.active_children()) == baseline + 2
        del batches, data
        assert len(mp.active_children()) == baseline
        finetune = _finetune_batches(dataset_root, workers=2)
        finetune.batch(0)
        assert len(mp.active_children()) == baseline + 2
        del finetune
        assert len(mp.active_children()) == baseline
    finally:
        gc.enable()


# ----------------------------------------------------------------------------------------------- the labelled subset


def test_split_file_names_resolve_to_imagefolder_indices(dataset_root: Path, tmp_path: Path) -> None:
    index = fd.scan_image_folder(dataset_root / "train")
    chosen = [3, 9, 17, 30, 1, 12, 20, 25]  # two per class
    split = tmp_path / "names.txt"
    split.write_text("\n".join(Path(index.files[i]).name for i in chosen) + "\n")
    data = build_train_data(settings_for(dataset_root, data__split=str(split)), device=CPU)
    assert data.labelled.tolist() == sorted(chosen)
    assert "split file" in data.labelled_description


def test_split_errors(dataset_root: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    missing.write_text("n01440764_1.JPEG\nn01440764_999.JPEG\nn01440764_998.JPEG\n")
    with pytest.raises(ValueError, match=r"2 of 3 names in split file .* are not in the image folder.*999"):
        build_train_data(settings_for(dataset_root, data__split=str(missing)), device=CPU)
    indices = tmp_path / "indices.txt"
    indices.write_text("0\n1\n2\n")
    with pytest.raises(ValueError, match=r"lists integer indices.*file-name split"):
        build_train_data(settings_for(dataset_root, data__split=str(indices)), device=CPU)
    with pytest.raises(ValueError, match=r"12811 names in .* are not in the image folder"):
        build_train_data(settings_for(dataset_root, data__split="official:1%"), device=CPU)
    with pytest.raises(FileNotFoundError, match="no random fallback"):
        build_train_data(settings_for(dataset_root, data__split=str(tmp_path / "absent.txt")), device=CPU)


def test_seeded_draw_is_class_balanced_and_seeded(dataset_root: Path) -> None:
    a = build_train_data(settings_for(dataset_root, data__labels_per_class=3), device=CPU)
    b = build_train_data(settings_for(dataset_root, data__labels_per_class=3), device=CPU)
    c = build_train_data(settings_for(dataset_root, data__labels_per_class=3, data__split_seed=1), device=CPU)
    assert torch.equal(a.labelled, b.labelled) and not torch.equal(a.labelled, c.labelled)
    counts = np.bincount(a.index.labels[a.labelled.numpy()], minlength=NUM_CLASSES)
    assert counts.tolist() == [3] * NUM_CLASSES


# ----------------------------------------------------------------------------------------------- unreadable images


@pytest.fixture()
def damaged_root(dataset_root: Path, tmp_path: Path) -> tuple[Path, list[str], Path]:
    """A copy with one truncated and one garbage JPEG, and a split that labels neither."""
    root = tmp_path / "damaged"
    shutil.copytree(dataset_root, root)
    index = fd.scan_image_folder(root / "train")
    bad = [index.files[2], index.files[21]]
    data = (root / "train" / bad[0]).read_bytes()
    (root / "train" / bad[0]).write_bytes(data[: len(data) // 3])  # truncated
    (root / "train" / bad[1]).write_bytes(b"this is not a JPEG at all")
    labelled = [f for i, f in enumerate(index.files) if f not in bad and i % PER_CLASS < 4]
    split = tmp_path / "split.txt"
    split.write_text("\n".join(labelled) + "\n")
    return root, bad, split


def test_collate_replaces_unreadable_samples_within_the_batch() -> None:
    def sample(role: int, pos: int, image: int, label: int, ok: bool) -> fd.Sample:
        views = [torch.full((3, 2, 2), image, dtype=torch.uint8)] if ok else None
        return fd.Sample(fd.Key(role, 0, pos, image), label, views, f"/x/{image}.JPEG", None if ok else "bad")

    samples = [
        sample(fd.UNLABELLED, 0, 10, 0, True),
        sample(fd.UNLABELLED, 1, 11, 1, False),
        sample(fd.UNLABELLED, 2, 12, 2, True),
        sample(fd.UNLABELLED, 3, 13, 3, False),  # the last one wraps around to the first good one
        sample(fd.SUPPORT, 0, 20, 0, False),  # same class at position 2
        sample(fd.SUPPORT, 1, 21, 1, True),
        sample(fd.SUPPORT, 2, 22, 0, True),
        sample(fd.SUPPORT, 3, 23, 1, True),
    ]
    out = fd.collate_batch(samples)
    assert out["unlabelled_ids"].tolist() == [10, 12, 12, 10]
    assert out["support_ids"].tolist() == [22, 21, 22, 23]
    assert out["support_classes"].tolist() == [0, 1, 0, 1]
    assert out["unlabelled_views"][0][:, 0, 0, 0].tolist() == [10, 12, 12, 10]
    assert [p for p, _ in out["failures"]] == ["/x/11.JPEG", "/x/13.JPEG", "/x/20.JPEG"]
    lonely = fd.collate_batch([sample(fd.SUPPORT, 0, 30, 4, False), sample(fd.SUPPORT, 1, 31, 5, True)])
    assert lonely["support_classes"].tolist() == [5, 5]  # no image of its class: any good one stands in
    nothing = fd.collate_batch([sample(fd.UNLABELLED, 0, 1, 0, False)])
    assert nothing["empty"] == "unlabelled"


def test_bad_images_skip_counts_and_replaces(damaged_root: tuple[Path, list[str], Path]) -> None:
    root, bad, split = damaged_root
    settings = settings_for(root, data__split=str(split), data__num_workers=2, data__bad_images="skip")
    data = build_train_data(settings, device=CPU)
    bad_ids = {data.index.files.index(f) for f in bad}
    served: list[int] = []
    for batch in data.epoch(0, 0):
        ids = data.last_ids[0]
        served += ids.tolist()
        assert not bad_ids & set(ids.tolist())
        for i in range(len(ids)):  # a replaced position repeats another sample's views exactly
            twins = [j for j in range(len(ids)) if j != i and ids[j] == ids[i]]
            for j in twins:
                assert torch.equal(batch.views[0][i], batch.views[0][j])
    # every image is drawn once per epoch (32 images, 4 x 8): the two bad ones were skipped, each once
    assert data.skipped_images == 2 and len(served) == 32
    assert sorted(Path(p).name for p in data.skipped_files) == sorted(Path(b).name for b in bad)
    state = data.state_dict()
    assert state["skipped_images"] == 2
    for _ in data.epoch(1, 4):  # the next epoch meets them again; the count goes on
        pass
    assert data.skipped_images == 4
    resumed = build_train_data(settings, device=CPU)
    resumed.load_state_dict(state)
    assert resumed.skipped_images == 2
    # only rank 0 saves checkpoints: another rank does not take over rank 0's count
    two = settings_for(root, data__split=str(split), paws__classes_per_batch=2)
    other = build_train_data(two, device=CPU, world_size=2, rank=1)
    other.load_state_dict(
        build_train_data(two, device=CPU, world_size=2, rank=0).state_dict() | {"skipped_images": 5}
    )
    assert other.skipped_images == 0


def test_bad_images_stop_names_the_file(damaged_root: tuple[Path, list[str], Path]) -> None:
    root, bad, split = damaged_root
    for workers in (0, 2):
        settings = settings_for(
            root, data__split=str(split), data__num_workers=workers, data__bad_images="stop"
        )
        data = build_train_data(settings, device=CPU)
        names = "|".join(re.escape(Path(b).name) for b in bad)
        # No `as err`: a kept exception would hold the DataLoader in a reference cycle, and torch's persistent
        # workers then stop slowly (5 s each) when the garbage collector, not the reference count, frees it.
        with pytest.raises(ValueError, match=rf"cannot read image .*({names}).*data\.bad_images=skip"):
            all_batches(data)


# ----------------------------------------------------------------------------------------------- evaluation data


def test_eval_transform_is_resize_then_centre_crop() -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(50, 70, 3), dtype=np.uint8))
    out = folder_eval_transform(32)(image)
    short = round(32 * 256 / 224)  # 37
    resized = image.resize((int(short * 70 / 50), short), Image.BILINEAR)  # (51, 37)
    left, top = round((51 - 32) / 2), round((37 - 32) / 2)
    expected = np.asarray(resized)[top : top + 32, left : left + 32].transpose(2, 0, 1)
    assert out.shape == (3, 32, 32) and np.array_equal(out.numpy(), expected)


def test_folder_eval_data_batches(dataset_root: Path) -> None:
    data = build_eval_data(settings_for(dataset_root, data__num_workers=2))
    assert isinstance(data, FolderEvalData)
    assert (data.num_classes, data.in_chans) == (NUM_CLASSES, 3)
    ids = np.array([5, 0, 31])
    (images, labels), *rest = list(data.train_batches(ids, batch_size=8))
    assert not rest and images.shape == (3, 3, 24, 24) and images.dtype == torch.float32
    assert labels.tolist() == data.train_labels[ids].tolist()
    expected = folder_eval_transform(24)(fd.decode_rgb(data.train.path(0))).float() / 255
    assert torch.allclose(images[1], ((expected - MEAN[0]) / STD[0]), atol=1e-6)
    queries = list(data.query_batches(batch_size=3))
    assert [len(y) for _, y in queries] == [3, 3, 2]
    assert torch.cat([y for _, y in queries]).tolist() == data.query_labels.tolist()
    shard = torch.cat([y for _, y in data.query_batches(batch_size=3, rank=1, world_size=2)])
    assert shard.tolist() == data.query_labels[1::2].tolist()


def test_eval_data_errors(dataset_root: Path, tmp_path: Path) -> None:
    data = build_eval_data(settings_for(dataset_root, data__val_path=None))
    with pytest.raises(ValueError, match=r"needs data\.val_path"):
        list(data.query_batches(4))
    val = tmp_path / "val"
    shutil.copytree(dataset_root / "val", val)
    shutil.rmtree(sorted(val.iterdir())[0])
    data = build_eval_data(settings_for(dataset_root, data__val_path=str(val)))
    with pytest.raises(ValueError, match="they must be the same"):
        list(data.query_batches(4))
    settings = settings_for(dataset_root)
    settings.data.format = "ffcv"
    settings.data.path = str(tmp_path / "x.beton")
    with pytest.raises(ValueError, match=r"data\.format=folder"):
        build_eval_data(settings)


# ----------------------------------------------------------------------------------------------- fine-tuning


def _finetune_batches(root: Path, workers: int) -> FolderFinetuneBatches:
    settings = settings_for(root, data__num_workers=workers, finetune__batch_size=4)
    data = FinetuneData(settings, build_eval_data(settings), np.arange(0, 32, 2), device=CPU)
    assert isinstance(data.batches, FolderFinetuneBatches)
    return data.batches


def test_folder_finetune_batches_are_functions_of_the_step(dataset_root: Path) -> None:
    sequential = _finetune_batches(dataset_root, workers=2)
    assert sequential.steps_per_epoch == 4 and sequential.global_batch == 4
    runs = [sequential.batch(step) for step in range(6)]
    for x, _ in runs:
        assert x.shape == (4, 3, 24, 24) and x.dtype == torch.float32
    jumped = _finetune_batches(dataset_root, workers=0)
    x5, y5 = jumped.batch(5)  # straight to step 5, as a resumed run does, without workers
    assert torch.equal(x5, runs[5][0]) and torch.equal(y5, runs[5][1])
    x2, _ = jumped.batch(2)  # going back restarts the stream at that step
    assert torch.equal(x2, runs[2][0])
    for step, (_, y) in enumerate(runs):  # the labels are those of the images the step selects
        ids = sequential.indices(step).numpy()
        assert y.tolist() == sequential.index.labels[ids].tolist()
    assert not torch.equal(runs[0][0], runs[4][0])  # step 4 revisits epoch 1's images with new views


def test_finetune_val_split_names_resolve_on_folders(dataset_root: Path, tmp_path: Path) -> None:
    index = fd.scan_image_folder(dataset_root / "train")
    held = [5, 13, 22, 30]  # not in the labelled subset below
    val = tmp_path / "val.txt"
    val.write_text("\n".join(Path(index.files[i]).name for i in held) + "\n")
    settings = settings_for(dataset_root, finetune__val_split=str(val))
    data = build_eval_data(settings)
    labelled = np.array([0, 1, 2, 8, 9, 10, 16, 17, 18, 24, 25, 26])
    splits = make_finetune_splits(settings, data, labelled)
    assert splits.heldout.tolist() == held and splits.train.tolist() == labelled.tolist()
    indices = tmp_path / "indices.txt"
    indices.write_text("5\n13\n")
    with pytest.raises(ValueError, match=r"lists integer indices.*official:val"):
        make_finetune_splits(settings_for(dataset_root, finetune__val_split=str(indices)), data, labelled)


# ----------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_pretrain_resume_knn_eval_and_finetune_on_a_folder(dataset_root: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    common = [
        "pretrain",
        "--recipe",
        "fmnist_demo",
        "data.dataset=imagefolder",
        "data.format=folder",
        f"data.path={dataset_root / 'train'}",
        f"data.val_path={dataset_root / 'val'}",
        "data.num_workers=2",
        "data.labels_per_class=4",
        "augment.large_size=24",
        "augment.small_size=12",
        "augment.num_small=2",
        "paws.classes_per_batch=4",
        "paws.images_per_class=2",
        "optim.batch_size=8",
        "optim.epochs=2",
        "optim.warmup_epochs=0.5",
        "model.proj_hidden_dim=32",
        "model.proj_out_dim=32",
        "model.channels_last=false",
        "run.precision=fp32",
        "run.device=cpu",
        f"run.out_dir={tmp_path / 'runs'}",
        "run.progress=false",
        "run.log_every=1",
    ]
    result = runner.invoke(app, [*common, "run.name=straight"])
    assert result.exit_code == 0, result.output
    assert "imagefolder at" in result.output and "DataLoader worker" in result.output
    result = runner.invoke(app, [*common, "run.name=resumed", "run.max_steps=3"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, [*common, "run.name=resumed", "--resume"])
    assert result.exit_code == 0, result.output
    straight = torch.load(tmp_path / "runs" / "straight" / "checkpoint.pt", weights_only=True)
    resumed = torch.load(tmp_path / "runs" / "resumed" / "checkpoint.pt", weights_only=True)
    assert straight["step"] == resumed["step"] == 8
    for key, value in straight["model"].items():  # resumed mid-epoch with the same views: the same weights
        assert torch.equal(value, resumed["model"][key]), key
    checkpoint = tmp_path / "runs" / "straight" / "checkpoint.pt"
    result = runner.invoke(app, ["knn-eval", str(checkpoint), "eval.knn_k=3"])
    assert result.exit_code == 0, result.output
    evaluation = json.loads((checkpoint.parent / "knn_eval.json").read_text())
    assert evaluation["dataset"] == "imagefolder" and evaluation["queries"] == 2 * NUM_CLASSES
    assert evaluation["bank_size"] == 4 * NUM_CLASSES and evaluation["unreadable_images"] == 0
    assert 0.0 <= evaluation["paws_nn_top1"] <= 100.0
    finetune_args = ["finetune.epochs=2", "finetune.batch_size=4", "finetune.val_per_class=1", "run.name=ft"]
    result = runner.invoke(app, ["finetune", str(checkpoint), *finetune_args])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "runs" / "ft" / "finetune.json").read_text())
    assert report["dataset"] == "imagefolder" and report["complete"]
    assert (report["train_images"], report["heldout_images"], report["test_images"]) == (
        12,
        4,
        2 * NUM_CLASSES,
    )
    assert 0.0 <= report["test_top1"] <= 100.0 and report["selected_epoch"] in (1, 2)
