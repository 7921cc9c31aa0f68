"""SemPPL's DataNeeds served by the folder and FFCV back ends as the in-memory back end serves them: its own views
(L large + S small, per-view BYOL presets), the labels (-1 outside the labelled subset), ids and true labels of the
batch's images, the optional class-stratified labelled sub-batch appended to the batch, sharding over ranks and an
exact mid-epoch resume. (The sibling files test_folder_data.py and test_ffcv_loader.py test PAWS's needs.)

Two folders: real JPEGs from the shared fixture, and "coded" flat-colour PNGs whose pixels say which image and
class they are, so that every row of every view is traced back to the image it was cut from.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from imagefolder_fixture import make_imagefolder, wnid
from PIL import Image

from paws_cli.config.schema import Settings
from paws_cli.data.augment.views import ViewSpec
from paws_cli.data.backends import folder as fd
from paws_cli.data.needs import DataNeeds, needs_of, require_servable
from paws_cli.data.sampling.samplers import SupportSampler, UnlabelledOrder
from paws_cli.data.sources import build_train_data
from paws_cli.methods.semppl import semppl_views

HAS_FFCV = importlib.util.find_spec("ffcv") is not None
BACKENDS = [
    "folder",
    pytest.param("ffcv", marks=pytest.mark.skipif(not HAS_FFCV, reason="ffcv is not installed here")),
]
CPU = torch.device("cpu")
MEAN = torch.tensor(fd.IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(fd.IMAGENET_STD).view(1, 3, 1, 1)
CLASSES, PER_CLASS = 4, 12  # 48 coded images: 6 steps of 8
JPEG_CLASSES, JPEG_PER_CLASS = 4, 8  # 32 JPEGs: 4 steps of 8


def coded_colour(uid: int, label: int) -> tuple[int, int, int]:
    """The colour of coded image ``uid``: red names the image, green its class."""
    return 3 + 5 * uid, 20 + 60 * label, 90


def _convert(train: Path, out: Path, **kwargs: object) -> Path:
    from data_tools.convert_imagefolder import convert_imagefolder

    convert_imagefolder(train, out, progress=False, workers=1, **kwargs)
    return out


@pytest.fixture(scope="module")
def coded_train(tmp_path_factory: pytest.TempPathFactory) -> Path:
    train = tmp_path_factory.mktemp("coded") / "train"
    for label in range(CLASSES):
        (train / wnid(label)).mkdir(parents=True)
        for i in range(PER_CLASS):
            uid = label * PER_CLASS + i
            size = (30 + 7 * (uid % 5), 24 + 5 * (uid % 7))
            Image.new("RGB", size, coded_colour(uid, label)).save(
                train / wnid(label) / f"{wnid(label)}_{uid}.png"
            )
    return train


@pytest.fixture(scope="module")
def jpeg_train(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("jpeg") / "ds"
    make_imagefolder(root, num_classes=JPEG_CLASSES, per_class=JPEG_PER_CLASS, val_per_class=0, size=(80, 60))
    return root / "train"


@pytest.fixture(scope="module")
def betons() -> dict[Path, Path]:
    """The folders' .beton files, converted on first use (only the ffcv cases need them)."""
    return {}


def data_path(backend: str, train: Path, betons: dict[Path, Path]) -> Path:
    """The folder itself, or its .beton (coded PNGs stored raw: exact pixels)."""
    if backend == "folder":
        return train
    if train not in betons:
        coded = next(train.rglob("*.png"), None) is not None
        options = {"write_mode": "raw", "max_resolution": 0} if coded else {"max_resolution": 96}
        betons[train] = _convert(train, train.parent / "train.beton", **options)
    return betons[train]


def settings_for(backend: str, path: Path, **changes: object) -> Settings:
    """SemPPL on a tiny image folder (or its .beton): 4 large 24 px + 2 small 12 px views, batch 8."""
    tree: dict[str, dict[str, object] | str] = {
        "method": "semppl",
        "data": {
            "dataset": "imagefolder",
            "format": backend,
            "path": str(path),
            "num_workers": 2 if backend == "ffcv" else 0,
            "labels_per_class": 3,
        },
        "augment": {"large_size": 24, "small_size": 12, "num_small": 2},
        "semppl": {"num_large": 4},
        "optim": {"batch_size": 8},
        "model": {"channels_last": False},
    }
    for key, value in changes.items():  # section__key, or section__key__subkey
        *path, name = key.split("__")
        node = tree
        for part in path:
            node = node.setdefault(part, {})  # type: ignore[assignment,union-attr]
        node[name] = value  # type: ignore[index]
    return Settings.model_validate(tree)


