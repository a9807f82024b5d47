"""Training scalars to TensorBoard event files and to `metrics.jsonl` (one JSON object per line).

TensorBoard's own writer is used at the protobuf level, so neither TensorFlow nor torch is needed:

    writer = MetricsWriter(workdir)
    writer.write(step, {"train/loss": 2.3, "train/lr": 5e-5})
    writer.close()

metrics.jsonl holds `{"step": 10, "train/loss": 2.3, ...}` lines for scripts; a resumed run appends.
Only process 0 writes (pass enabled=False elsewhere).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Mapping, Optional

JSONL_NAME = "metrics.jsonl"


class MetricsWriter:
    def __init__(self, workdir: str | os.PathLike, enabled: bool = True):
        self.enabled = enabled
        self._events = None
        self._jsonl = None
        if not enabled:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(workdir / JSONL_NAME, "a", encoding="utf-8")
        try:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self._events = EventFileWriter(str(workdir / "tensorboard"))
        except ImportError:  # TensorBoard is optional: the JSONL file has the same scalars
            self._events = None

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
        self._jsonl.flush()
        if self._events is not None:
            from tensorboard.compat.proto import event_pb2, summary_pb2

            values = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in clean.items()
                      if isinstance(v, float) and math.isfinite(v)]
            event = event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values))
            self._events.add_event(event)

    def flush(self) -> None:
        if self._events is not None:
            self._events.flush()

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def _plain(value) -> float | int:
    """JSON-able scalar: numpy/jax scalars become Python numbers; NaN/inf stay (json writes NaN)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The lines of a metrics.jsonl (for tests and scripts)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_tensorboard_scalars(directory: str | os.PathLike, tag: Optional[str] = None) -> list[tuple[int, str, float]]:
    """(step, tag, value) from the event files in `directory` (TensorBoard's reader; for tests)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out = []
    for path in sorted(Path(directory).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if tag is None or value.tag == tag:
                    out.append((event.step, value.tag, value.simple_value))
    return out
