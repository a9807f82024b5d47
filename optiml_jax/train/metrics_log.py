"""Training scalars to TensorBoard event files and to `metrics.jsonl` (one JSON object per line).

TensorBoard's own writer is used at the protobuf level, so neither TensorFlow nor torch is needed:

    writer = MetricsWriter(workdir)
    writer.write(step, {"train/loss": 2.3, "train/lr": 5e-5})
    writer.close()

metrics.jsonl holds `{"step": 10, "train/loss": 2.3, ...}` lines for scripts. A resumed run passes
`resume_step`: lines logged after that step by the run that died (a hard kill loses everything after the
last checkpoint) are cut from metrics.jsonl, and a TensorBoard SessionLog.START event at resume_step + 1
makes TensorBoard drop its copies of those steps, so each step appears once in both.
Only process 0 writes (pass enabled=False elsewhere).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Mapping, Optional

from optiml_jax.fileio import write_text_atomic

JSONL_NAME = "metrics.jsonl"


class MetricsWriter:
    def __init__(
        self, workdir: str | os.PathLike, enabled: bool = True, resume_step: Optional[int] = None, keep=None
    ):
        """resume_step: the step the run restarts from (0 for a fresh start in a workdir that may hold
        metrics of a run that died before its first checkpoint). Lines with a larger step are removed,
        and so are lines AT resume_step for which `keep(record)` is false (default: all kept)."""
        self.enabled = enabled
        self._events = None
        self._jsonl = None
        if not enabled:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_jsonl(workdir / JSONL_NAME, resume_step, keep)
        self._jsonl = open(workdir / JSONL_NAME, "a", encoding="utf-8")
        try:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self._events = EventFileWriter(str(workdir / "tensorboard"))
        except ImportError:  # TensorBoard is optional: the JSONL file has the same scalars
            self._events = None
        if resume_step is not None and self._events is not None:
            # TensorBoard purges every earlier event with a step >= this one (event_accumulator's
            # _CheckForRestartAndMaybePurge), so a resumed run's steps replace the dead run's.
            from tensorboard.compat.proto import event_pb2

            self._events.add_event(
                event_pb2.Event(
                    wall_time=time.time(),
                    step=int(resume_step) + 1,
                    session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START),
                )
            )

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
        self._jsonl.flush()
        if self._events is not None:
            from tensorboard.compat.proto import event_pb2, summary_pb2

            values = [
                summary_pb2.Summary.Value(tag=k, simple_value=v)
                for k, v in clean.items()
                if isinstance(v, float) and math.isfinite(v)
            ]
            event = event_pb2.Event(
                wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)
            )
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


def truncate_jsonl(path: Path, step: int, keep=None) -> int:
    """Rewrites `path` (atomically) without lines past `step`, or at `step` where keep(record) is false;
    returns how many lines were removed. A torn last line (a kill mid-write) is removed too."""
    if not path.exists():
        return 0
    kept, removed = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                record_step = int(record["step"])
            except (ValueError, KeyError, TypeError):
                removed += 1
                continue
            if record_step > step or (record_step == step and keep is not None and not keep(record)):
                removed += 1
                continue
            kept.append(line if line.endswith("\n") else line + "\n")
    if removed:
        write_text_atomic(path, "".join(kept))
    return removed


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


def read_tensorboard_scalars(
    directory: str | os.PathLike, tag: Optional[str] = None
) -> list[tuple[int, str, float]]:
    """(step, tag, value) from the event files in `directory` (TensorBoard's reader; for tests)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out = []
    for path in sorted(Path(directory).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if tag is None or value.tag == tag:
                    out.append((event.step, value.tag, value.simple_value))
    return out
