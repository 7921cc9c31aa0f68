"""`paws convert-dataset imagefolder`: ImageFolder -> FFCV .beton + sidecar index, odd files, failures, the reader.

Conversions run on a tiny folder (3 classes of real JPEGs from the shared fixture, ~64x48 px) plus the odd files
a real ImageNet copy holds: a CMYK JPEG, a PNG named .JPEG, a grayscale JPEG, a truncated JPEG and an empty file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from imagefolder_fixture import make_imagefolder
from PIL import Image
from typer.testing import CliRunner

from data_tools import convert_imagefolder as ci
from paws_cli.cli import app
from paws_cli.data.backends import sidecar as sc

HAS_FFCV = importlib.util.find_spec("ffcv") is not None
needs_ffcv = pytest.mark.skipif(
    not HAS_FFCV, reason="ffcv is not installed here (`make setup` installs the ffcv extra; CI has it)"
)

MAX_RES = 32
ODD_GOOD = {  # class index -> odd but readable file
    0: "odd_cmyk.JPEG",
    1: "odd_png.JPEG",
    2: "odd_gray.JPEG",
}
# unreadable file -> class index (the bracketed name checks that reports print names verbatim)
ODD_BAD = {"odd_truncated.JPEG": 0, "odd_empty.JPEG": 1, "odd [x].JPEG": 2}


def _photo(seed: int, size: tuple[int, int] = (60, 45)) -> np.ndarray:
    """A smooth colour image (smooth so that JPEG and resizing errors stay small)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    rng = np.random.default_rng(seed)
    a, b, c = rng.uniform(0.05, 0.2, 3)
    rgb = np.stack(
        [np.sin(a * xx) * 100 + 128, np.cos(b * yy) * 100 + 128, np.sin(c * (xx + yy)) * 100 + 128], -1
    )
    return rgb.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The train root: 3 classes x 4 fixture JPEGs, plus the odd files and one non-image file."""
    root = make_imagefolder(tmp_path_factory.mktemp("src") / "ds", num_classes=3, per_class=4, val_per_class=0,
                            size=(64, 48))  # fmt: skip
    train = root / "train"
    classes = sorted(p.name for p in train.iterdir())
    Image.fromarray(_photo(1)).convert("CMYK").save(
        train / classes[0] / ODD_GOOD[0], format="JPEG", quality=95
    )
    rgba = np.dstack([_photo(2), np.full((45, 60), 200, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(train / classes[1] / ODD_GOOD[1], format="PNG")
    Image.fromarray(_photo(3)).convert("L").save(train / classes[2] / ODD_GOOD[2], format="JPEG", quality=95)
    buf = io.BytesIO()
    Image.fromarray(_photo(4, (200, 150))).save(buf, format="JPEG", quality=95)
    (train / classes[0] / "odd_truncated.JPEG").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 6 // 10])
    (train / classes[1] / "odd_empty.JPEG").write_bytes(b"")
    (train / classes[2] / "odd [x].JPEG").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG after all")
    (train / classes[2] / "notes.txt").write_text("not an image: ignored, as by ImageFolder")
    return train


def _expected_files(train: Path) -> tuple[list[str], list[str], list[int]]:
    """(classes, readable files, labels) in ImageFolder order, computed independently of the converter."""
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    files, labels = [], []
    for label, cls in enumerate(classes):
        for name in sorted(p.name for p in (train / cls).iterdir()):
            if name.lower().endswith((".jpeg", ".jpg", ".png")) and name not in ODD_BAD:
                files.append(f"{cls}/{name}")
                labels.append(label)
    return classes, files, labels


def _convert(train: Path, out: Path, **kwargs: object) -> ci.ConversionResult:
    kwargs = {"max_resolution": MAX_RES, "workers": 2, "progress": False, **kwargs}
    return ci.convert_imagefolder(train, out, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def raw_beton(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not HAS_FFCV:
        pytest.skip("ffcv is not installed here (`make setup` installs the ffcv extra; CI has it)")
    out = tmp_path_factory.mktemp("raw") / "train.beton"
    _convert(source, out, write_mode="raw")
    return out


@pytest.fixture(scope="module")
def jpg_beton(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not HAS_FFCV:
        pytest.skip("ffcv is not installed here (`make setup` installs the ffcv extra; CI has it)")
    out = tmp_path_factory.mktemp("jpg") / "train.beton"
    _convert(source, out, write_mode="jpg", jpeg_quality=95)
    return out


def _read_images(beton: Path) -> tuple[list[np.ndarray], np.ndarray]:
    """Every stored image (raw pixels, or the JPEG decoded by PIL) and label, through ffcv's own Reader."""
    from ffcv.reader import Reader

    reader = Reader(str(beton))
    image_meta, label_meta = reader.metadata["f0"], reader.metadata["f1"]
    sizes = {(int(r["sample_id"]), int(r["ptr"])): int(r["size"]) for r in reader.alloc_table}
    images = []
    for i, meta in enumerate(image_meta):
        ptr, h, w = int(meta["data_ptr"]), int(meta["height"]), int(meta["width"])
        payload = np.fromfile(beton, dtype=np.uint8, count=sizes[(i, ptr)], offset=ptr)
        if int(meta["mode"]) == 1:  # raw
            images.append(payload.reshape(h, w, 3))
        else:
            images.append(np.asarray(Image.open(io.BytesIO(payload.tobytes())).convert("RGB")))
    return images, np.asarray(label_meta, dtype=np.int64)


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) exact area-averaging weights: output pixel j averages input span [j*s, (j+1)*s), s=n_in/n_out."""
    s = n_in / n_out
    lo = np.arange(n_out)[:, None] * s
    k = np.arange(n_in)[None, :]
    return np.clip(np.minimum(lo + s, k + 1) - np.maximum(lo, k), 0, None) / s


def _area_resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Float64 area ("INTER_AREA") downscaling, written out here as the test's independent reference."""
    h, w = image.shape[:2]
    return np.einsum(
        "ij,jkc,lk->ilc", _area_weights(h, height), image.astype(np.float64), _area_weights(w, width)
    )


