"""FFCV training data (data.format=ffcv): the decode-once multi-crop decoder, its crop law and seeding, batches
(shapes, the images the samplers chose, class-stratified supports, sharding over ranks, exact mid-epoch resume,
independence of thread count), split resolution through the sidecar, the install/sidecar errors, and a short
`paws pretrain` that resumes to the same weights.

Two .beton files are made with the real converter (`paws convert-dataset imagefolder`): real JPEGs from the shared
fixture, and a "coded" one of flat-colour images stored raw, whose pixels say which image and class they are, so
a view can be traced back to the image it was cut from whatever its crop and flip.
"""

from __future__ import annotations

import importlib.util
import math
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from imagefolder_fixture import make_imagefolder, wnid
from PIL import Image
from test_ffcv_crops import stream
from typer.testing import CliRunner

from paws_cli.cli import app
from paws_cli.config.schema import Settings
from paws_cli.data.backends.folder import IMAGENET_MEAN, IMAGENET_STD, folder_labelled, scan_image_folder
from paws_cli.data.backends.sidecar import read_sidecar, sidecar_path
from paws_cli.data.needs import needs_of
from paws_cli.data.sampling.samplers import SupportSampler, UnlabelledOrder
from paws_cli.data.splits.files import write_split

HAS_FFCV = importlib.util.find_spec("ffcv") is not None
needs_ffcv = pytest.mark.skipif(
    not HAS_FFCV, reason="ffcv is not installed here (`make setup` installs the ffcv extra)"
)
CPU = torch.device("cpu")
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
CODED_CLASSES, CODED_PER_CLASS = 4, 12  # 48 flat-colour images


def coded_colour(uid: int, label: int) -> tuple[int, int, int]:
    """The colour of coded image ``uid``: red names the image, green its class."""
    return 3 + 5 * uid, 20 + 60 * label, 90


def convert(src: Path, out: Path, **kwargs: object) -> Path:
    from data_tools.convert_imagefolder import convert_imagefolder

    convert_imagefolder(src, out, progress=False, workers=1, **kwargs)
    return out


