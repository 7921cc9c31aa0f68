"""The run's metric logs: JSONL always, and with ``run.tensorboard=true`` the same numbers as TensorBoard scalars.

Records of metrics.jsonl become the tags ``train/<key>`` and those of epochs.jsonl ``epoch/<key>``, each at the
record's ``step`` (TensorBoard keeps them as float32). Both logs of a run share one event file in the run
directory, so ``tensorboard --logdir runs`` shows each run directory as a run. Only rank 0 opens the logs (as
for the JSONL). A resumed run hides the events that a killed session wrote after its checkpoint (``purge_step``),
as the JSONL logs drop those records.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from paws_cli.train.rundir import JsonlWriter

INSTALL_HINT = "pip install 'paws-cli[tensorboard]'"


def summary_writer_class() -> type:
    """torch's SummaryWriter; a ValueError naming the setting and the install command when tensorboard is
    missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ValueError(
            f"run.tensorboard=true needs the tensorboard package ({exc}); install it with {INSTALL_HINT} "
            "(or `make setup`), or set run.tensorboard=false"
        ) from None
    return SummaryWriter


def check_tensorboard(enabled: bool) -> None:
    """Fail before any work when run.tensorboard=true cannot be honoured."""
    if enabled:
        summary_writer_class()


class MetricsLog(JsonlWriter):
    """A JSONL log that also sends each record's numbers to a TensorBoard writer (when given one)."""

    def __init__(self, path: Path, tensorboard: Any | None = None, prefix: str = "train") -> None:
        super().__init__(path)
        self.tensorboard = tensorboard
        self.prefix = prefix

    def write(self, record: dict[str, Any]) -> None:
        super().write(record)
        writer, step = self.tensorboard, record.get("step")
        if writer is None or not isinstance(step, int):
            return
        for key, value in record.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                writer.add_scalar(f"{self.prefix}/{key}", value, global_step=step)
        writer.flush()  # a killed run keeps what it logged, as the JSONL does

    def close(self) -> None:
        super().close()
        if self.tensorboard is not None:
            self.tensorboard.close()  # idempotent: the other log of the run may close it too


def open_metric_logs(
    run_dir: Path, *, tensorboard: bool, resumed_at: int | None = None
) -> tuple[MetricsLog, MetricsLog]:
    """The step log (metrics.jsonl) and epoch log (epochs.jsonl) of a run; with ``tensorboard`` both also
    write to one event file in ``run_dir``. ``resumed_at``: the checkpoint's step of a resumed run."""
    writer = None
    if tensorboard:
        purge = None if resumed_at is None else resumed_at + 1
        writer = summary_writer_class()(log_dir=str(run_dir), purge_step=purge)
    return (
        MetricsLog(run_dir / "metrics.jsonl", writer, "train"),
        MetricsLog(run_dir / "epochs.jsonl", writer, "epoch"),
    )