def no_colour(backend: str, path: Path, **changes: object) -> Settings:
    """Views that keep their pixels' colours (crops and flips only; no BYOL presets)."""
    return settings_for(
        backend,
        path,
        augment__jitter_p=0.0,
        augment__grayscale_p=0.0,
        augment__blur_p=0.0,
        semppl__byol_presets=False,
        **changes,
    )


def file_labels(data: object) -> np.ndarray:
    """Every train image's class, as the back end indexes the images."""
    index = getattr(data, "index", None)
    return index.labels if index is not None else data.sidecar.labels_array()  # type: ignore[attr-defined]


def coded_ids(view: torch.Tensor, data: object) -> tuple[torch.Tensor, torch.Tensor]:
    """(train index, class from the pixels) of every row of a coded view; each row must be one flat colour."""
    levels = ((view * STD + MEAN) * 255.0).round()
    flat = levels.flatten(2)
    assert torch.equal(flat.amax(2), flat.amin(2))  # a crop of a flat image is flat: no colour op touched it
    uid = (levels[:, 0, 0, 0].long() - 3) // 5
    label = (levels[:, 1, 0, 0].long() - 20) // 60
    files = data.index.files if hasattr(data, "index") else data.sidecar.files  # type: ignore[attr-defined]
    by_uid = {int(Path(f).stem.rsplit("_", 1)[1]): i for i, f in enumerate(files)}
    return torch.tensor([by_uid[int(u)] for u in uid]), label


def snapshot(data: object, epoch: int = 0, first_step: int = 0) -> list[dict[str, object]]:
    return [
        {"views": b.views, "supports": b.supports, "labels": b.labels, "ids": b.ids, "true": b.true_labels}
        for b in data.epoch(epoch, first_step)  # type: ignore[attr-defined]
    ]


