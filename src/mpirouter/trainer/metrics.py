"""Run metrics: one JSON record per line in run/metrics.jsonl, mirrored to TensorBoard if asked."""

from __future__ import annotations

import json
import math
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All records of a run's metrics.jsonl (unreadable lines, e.g. an unfinished last one, are skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a crash mid-write leaves a partial line; a damaged line costs only itself
        if isinstance(record, dict):
            records.append(record)
    return records


class MetricsWriter:
    """Appends records to metrics.jsonl; on resume, drops records past the resumed step first."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = False, truncate_after_step: int | None = None, fresh: bool = True):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        if fresh:
            self.path.write_text("")
        elif truncate_after_step is not None:
            # The interrupted run may have logged steps after its last checkpoint; the resumed run redoes them.
            kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= truncate_after_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:
                print("tensorboard is not installed; writing metrics.jsonl only (pip install tensorboard)")

    def write(self, record: dict) -> None:
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as e:  # a failed write(2) names no file: say which (a full disk is reported as such)
            raise OSError(e.errno, e.strerror, str(self.path)) from None
        if self._tb is not None:
            event, step = record.get("event", "log"), record.get("step", 0)
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and key != "step":
                    self._tb.add_scalar(f"{event}/{key}", value, step)
                elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
                    for i, v in enumerate(value):
                        self._tb.add_scalar(f"{event}/{key}/{i}", v, step)

    def read(self) -> list[dict]:
        return read_metrics(self.run_dir)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