def _reference(path: Path) -> np.ndarray:
    """PIL's decode of the source (RGB), longer side area-scaled to MAX_RES, as float64."""
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    h, w = rgb.shape[:2]
    scale = MAX_RES / max(w, h)
    return _area_resize(rgb, int(scale * w), int(scale * h)) if scale < 1 else rgb.astype(np.float64)


# ----------------------------------------------------------------------------------------------- conversion


@needs_ffcv
def test_sidecar_lists_classes_files_labels_and_skipped(source: Path, raw_beton: Path) -> None:
    side = sc.read_sidecar(raw_beton)
    classes, files, labels = _expected_files(source)
    assert list(side.classes) == classes and len(classes) == 3
    assert list(side.files) == files and list(side.labels) == labels
    assert side.num_images == len(files) == 3 * 4 + 3
    assert {f"{classes[k]}/{name}" for k, name in ODD_GOOD.items()} <= set(side.files)
    skipped = {s["file"]: s["reason"] for s in side.skipped}
    assert set(skipped) == {f"{classes[label]}/{name}" for name, label in ODD_BAD.items()}
    assert "truncated" in skipped[f"{classes[0]}/odd_truncated.JPEG"]
    assert "cannot identify" in skipped[f"{classes[1]}/odd_empty.JPEG"]
    assert side.writer["max_resolution"] == MAX_RES and side.writer["write_mode"] == "raw"
    assert side.source_root == str(source) and side.format_version == "paws-ffcv-index/1"
    # The content hash, recomputed here from its documented definition.
    lines = "".join(f"{f}\t{(source / f).stat().st_size}\n" for f in sorted(files))
    assert side.content_hash["sources"] == hashlib.sha256(lines.encode()).hexdigest()
    assert side.content_hash["beton"] == hashlib.sha256(raw_beton.read_bytes()).hexdigest()
    sc.verify_beton_hash(side)
    assert side.index_of(files[5]) == 5
    assert sorted(p.name for p in raw_beton.parent.iterdir()) == ["train.beton", "train.beton.index.json"]