def assert_same(a: list[dict[str, object]], b: list[dict[str, object]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for key in ("labels", "ids", "true"):
            assert torch.equal(x[key], y[key])  # type: ignore[arg-type]
        assert len(x["views"]) == len(y["views"]) and x["supports"] == y["supports"] == []  # type: ignore[arg-type]
        for u, v in zip(x["views"], y["views"], strict=True):  # type: ignore[call-overload]
            assert torch.equal(u, v)


# ----------------------------------------------------------------------------------------------- the natural rate


@pytest.mark.parametrize("backend", BACKENDS)
def test_views_labels_and_ids_at_the_natural_rate(backend: str, coded_train: Path, betons: dict) -> None:
    settings = no_colour(backend, data_path(backend, coded_train, betons))
    data = build_train_data(settings, device=CPU)
    assert data.supports is None and "supports" not in data.state_dict()
    labels = torch.as_tensor(file_labels(data))
    labelled = set(data.labelled.tolist())
    assert len(labelled) == 3 * CLASSES
    batches = list(data.epoch(0, 0))
    assert len(batches) == data.steps_per_epoch == 6
    for batch, order in zip(batches, UnlabelledOrder(48, 8, seed=0), strict=True):
        assert [tuple(v.shape) for v in batch.views] == [(8, 3, 24, 24)] * 4 + [(8, 3, 12, 12)] * 2
        assert batch.supports == [] and batch.support_classes.numel() == 0
        assert torch.equal(batch.ids, order)  # the shared sampler's images, in its order
        for view in batch.views:  # every view of every row is cut from the image its id names
            ids, pixel_labels = coded_ids(view, data)
            assert torch.equal(ids, batch.ids) and torch.equal(pixel_labels, batch.true_labels)
        assert torch.equal(batch.true_labels, labels[batch.ids])
        inside = torch.tensor([i in labelled for i in batch.ids.tolist()])
        assert torch.equal(batch.labels, torch.where(inside, batch.true_labels, -1))
    assert data.state_dict()["unlabelled"]["position"] == 6


# ----------------------------------------------------------------------------------------------- the sub-batch


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_labelled_sub_batch_joins_the_batch_class_stratified(
    backend: str, coded_train: Path, betons: dict
) -> None:
    settings = no_colour(
        backend,
        data_path(backend, coded_train, betons),
        semppl__labelled_batch__classes_per_batch=4,
        semppl__labelled_batch__images_per_class=2,
    )
    data = build_train_data(settings, device=CPU)
    assert isinstance(data.supports, SupportSampler) and data.supports.section == "semppl.labelled_batch"
    labels = file_labels(data)
    sampler = SupportSampler(
        labels[data.labelled.numpy()], classes_per_batch=4, images_per_class=2, batches_per_epoch=6, seed=0
    )
    batches = list(data.epoch(0, 0))
    for batch, order, picks in zip(batches, UnlabelledOrder(48, 8, seed=0), sampler, strict=True):
        assert [tuple(v.shape) for v in batch.views] == [(16, 3, 24, 24)] * 4 + [(16, 3, 12, 12)] * 2
        assert batch.supports == []
        assert torch.equal(batch.ids[:8], order) and torch.equal(batch.ids[8:], data.labelled[picks])
        for view in batch.views:
            ids, pixel_labels = coded_ids(view, data)
            assert torch.equal(ids, batch.ids) and torch.equal(pixel_labels, batch.true_labels)
        sub = batch.labels[8:]
        assert torch.equal(sub, batch.true_labels[8:]) and (sub >= 0).all()
        rounds = sub.view(2, 4)  # P rounds of one image from each of the K classes
        assert all(sorted(r.tolist()) == list(range(CLASSES)) for r in rounds)
    state = data.state_dict()
    assert state["unlabelled"]["position"] == state["supports"]["position"] == 6


def test_sub_batches_of_two_ranks_have_disjoint_classes(coded_train: Path) -> None:
    settings = no_colour(
        "folder",
        coded_train,
        optim__batch_size=4,
        semppl__labelled_batch__classes_per_batch=2,
        semppl__labelled_batch__images_per_class=1,
    )
    ids: list[list[int]] = []
    classes: list[list[set[int]]] = []
    for rank in range(2):
        data = build_train_data(settings, device=CPU, world_size=2, rank=rank)
        batches = list(data.epoch(0, 0))
        ids.append([i for b in batches for i in b.ids[:4].tolist()])
        classes.append([set(b.labels[4:].tolist()) for b in batches])
    assert sorted(ids[0] + ids[1]) == list(range(48))  # the epoch's images, split between the ranks
    for mine, theirs in zip(*classes, strict=True):  # unique classes per rank (SemPPL's sub-batch)
        assert len(mine) == len(theirs) == 2 and not mine & theirs


# ----------------------------------------------------------------------------------------------- the views


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_view_gets_its_own_spec(backend: str, jpeg_train: Path, betons: dict) -> None:
    settings = settings_for(backend, data_path(backend, jpeg_train, betons))
    plain = ViewSpec(size=24, scale=(0.3, 1.0), jitter_p=0.0, grayscale_p=0.0)
    grey = replace(plain, grayscale_p=1.0)
    small = replace(plain, size=12)
    needs = DataNeeds(views=(grey, plain, grey, grey, small), labels_in_batch=True)
    batch = next(iter(build_train_data(settings, needs, device=CPU).epoch(0, 0)))
    assert [v.shape[-1] for v in batch.views] == [24, 24, 24, 24, 12]
    for view, spec in zip(batch.views, needs.views, strict=True):
        pixels = view * STD + MEAN
        spread = (pixels.amax(1) - pixels.amin(1)).flatten(1).amax(1)  # per row: the largest channel spread
        if spec.grayscale_p == 1.0:
            assert spread.max() < 1e-5
        else:
            assert (spread > 0.05).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_byol_presets_reach_the_views(backend: str, jpeg_train: Path, betons: dict) -> None:
    """Spec 4: blur p = 1 on large views 1, 3; p = 0.1 and solarize 0.2 on the others (grouped per kind)."""
    settings = settings_for(backend, data_path(backend, jpeg_train, betons))
    specs = needs_of(settings).views
    assert specs == semppl_views(settings) and len(specs) == 6
    assert [(s.size, s.blur_p, s.solarize_p) for s in specs] == [(24, 1.0, 0.0)] * 2 + [
        (24, 0.1, 0.2)
    ] * 2 + [(12, 0.1, 0.2)] * 2
    data = build_train_data(settings, device=CPU)
    if backend == "folder":
        built = [t.transforms[4] for t in data.views.transforms[fd.UNLABELLED]]  # RandomPILBlur of each view
        assert [b.p for b in built] == [s.blur_p for s in specs]
    else:
        loader = data._unlabelled
        kinds = [(c.spec, g.count) for c, g in zip(loader.colours, loader.groups, strict=True)]
        assert kinds == [(specs[0], 2), (specs[2], 2), (specs[4], 2)]


# ----------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("backend", BACKENDS)
def test_mid_epoch_resume_gives_the_same_batches(backend: str, jpeg_train: Path, betons: dict) -> None:
    settings = settings_for(
        backend,
        data_path(backend, jpeg_train, betons),
        data__num_workers=2,
        semppl__labelled_batch__classes_per_batch=2,
        semppl__labelled_batch__images_per_class=2,
    )
    straight = snapshot(build_train_data(settings, device=CPU))
    assert len(straight) == 4 and straight[0]["views"][0].shape[0] == 8 + 4  # type: ignore[index]
    first = build_train_data(settings, device=CPU)
    batches = first.epoch(0, 0)
    head = [next(batches), next(batches)]
    state = json.loads(json.dumps(first.state_dict()))  # plain data
    assert state["unlabelled"]["position"] == state["supports"]["position"] == 2
    batches.close()
    resumed = build_train_data(settings, device=CPU)
    resumed.load_state_dict(state)
    rest = snapshot(resumed, 0, first_step=2)
    head_dicts = [
        {"views": b.views, "supports": b.supports, "labels": b.labels, "ids": b.ids, "true": b.true_labels}
        for b in head
    ]
    assert_same(straight, head_dicts + rest)
    after = snapshot(resumed, 1, first_step=4)  # the next epoch follows on, with other images and views
    assert len(after) == 4 and not torch.equal(after[0]["ids"], straight[0]["ids"])  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_pretrain_resumed_mid_epoch_reaches_the_same_weights(
    backend: str, jpeg_train: Path, betons: dict, tmp_path: Path
) -> None:
    """`paws pretrain` of SemPPL (queues, EMA target, a labelled sub-batch) stopped after 3 of 8 steps and resumed
    ends with the weights and queues of an uninterrupted run."""
    from typer.testing import CliRunner

    from paws_cli.cli import app

    common = [
        "pretrain",
        "--recipe",
        "semppl_fmnist_demo",
        "data.dataset=imagefolder",
        f"data.format={backend}",
        f"data.path={data_path(backend, jpeg_train, betons)}",
        "data.num_workers=2",
        "data.labels_per_class=3",
        "augment.large_size=24",
        "augment.small_size=12",
        "semppl.labelled_batch.classes_per_batch=2",
        "semppl.labelled_batch.images_per_class=2",
        "semppl.queue_size=32",
        "semppl.num_negatives=6",
        "optim.batch_size=8",
        "optim.epochs=2",
        "optim.warmup_epochs=0.5",
        "model.channels_last=false",
        "run.precision=fp32",
        "run.device=cpu",
        f"run.out_dir={tmp_path}",
        "run.progress=false",
    ]
    runner = CliRunner()
    for extra in (
        ["run.name=straight"],
        ["run.name=resumed", "run.max_steps=3"],
        ["run.name=resumed", "--resume"],
    ):
        result = runner.invoke(app, [*common, *extra])
        assert result.exit_code == 0, result.output
    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert straight["step"] == resumed["step"] == 8 and "supports" in straight["data"]
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    queues, again = straight["method_state"]["queue"], resumed["method_state"]["queue"]
    assert (queues["labels"] >= 0).any() and queues["ptr"] == again["ptr"]
    assert all(torch.equal(queues[k], again[k]) for k in ("vectors", "labels", "ids"))


def test_what_the_back_ends_cannot_serve_is_refused() -> None:
    with pytest.raises(ValueError, match=r"labels without the views, which only data\.format=memory serves"):
        require_servable(DataNeeds(unlabelled_views=False, labels_in_batch=True), "folder")
    with pytest.raises(
        ValueError, match=r"data\.format=ffcv: this method asks for neither views nor a support"
    ):
        require_servable(DataNeeds(unlabelled_views=False), "ffcv")
