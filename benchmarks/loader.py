"""PAWS data loading per CPU core: the FFCV back end against the torchvision/PIL folder back end.

    python benchmarks/loader.py [--classes 16] [--per-class 20] [--size 500x375] [--batch 32]
                                [--support-classes 16] [--support-images 2] [--workers 2] [--torch-threads 1]
                                [--steps 20]

Both back ends make the same PAWS step from the same JPEGs (ImageNet-like sizes, quality 90, written by the shared
test fixture): B unlabelled images x (2 views of 224 px + 6 of 96 px) plus a support batch of K classes x P images
x 1 view of 224 px, with the ImageNet augmentations (random-resized crop, flip, colour jitter p 0.8, grayscale p
0.2, Gaussian blur p 0.5) and normalisation, delivered as float tensors on the CPU.

- folder: `data.format=folder`, PIL decoding and torchvision's per-image transforms in DataLoader worker
  processes (the reference's pipeline);
- ffcv: `data.format=ffcv` on the .beton converted from the same folder, decoded once per image by FFCV's
  threads, crops and flips in the decoder, colour ops on the CPU (the training device here, so their cost is
  counted): per-view uint8 OpenCV ops (`data.ffcv_colour_ops=opencv`, what a CPU run uses) and, for comparison,
  the batched float tensor ops that run on a GPU (`data.ffcv_colour_ops=tensor`);
- ffcv decode + crops only: what stays on the CPU when the colour ops run on a GPU.

Reported per back end: wall time, CPU seconds of the process and of its children (all threads and worker
processes, from psutil), images per second and images per CPU-second (the per-core throughput; images = B + K*P
per step). The first --warmup steps (worker start-up, FFCV's JIT compilation) are not counted. Torch runs the
CPU colour ops on --torch-threads threads (default 1: with more, OpenMP's waiting threads spin and bill CPU time
that is contention, not work, badly so on a shared machine). The target is an FFCV/folder ratio of images per
CPU-second of at least 3. CPU seconds are what the work cost, so the per-core figure holds on a busy machine
better than wall-clock rates, but cache and memory contention still move it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from paws_cli.config import load_settings
from paws_cli.data.sampling.batch import Batch
from paws_cli.data.sources import build_train_data

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from imagefolder_fixture import make_imagefolder  # the shared test fixture makes the JPEGs


@dataclass
class Result:
    name: str
    steps: int
    images: int
    wall_s: float
    cpu_s: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s

    @property
    def images_per_cpu_s(self) -> float:
        return self.images / self.cpu_s


class CpuClock:
    """CPU seconds (user + system) of this process and all its descendants, live or finished."""

    def __init__(self) -> None:
        import psutil  # installed with the ffcv extra

        self.process = psutil.Process()

    def read(self) -> tuple[float, dict[int, float]]:
        """(this process + its reaped children, {live descendant pid: its CPU seconds})."""
        own = self.process.cpu_times()
        total = own.user + own.system + own.children_user + own.children_system
        live = {}
        for child in self.process.children(recursive=True):
            try:
                times = child.cpu_times()
            except Exception:  # the child ended between listing and reading; counted once reaped
                continue
            live[child.pid] = times.user + times.system
        return total, live

    @staticmethod
    def spent(before: tuple[float, dict[int, float]], after: tuple[float, dict[int, float]]) -> float:
        own = after[0] - before[0]
        children = sum(cpu - before[1].get(pid, 0.0) for pid, cpu in after[1].items())
        return own + children


def endless(data: Any) -> Iterator[Batch]:
    """Batches over epochs, as the training loop asks for them."""
    step, epoch = 0, 0
    while True:
        batches = data.epoch(epoch, first_step=step)
        try:
            for batch in batches:
                step += 1
                yield batch
        finally:
            batches.close()
        epoch += 1


def decoded_only(data: Any) -> Iterator[None]:
    """The FFCV back end's CPU work without its colour stage: the decoded view rows of the same batches.

    What stays on the CPU when the colour ops run on a GPU (the rows would then be copied there). Reaches into
    the back end's loaders, as only a benchmark should.
    """
    step, epoch = 0, 0
    while True:
        data.order.set_epoch(epoch)
        data.supports.set_epoch(epoch)
        unlabelled = torch.stack(list(data.order)).numpy()
        supports = data.labelled[torch.stack(list(data.supports))].numpy()
        streams = []
        try:
            # One loader at a time gets going (and compiles), as the back end itself does.
            for loader, samples in ((data._unlabelled, unlabelled), (data._supports, supports)):
                streams.append(loader.batches(samples, step))
                first = next(streams[-1])[0]
                assert first.dtype == torch.uint8
            for k in range(len(unlabelled)):
                if k:
                    for stream in streams:
                        next(stream)
                step += 1
                yield None
        finally:
            for stream in streams:
                stream.close()
        epoch += 1


def measure(name: str, overrides: list[str], steps: int, warmup: int, rows_only: bool = False) -> Result:
    settings = load_settings(None, overrides)
    data = build_train_data(settings, device=torch.device("cpu"))
    per_step = settings.optim.batch_size + settings.paws.classes_per_batch * settings.paws.images_per_class
    clock = CpuClock()
    stream: Iterator[Any] = decoded_only(data) if rows_only else endless(data)
    try:
        for _ in range(warmup):
            next(stream)
        start_cpu, start = clock.read(), time.perf_counter()
        for _ in range(steps):
            batch = next(stream)
            assert rows_only or len(batch.views) == 2 + settings.augment.num_small
        wall, cpu = time.perf_counter() - start, CpuClock.spent(start_cpu, clock.read())
    finally:
        stream.close()
    return Result(name, steps, steps * per_step, wall, cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=16, help="class folders of the generated dataset")
    parser.add_argument("--per-class", type=int, default=20, help="JPEGs per class")
    parser.add_argument("--size", default="500x375", help="JPEG size WxH (ImageNet's typical 500x375)")
    parser.add_argument("--batch", type=int, default=32, help="unlabelled images per step (B)")
    parser.add_argument("--support-classes", type=int, default=16, help="support classes per step (K)")
    parser.add_argument("--support-images", type=int, default=2, help="support images per class (P)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers / FFCV decoding threads")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch threads of the main process (the CPU colour ops); 1 measures per-core cost without OpenMP's "
        "spinning, which on a busy machine multiplied the colour ops' CPU seconds by 4 or more",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per back end")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument(
        "--data", type=Path, default=None, help="keep the generated dataset here (default: temp)"
    )
    args = parser.parse_args()
    console = Console(width=160)
    width, height = (int(v) for v in args.size.lower().split("x"))
    torch.set_num_threads(args.torch_threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or Path(tmp) / "ds"
        beton = root / "train.beton"
        if not beton.exists():
            from data_tools.convert_imagefolder import convert_imagefolder

            console.print(
                f"making {args.classes} x {args.per_class} JPEGs of {width}x{height} (quality 90) in {root}"
            )
            make_imagefolder(
                root,
                num_classes=args.classes,
                per_class=args.per_class,
                val_per_class=0,
                size=(width, height),
            )
            convert_imagefolder(root / "train", beton, max_resolution=max(width, height), progress=False)
        common = [
            "data.dataset=imagefolder",
            f"data.num_workers={args.workers}",
            "data.labels_per_class=4",
            f"optim.batch_size={args.batch}",
            f"paws.classes_per_batch={args.support_classes}",
            f"paws.images_per_class={args.support_images}",
            "model.channels_last=false",
            "run.device=cpu",
            f"run.num_threads={args.torch_threads}",  # the FFCV back end restores this after FFCV changes it
        ]
        results = []
        for name, fmt, path, colour, rows_only in (
            ("folder: PIL + torchvision in workers", "folder", root / "train", "auto", False),
            ("ffcv: decode + crops, uint8 OpenCV colour on the CPU", "ffcv", beton, "opencv", False),
            ("ffcv: decode + crops, float tensor colour on the CPU", "ffcv", beton, "tensor", False),
            ("ffcv: decode + crops only (colour on a GPU)", "ffcv", beton, "auto", True),
        ):
            console.print(f"timing {name} ...")
            overrides = [*common, f"data.format={fmt}", f"data.path={path}", f"data.ffcv_colour_ops={colour}"]
            results.append(measure(name, overrides, args.steps, args.warmup, rows_only))

    table = Table(
        title=f"PAWS loading: B={args.batch} x (2x224 + 6x96) + {args.support_classes}x{args.support_images} "
        f"supports x 224, {width}x{height} JPEGs, {args.workers} workers, "
        f"{args.torch_threads} torch thread(s), CPU"
    )
    for column in (
        "back end",
        "steps",
        "images",
        "wall s",
        "images/s",
        "CPU s",
        "cores busy",
        "images/CPU-s",
    ):
        table.add_column(column, justify="left" if column == "back end" else "right")
    table.add_column("per core vs folder", justify="right")
    base = results[0].images_per_cpu_s
    for r in results:
        table.add_row(
            r.name,
            str(r.steps),
            str(r.images),
            f"{r.wall_s:.1f}",
            f"{r.images_per_s:.1f}",
            f"{r.cpu_s:.1f}",
            f"{r.cpu_s / r.wall_s:.2f}",
            f"{r.images_per_cpu_s:.2f}",
            f"{r.images_per_cpu_s / base:.2f}x",
        )
    console.print(table)
    for r in results[1:]:
        ratio = r.images_per_cpu_s / base
        verdict = "meets" if ratio >= 3 else "misses"
        console.print(f"{r.name}: {ratio:.2f}x the folder path per CPU-second ({verdict} the 3x target)")


if __name__ == "__main__":
    main()