@pytest.fixture(scope="module")
def jpeg_beton(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes x 8 real JPEGs (96x72), stored as JPEG in the .beton."""
    if not HAS_FFCV:
        pytest.skip("ffcv is not installed")
    root = make_imagefolder(
        tmp_path_factory.mktemp("jpeg") / "ds", num_classes=4, per_class=8, val_per_class=0, size=(96, 72)
    )
    return convert(root / "train", root / "train.beton", max_resolution=96)


@pytest.fixture(scope="module")
def coded_beton(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 flat-colour PNGs of assorted sizes in ImageNet layout, stored raw (exact pixels) in the .beton."""
    if not HAS_FFCV:
        pytest.skip("ffcv is not installed")
    train = tmp_path_factory.mktemp("coded") / "train"
    for label in range(CODED_CLASSES):
        (train / wnid(label)).mkdir(parents=True)
        for i in range(CODED_PER_CLASS):
            uid = label * CODED_PER_CLASS + i
            size = (30 + 7 * (uid % 5), 24 + 5 * (uid % 7))
            image = Image.new("RGB", size, coded_colour(uid, label))
            image.save(train / wnid(label) / f"{wnid(label)}_{uid}.png")
    return convert(train, train.parent / "coded.beton", write_mode="raw", max_resolution=0)


@pytest.fixture(scope="module")
def noise_beton(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 random-noise PNGs of assorted sizes, stored raw: every pixel of a view can be checked exactly."""
    if not HAS_FFCV:
        pytest.skip("ffcv is not installed")
    train = tmp_path_factory.mktemp("noise") / "train"
    rng = np.random.default_rng(0)
    for label in range(2):
        (train / wnid(label)).mkdir(parents=True)
        for i in range(3):
            size = (40 + 9 * i, 30 + 11 * (i + label))
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(train / wnid(label) / f"{wnid(label)}_{i}.png")
    return convert(train, train.parent / "noise.beton", write_mode="raw", max_resolution=0)


def settings_for(beton: Path, **changes: object) -> Settings:
    """Tiny ffcv settings; ``changes`` are dotted keys (``optim__batch_size=4`` -> optim.batch_size)."""
    tree: dict[str, dict[str, object]] = {
        "data": {
            "dataset": "imagefolder",
            "format": "ffcv",
            "path": str(beton),
            "num_workers": 2,
            "labels_per_class": 4,
        },
        "augment": {"large_size": 24, "small_size": 12, "num_small": 2},
        "paws": {"classes_per_batch": 4, "images_per_class": 2},
        "optim": {"batch_size": 8},
        "model": {"channels_last": False},
    }
    for key, value in changes.items():
        section, name = key.split("__")
        tree.setdefault(section, {})[name] = value
    return Settings.model_validate(tree)


def no_colour(beton: Path, **changes: object) -> Settings:
    """Settings whose views keep their pixels' colours (crops and flips only)."""
    return settings_for(
        beton, augment__jitter_p=0.0, augment__grayscale_p=0.0, augment__blur_p=0.0, **changes
    )


def make_data(settings: Settings, **kwargs: object):
    from paws_cli.data.backends.ffcv_loader import FFCVTrainData

    return FFCVTrainData(settings, device=CPU, **kwargs)


def all_batches(data: object, epoch: int = 0, first_step: int = 0) -> list[dict[str, object]]:
    return [
        {"views": b.views, "supports": b.supports, "classes": b.support_classes}
        for b in data.epoch(epoch, first_step)  # type: ignore[attr-defined]
    ]


def assert_same_batches(a: list[dict[str, object]], b: list[dict[str, object]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["classes"], y["classes"])
        for key in ("views", "supports"):
            assert len(x[key]) == len(y[key])
            for u, v in zip(x[key], y[key], strict=True):
                assert torch.equal(u, v)


def coded_ids(views: torch.Tensor, beton: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(.beton index, class from the pixels) of every coded view; checks each view is one flat colour."""
    pixels = (views * STD + MEAN) * 255.0
    levels = pixels.round()
    assert (pixels - levels).abs().max() < 1e-3  # exact 8-bit levels: no colour op touched them
    flat = levels.flatten(2)
    assert torch.equal(flat.amax(2), flat.amin(2))  # a crop of a flat image is flat
    uid = (levels[:, 0, 0, 0].long() - 3) // 5
    label = (levels[:, 1, 0, 0].long() - 20) // 60
    sidecar = read_sidecar(beton)
    by_uid = {int(f.rsplit("_", 1)[1].split(".")[0]): i for i, f in enumerate(sidecar.files)}
    return torch.tensor([by_uid[int(u)] for u in uid]), label


@needs_ffcv
def test_decoder_cuts_the_drawn_crops_exactly(noise_beton: Path) -> None:
    import cv2
    from ffcv.loader import Loader
    from ffcv.pipeline import PipelineSpec
    from ffcv.transforms import ToTensor

    from paws_cli.data.backends import ffcv_ops

    groups = [ffcv_ops.CropGroup(24, 2, (0.14, 1.0)), ffcv_ops.CropGroup(12, 3, (0.05, 0.3), flip_p=0.5)]
    sidecar = read_sidecar(noise_beton)
    n, key = sidecar.num_images, 987654321
    decoder = ffcv_ops.MultiCropDecoder(groups, key=key, num_samples=n)
    order = ffcv_ops.PlannedOrder(np.zeros(n, dtype=np.uint64))
    loader = Loader(
        str(noise_beton),
        batch_size=n,
        num_workers=2,
        order=order,
        os_cache=True,
        seed=0,
        pipelines={
            "image": None,
            "label": None,
            "views": PipelineSpec("image", decoder=decoder, transforms=[ToTensor()]),
        },
    )
    samples, tokens = np.array([4, 0, 5, 2, 1, 3]), np.arange(n) + 1000
    order.plan(ffcv_ops.encode_tokens(samples, tokens, n))
    rows = next(iter(loader))[0].numpy().copy()
    flips = 0
    for i, (sample, token) in enumerate(zip(samples, tokens, strict=True)):
        image = np.asarray(Image.open(noise_beton.parent / "train" / sidecar.files[sample]))
        height, width = image.shape[:2]
        offset, v = 0, 0
        for group in groups:
            for _ in range(group.count):
                state = stream(np.uint64(key), int(token), v)
                logs = (math.log(group.ratio[0]), math.log(group.ratio[1]))
                top, left, h, w = ffcv_ops.crop_box(state, height, width, *group.scale, *logs)
                expected = cv2.resize(
                    image[top : top + h, left : left + w],
                    (group.size, group.size),
                    interpolation=cv2.INTER_AREA,
                )
                if ffcv_ops.stream_uniform(state, ffcv_ops._DRAW_FLIP) < group.flip_p:
                    expected, flips = expected[:, ::-1], flips + 1
                got = rows[i, offset : offset + group.view_bytes].reshape(group.size, group.size, 3)
                assert np.array_equal(got, expected), (i, v)
                offset, v = offset + group.view_bytes, v + 1
    assert 0 < flips < 5 * n  # both outcomes of the flip draws occur


# ----------------------------------------------------------------------------------------------- batches


@needs_ffcv
def test_views_are_cut_from_the_images_the_samplers_chose(coded_beton: Path) -> None:
    data = make_data(no_colour(coded_beton))
    expected = list(UnlabelledOrder(48, 8, seed=0))
    batches = all_batches(data)
    assert len(batches) == data.steps_per_epoch == 6
    for batch, order in zip(batches, expected, strict=True):
        assert len(batch["views"]) == 4  # 2 large + 2 small
        for view in batch["views"]:
            ids, labels = coded_ids(view, coded_beton)
            assert torch.equal(ids, order)
            assert torch.equal(labels, torch.as_tensor(data.sidecar.labels_array()[order.numpy()]))


@needs_ffcv
def test_supports_are_class_stratified_with_their_labels(coded_beton: Path) -> None:
    data = make_data(no_colour(coded_beton, augment__support_views=2))
    labels = data.sidecar.labels_array()
    sampler = SupportSampler(
        labels[data.labelled.numpy()], classes_per_batch=4, images_per_class=2, batches_per_epoch=6, seed=0
    )
    for batch, expected in zip(all_batches(data), sampler, strict=True):
        assert len(batch["supports"]) == 2
        for view in batch["supports"]:
            ids, pixel_labels = coded_ids(view, coded_beton)
            assert torch.equal(ids, data.labelled[expected])  # the sampler's picks from the labelled subset
            assert torch.equal(pixel_labels, batch["classes"])  # the labels are the images' classes
            assert torch.equal(batch["classes"], torch.as_tensor(labels[ids.numpy()]))
        rounds = batch["classes"].view(2, 4)  # P rounds of one image from each of the K classes
        assert all(len(set(r.tolist())) == 4 for r in rounds) and torch.equal(rounds[0], rounds[1])


@needs_ffcv
def test_ranks_cover_each_epoch_disjointly(coded_beton: Path) -> None:
    world = 3
    seen: dict[int, list[torch.Tensor]] = {}
    for rank in range(world):
        settings = no_colour(coded_beton, optim__batch_size=4, paws__classes_per_batch=1)
        data = make_data(settings, world_size=world, rank=rank)
        assert data.order.world_size == world and data.steps_per_epoch == 4
        expected = list(UnlabelledOrder(48, 4, world_size=world, rank=rank, seed=0))
        for epoch in (0, 1):
            got = [coded_ids(b["views"][0], coded_beton)[0] for b in all_batches(data, epoch, epoch * 4)]
            if epoch == 0:
                assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
            seen.setdefault(epoch, []).extend(got)
    for epoch in (0, 1):
        images = torch.cat(seen[epoch])
        assert len(images) == 48 and len(set(images.tolist())) == 48  # one permutation, split three ways
    assert not torch.equal(torch.cat(seen[0]), torch.cat(seen[1]))


@needs_ffcv
def test_batch_shapes_dtype_device_and_normalisation(jpeg_beton: Path) -> None:
    data = make_data(settings_for(jpeg_beton, augment__support_views=2))
    batch = next(iter(data.epoch(0, 0)))
    assert [tuple(v.shape) for v in batch.views] == [(8, 3, 24, 24)] * 2 + [(8, 3, 12, 12)] * 2
    assert [tuple(v.shape) for v in batch.supports] == [(8, 3, 24, 24)] * 2
    for view in batch.views + batch.supports:
        assert view.dtype == torch.float32 and view.device == CPU and view.is_contiguous()
        pixels = view * STD + MEAN
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert batch.support_classes.dtype == torch.long and batch.support_classes.shape == (8,)
    assert data.name == "imagefolder" and data.num_classes == 4 and data.in_chans == 3
    assert "FFCV file" in data.describe() and data.skipped_images == 0
    channels_last = make_data(settings_for(jpeg_beton, model__channels_last=True))
    batch_cl = next(iter(channels_last.epoch(0, 0)))
    for view in batch_cl.views + batch_cl.supports:
        assert view.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(batch.views, batch_cl.views, strict=True):  # the same numbers in another layout
        assert torch.equal(a, b.contiguous())


@needs_ffcv
def test_views_are_independent_per_sample_and_view(jpeg_beton: Path) -> None:
    batches = all_batches(make_data(settings_for(jpeg_beton, augment__num_small=3)))
    for batch in batches:
        views = batch["views"]
        for i in range(len(views)):
            for j in range(i + 1, len(views)):
                if views[i].shape == views[j].shape:  # no two views of a sample are the same crop
                    differ = (views[i] - views[j]).flatten(1).abs().amax(1) > 1e-3
                    assert differ.all()
    # Crops and colours vary from sample to sample: the large views' pixel means spread out.
    means = torch.cat([b["views"][0].mean(dim=(1, 2, 3)) for b in batches])
    assert len(torch.unique(means)) == len(means)


@needs_ffcv
def test_mid_epoch_resume_gives_the_same_batches(jpeg_beton: Path) -> None:
    import numba

    shared_type = numba.uint8[::1]  # numba's interned type object, a key of numba's internal tables
    settings = settings_for(jpeg_beton, augment__support_views=2)
    straight = all_batches(make_data(settings))
    first = make_data(settings)
    batches = first.epoch(0, 0)
    head = [next(batches), next(batches)]
    state = first.state_dict()
    assert state["unlabelled"]["position"] == state["supports"]["position"] == 2
    batches.close()
    resumed = make_data(settings)
    resumed.load_state_dict(state)
    rest = all_batches(resumed, 0, first_step=2)
    head_dicts = [{"views": b.views, "supports": b.supports, "classes": b.support_classes} for b in head]
    assert_same_batches(straight, head_dicts + rest)
    assert resumed.state_dict()["unlabelled"]["position"] == 4
    # Several loaders in one process: unpatched, FFCV 1.0.2 marks that object read-only each time it builds a
    # loader (so its hash changes under numba's feet, see ffcv_ops); the patched reader leaves it alone.
    assert shared_type.mutable
    # The next epoch follows on, with other crops.
    after = all_batches(resumed, 1, first_step=4)
    assert len(after) == 4 and not torch.equal(after[0]["views"][0], straight[0]["views"][0])


@needs_ffcv
def test_batches_do_not_depend_on_the_thread_count(jpeg_beton: Path) -> None:
    threads = torch.get_num_threads()
    one = all_batches(make_data(settings_for(jpeg_beton, data__num_workers=1)))
    two = all_batches(make_data(settings_for(jpeg_beton, data__num_workers=2)))
    assert_same_batches(one, two)
    assert torch.get_num_threads() == threads  # FFCV's thread setting does not leak into torch


@needs_ffcv
def test_another_seed_gives_other_crops(jpeg_beton: Path) -> None:
    def first_supports(**changes: object) -> torch.Tensor:
        settings = settings_for(jpeg_beton, **changes)
        data = make_data(settings, needs=replace(needs_of(settings), unlabelled_views=False))
        return next(iter(data.epoch(0, 0))).supports[0]

    assert not torch.equal(first_supports(), first_supports(run__seed=1))


@needs_ffcv
def test_supervised_method_gets_supports_only(jpeg_beton: Path) -> None:
    settings = settings_for(jpeg_beton)
    data = make_data(settings, needs=replace(needs_of(settings), unlabelled_views=False))
    batches = all_batches(data)
    assert len(batches) == 4 and all(b["views"] == [] for b in batches)
    assert all(len(b["supports"]) == 1 for b in batches)


# ----------------------------------------------------------------------------------------------- labelled subset


@needs_ffcv
def test_seeded_draw_picks_the_same_files_as_the_folder_back_end(jpeg_beton: Path) -> None:
    settings = settings_for(jpeg_beton, data__labels_per_class=3, data__split_seed=5)
    data = make_data(settings)
    index = scan_image_folder(jpeg_beton.parent / "train")
    folder_ids, _ = folder_labelled(settings.data, index)
    assert [data.sidecar.files[i] for i in data.labelled] == [index.files[i] for i in folder_ids]
    assert "seed 5 (12 labelled images)" in data.labelled_description


@needs_ffcv
def test_name_split_resolves_through_the_sidecar(jpeg_beton: Path, tmp_path: Path) -> None:
    sidecar = read_sidecar(jpeg_beton)
    chosen = [sidecar.files[i] for i in (0, 1, 9, 10, 17, 18, 30, 31)]
    bare = tmp_path / "bare.txt"  # official lists name bare files
    bare.write_text("".join(f"{name.split('/')[1]}\n" for name in reversed(chosen)))
    data = make_data(settings_for(jpeg_beton, data__split=str(bare), paws__images_per_class=2))
    assert data.labelled.tolist() == [0, 1, 9, 10, 17, 18, 30, 31]
    assert torch.equal(data.labelled_classes, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    missing = tmp_path / "missing.txt"
    missing.write_text("n01440764_999.JPEG\n")
    with pytest.raises(ValueError, match=r"n01440764_999\.JPEG"):
        make_data(settings_for(jpeg_beton, data__split=str(missing)))
    indices = tmp_path / "indices.txt"
    write_split(indices, np.arange(8), {"kind": "index", "dataset": "x", "per_class": 2, "seed": 0})
    with pytest.raises(ValueError, match="file name"):
        make_data(settings_for(jpeg_beton, data__split=str(indices)))


# ----------------------------------------------------------------------------------------------- errors


def test_missing_ffcv_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from paws_cli.data.backends import ffcv_loader

    monkeypatch.setitem(sys.modules, "ffcv", None)  # `import ffcv` now raises ImportError
    with pytest.raises(ValueError, match="not installed") as info:
        ffcv_loader.require_ffcv()
    message = str(info.value)
    for part in ("make setup", "pip install", "'paws-cli[ffcv]'", "libturbojpeg0-dev", "data.format=folder"):
        assert part in message, part
    beton = tmp_path / "train.beton"
    beton.write_bytes(b"")
    with pytest.raises(ValueError, match="not installed"):
        ffcv_loader.FFCVTrainData(settings_for(beton), device=CPU)
    # The command line prints it verbatim (brackets included) and exits with code 2.
    result = CliRunner().invoke(
        app,
        [
            "pretrain",
            "--recipe",
            "fmnist_demo",
            "data.dataset=imagefolder",
            "data.format=ffcv",
            f"data.path={beton}",
            f"run.out_dir={tmp_path / 'runs'}",
            "run.device=cpu",
        ],
    )
    output = result.output + (result.stderr if result.stderr_bytes else "")
    assert result.exit_code == 2, output
    assert "'paws-cli[ffcv]'" in output


@needs_ffcv
def test_missing_sidecar_or_beton_names_the_files(jpeg_beton: Path, tmp_path: Path) -> None:
    lonely = tmp_path / "copy.beton"
    shutil.copy(jpeg_beton, lonely)
    with pytest.raises(FileNotFoundError) as info:
        make_data(settings_for(lonely))
    assert str(lonely) in str(info.value) and str(sidecar_path(lonely)) in str(info.value)
    with pytest.raises(FileNotFoundError, match="is not a file"):
        make_data(settings_for(tmp_path / "nothing.beton"))
    with pytest.raises(FileNotFoundError, match="is not a file"):
        make_data(settings_for(tmp_path))


# ----------------------------------------------------------------------------------------------- end to end


@needs_ffcv
@pytest.mark.slow
def test_pretrain_on_a_beton_resumes_to_the_same_weights(jpeg_beton: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    common = [
        "pretrain",
        "--recipe",
        "fmnist_demo",
        "data.dataset=imagefolder",
        "data.format=ffcv",
        f"data.path={jpeg_beton}",
        "data.num_workers=2",
        "data.labels_per_class=4",
        "augment.large_size=24",
        "augment.small_size=12",
        "augment.num_small=2",
        "augment.blur_p=0.5",
        "augment.grayscale_p=0.2",
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
    assert "FFCV file" in result.output
    result = runner.invoke(app, [*common, "run.name=resumed", "run.max_steps=3"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, [*common, "run.name=resumed", "--resume"])
    assert result.exit_code == 0, result.output
    straight = torch.load(tmp_path / "runs" / "straight" / "checkpoint.pt", weights_only=True)
    resumed = torch.load(tmp_path / "runs" / "resumed" / "checkpoint.pt", weights_only=True)
    assert straight["step"] == resumed["step"] == 8
    for key, value in straight["model"].items():  # resumed mid-epoch with the same views: the same weights
        assert torch.equal(value, resumed["model"][key]), key