@needs_ffcv
@pytest.mark.parametrize("mode", ["raw", "jpg"])
def test_stored_images_match_pil_decoding(mode: str, source: Path, raw_beton: Path, jpg_beton: Path) -> None:
    beton = raw_beton if mode == "raw" else jpg_beton
    side = sc.read_sidecar(beton)
    images, labels = _read_images(beton)
    assert labels.tolist() == list(side.labels)
    refs = [_reference(source / f) for f in side.files]
    # raw: OpenCV's fixed-point area resize vs the float64 one, i.e. rounding; jpg adds JPEG q95 error
    # (4:2:0 chroma on 32-px textured crops: about 4 levels on average).
    tol, worst = (0.5, 1.5) if mode == "raw" else (6.0, 60.0)
    for i, (image, ref) in enumerate(zip(images, refs)):
        assert image.dtype == np.uint8 and image.shape == ref.shape, side.files[i]
        assert max(image.shape[:2]) == MAX_RES
        err = np.abs(image - ref).mean()
        assert err < tol and np.abs(image - ref).max() <= worst, (
            side.files[i],
            err,
            np.abs(image - ref).max(),
        )
        # ...and no other image of the same size fits as well: the order is right.
        others = [np.abs(image - r).mean() for j, r in enumerate(refs) if j != i and r.shape == ref.shape]
        assert all(e > err for e in others), side.files[i]
    gray = images[side.files.index(f"{side.classes[2]}/{ODD_GOOD[2]}")]
    if mode == "raw":  # a grayscale source stays gray: its three channels are equal
        assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])


@needs_ffcv
@pytest.mark.slow
def test_ffcv_loader_reads_the_file(raw_beton: Path) -> None:
    """FFCV's own Loader (numba-compiled decoder) yields the sidecar's labels and the stored pixels."""
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.loader import Loader, OrderOption

    side = sc.read_sidecar(raw_beton)
    images, _ = _read_images(raw_beton)
    loader = Loader(
        str(raw_beton),
        batch_size=side.num_images,
        num_workers=1,
        order=OrderOption.SEQUENTIAL,
        drop_last=False,
        pipelines={"image": [CenterCropRGBImageDecoder((16, 16), ratio=1.0)], "label": [IntDecoder()]},
    )
    batches = list(loader)
    assert len(batches) == 1
    got, got_labels = (np.asarray(t) for t in batches[0])
    assert got_labels.ravel().tolist() == list(side.labels)
    for i, image in enumerate(images):  # centre square, area-resized to 16x16
        h, w = image.shape[:2]
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        ref = _area_resize(image[top : top + s, left : left + s], 16, 16)
        assert np.abs(got[i] - ref).mean() < 0.5, side.files[i]


