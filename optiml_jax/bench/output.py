"""The bench's files (spec: issue #26 item 6): `train/`, `dev/`, `test/` Parquet shards (one per task, named
by it, so the training reader's default of naming a file's task by its stem gives the task names),
`manifest.json`, `overlap.json` (report.py writes report.md)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SPLITS = ("train", "dev", "test")
SCHEMA = pa.schema(
    [
        ("task", pa.string()),
        ("benchmark", pa.string()),
        ("category", pa.string()),
        ("level", pa.string()),
        ("src", pa.string()),
        ("tgt", pa.string()),
        ("references", pa.list_(pa.string())),
        ("options", pa.list_(pa.string())),
        ("template", pa.string()),
    ]
)
ROW_GROUP_ROWS = 10_000


def shard_path(directory: Path, split: str, task: str) -> Path:
    """`DIR/split/TASK.parquet`, the task name made a safe file name."""
    return directory / split / f"{re.sub(r'[^A-Za-z0-9_.=-]+', '-', task)}.parquet"


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS)


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")