@needs_ffcv
def test_stop_on_bad_file_names_it_and_writes_nothing(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "train.beton"
    with pytest.raises(ValueError, match=r"odd_truncated\.JPEG.*truncated.*--on-bad-file skip"):
        _convert(source, out, on_bad_file="stop")
    assert list(tmp_path.iterdir()) == []


@needs_ffcv
def test_failure_while_writing_leaves_the_old_files(
    source: Path, raw_beton: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "train.beton"
    shutil.copy(raw_beton, out)
    shutil.copy(sc.sidecar_path(raw_beton), sc.sidecar_path(out))
    before = (out.read_bytes(), sc.sidecar_path(out).read_bytes())
    victim = sorted(source.glob("*/*_3.JPEG"))[1]

    def flaky(path: str) -> np.ndarray:  # the file "changes" after the check pass
        if Path(path).name == victim.name:
            raise OSError("disk read error")
        return ci.decode_rgb(path)

    monkeypatch.setattr(ci, "load_for_writing", flaky)
    with pytest.raises(ValueError, match=rf"{victim.name}.*disk read error.*Nothing was written"):
        _convert(source, out, overwrite=True)
    assert (out.read_bytes(), sc.sidecar_path(out).read_bytes()) == before  # untouched: no torn write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.beton", "train.beton.index.json"]


@needs_ffcv
def test_a_dying_ffcv_worker_is_an_error_not_a_hang(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ffcv.fields.rgb_image import RGBImageField

    def explode(self: object, destination: object, image: np.ndarray, malloc: object) -> None:
        raise RuntimeError("encoder crashed")  # kills FFCV's worker process, as an OOM kill would

    monkeypatch.setattr(RGBImageField, "encode", explode)
    with pytest.raises(ValueError, match=r"FFCV writer worker process died \(exit code 1"):
        _convert(source, tmp_path / "train.beton")
    assert list(tmp_path.iterdir()) == []


def test_arguments_and_outputs_are_checked(source: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--write-mode 'png'"):
        _convert(source, tmp_path / "a.beton", write_mode="png")
    with pytest.raises(ValueError, match=r"--on-bad-file 'ignore'"):
        _convert(source, tmp_path / "a.beton", on_bad_file="ignore")
    with pytest.raises(ValueError, match=r"--jpeg-quality"):
        _convert(source, tmp_path / "a.beton", jpeg_quality=0)
    with pytest.raises(ValueError, match=r"must be a \.beton file name"):
        _convert(source, tmp_path / "a.ffcv")
    (tmp_path / "old.beton").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"old\.beton already exists; pass --overwrite"):
        _convert(source, tmp_path / "old.beton")
    with pytest.raises(FileNotFoundError, match=r"output folder .*missing does not exist"):
        _convert(source, tmp_path / "missing" / "a.beton")


def test_folder_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist"):
        ci.scan_imagefolder(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.JPEG").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"flat has no class folders.*<class>/<image>"):
        ci.scan_imagefolder(tmp_path / "flat")
    root = tmp_path / "imagenet"
    (root / "train" / "n01").mkdir(parents=True)
    (root / "val" / "n01").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"split folders \['train', 'val'\].*imagenet/train"):
        ci.scan_imagefolder(root)
    (root / "train" / "n01" / "x.JPEG").write_bytes(b"")
    (root / "train" / "n02").mkdir()
    (root / "train" / "n02" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"1 class folder\(s\) of .*train hold no images \(n02\)"):
        ci.scan_imagefolder(root / "train")


@needs_ffcv
def test_a_class_with_only_unreadable_images_is_an_error(tmp_path: Path) -> None:
    train = tmp_path / "train"
    for cls in ("a", "b"):
        (train / cls).mkdir(parents=True)
    Image.fromarray(_photo(0)).save(train / "a" / "ok.JPEG")
    (train / "b" / "bad.JPEG").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(ValueError, match=r"every image of the class folder\(s\) b "):
        _convert(train, tmp_path / "x.beton")


def test_stored_size_follows_ffcv_semantics() -> None:
    assert ci.stored_size(500, 375, 512) == (500, 375)  # never upscaled
    assert ci.stored_size(1000, 750, 512) == (512, 384)
    assert ci.stored_size(375, 500, 256) == (192, 256)
    assert ci.stored_size(333, 1000, 100) == (33, 100)  # truncated, like FFCV
    assert ci.stored_size(4000, 3000, None) == (4000, 3000)
    assert ci.page_size_for(512 * 512 * 3) == 1 << 23  # FFCV's default page
    assert ci.page_size_for(3000 * 4000 * 3) == 1 << 27  # 2 x 36 MB fits in 128 MiB
    with pytest.raises(ValueError, match="--max-resolution"):
        ci.page_size_for(1 << 30)


# ----------------------------------------------------------------------------------------------- the CLI


@needs_ffcv
def test_cli_converts_and_reports_skipped_files(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.beton"
    args = [
        "convert-dataset",
        "imagefolder",
        str(source),
        str(out),
        "--max-resolution",
        "24",
        "--workers",
        "2",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: 15 images, 3 classes" in result.output
    assert all(name in result.output for name in ODD_BAD), result.output
    assert sc.read_sidecar(out).writer["max_resolution"] == 24
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "already exists; pass --overwrite" in again.output
    stop = CliRunner().invoke(app, [*args[:3], str(tmp_path / "stop.beton"), "--on-bad-file", "stop"])
    assert stop.exit_code == 2 and "odd_truncated.JPEG" in stop.output


def test_without_ffcv_the_error_says_how_to_install_it(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ffcv", None)  # `import ffcv` fails, as where the extra is missing
    with pytest.raises(
        ValueError, match=r"FFCV is not installed.*make setup.*libturbojpeg0-dev.*data\.format=folder"
    ):
        _convert(source, tmp_path / "x.beton")
    result = CliRunner().invoke(
        app, ["convert-dataset", "imagefolder", str(source), str(tmp_path / "x.beton")]
    )
    assert result.exit_code == 2 and "ffcv==1.0.2" in result.output
    assert list(tmp_path.iterdir()) == []


def test_cli_keeps_fashion_mnist_and_rejects_unknown_kinds(tmp_path: Path) -> None:
    bad = CliRunner().invoke(
        app, ["convert-dataset", "imagefolder", str(tmp_path / "x"), str(tmp_path / "o.txt")]
    )
    assert bad.exit_code == 2 and "must be a .beton file name" in bad.output
    unknown = CliRunner().invoke(app, ["convert-dataset", "cifar10", str(tmp_path / "o")])
    assert unknown.exit_code == 2
    helped = CliRunner().invoke(app, ["convert-dataset", "--help"])
    assert helped.exit_code == 0 and "fashion-mnist" in helped.output and "imagefolder" in helped.output


# ----------------------------------------------------------------------------------------------- the sidecar


def _copy(beton: Path, tmp_path: Path) -> tuple[Path, dict]:
    out = tmp_path / "copy.beton"
    shutil.copy(beton, out)
    shutil.copy(sc.sidecar_path(beton), sc.sidecar_path(out))
    return out, json.loads(sc.sidecar_path(out).read_text())


def test_sidecar_path_and_missing_sidecar(tmp_path: Path) -> None:
    beton = tmp_path / "train.beton"
    assert sc.sidecar_path(beton) == tmp_path / "train.beton.index.json"
    beton.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"train\.beton has no sidecar index .*train\.beton\.index\.json.*"
                       r"paws convert-dataset imagefolder"):  # fmt: skip
        sc.read_sidecar(beton)


@needs_ffcv
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format="paws-ffcv-index/9"), r"format is 'paws-ffcv-index/9'"),
        (lambda d: d["labels"].pop(), r"num_images=15 but 15 files and 14 labels"),
        (lambda d: d["labels"].__setitem__(0, 7), r"label 7 of entry 0 .* outside 0\.\.2"),
        (lambda d: d["labels"].__setitem__(0, 1), r"entry 0 '.*' is not in its class folder"),
        (lambda d: d.update(classes=d["classes"][::-1]), r"'classes' must be unique and sorted"),
        (lambda d: d.update(files="x"), r"'files' must be a list of strings"),
        (lambda d: d.update(skipped=[{"file": "a"}]), r"'skipped' must be a list of \{file, reason\}"),
        (
            lambda d: d.update(num_images=14, files=d["files"][:14], labels=d["labels"][:14]),
            r"holds 15 images",
        ),
        (lambda d: d["content_hash"].update(beton_size=5), r"records 5: the two belong to different"),
    ],
)
def test_malformed_sidecars_are_errors(edit: object, message: str, raw_beton: Path, tmp_path: Path) -> None:
    beton, doc = _copy(raw_beton, tmp_path)
    edit(doc)  # type: ignore[operator]
    sc.sidecar_path(beton).write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message):
        sc.read_sidecar(beton)


@needs_ffcv
def test_sidecar_needs_its_beton_and_valid_json(raw_beton: Path, tmp_path: Path) -> None:
    beton, _ = _copy(raw_beton, tmp_path)
    sc.sidecar_path(beton).write_text("{not json")
    with pytest.raises(ValueError, match=r"malformed FFCV sidecar index .*not valid JSON"):
        sc.read_sidecar(beton)
    beton, _ = _copy(raw_beton, tmp_path)
    beton.write_bytes(beton.read_bytes()[:10])
    with pytest.raises(ValueError, match=r"is 10 bytes but its sidecar index .* records"):
        sc.read_sidecar(beton)
    beton.unlink()
    with pytest.raises(FileNotFoundError, match=r"exists but its FFCV file .*copy\.beton does not"):
        sc.read_sidecar(beton)
    assert sc.read_sidecar(beton, check_beton=False).num_images == 15
    beton, _ = _copy(raw_beton, tmp_path)
    with beton.open("r+b") as fh:  # same size, other bytes
        fh.seek(-1, 2)
        fh.write(b"\x01" if raw_beton.read_bytes()[-1:] != b"\x01" else b"\x02")
    with pytest.raises(ValueError, match=r"the file changed after conversion"):
        sc.verify_beton_hash(sc.read_sidecar(beton))


@needs_ffcv
def test_sample_count_without_ffcv_reads_the_header(raw_beton: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with_ffcv = sc.beton_num_samples(raw_beton)
    monkeypatch.setitem(sys.modules, "ffcv.reader", None)  # makes `from ffcv.reader import Reader` fail
    assert sc.beton_num_samples(raw_beton) == with_ffcv == 15
    assert sc.read_sidecar(raw_beton).num_images == 15
