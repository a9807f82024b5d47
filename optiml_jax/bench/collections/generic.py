"""Parquet / JSONL files read through a column mapping (our keys: task, input, output, options, template
-> the files' columns), the layout of every collection without one of its own (ExMix, T5, reasoning) and
the row reader of the Parquet/JSONL-based ones (FLAN, P3). Files are listed and opened by the data
package's readers (optiml_jax/data/formats/); a row's output may be a string or a list of references."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from optiml_jax.bench.tasks import BenchError, Example, Task, qualified_name
from optiml_jax.data.formats.jsonl import jsonl_objects
from optiml_jax.data.formats.parquet import open_parquet

ROW_SUFFIXES = (".parquet", ".jsonl", ".json")
SPLIT_SUFFIXES = ("_train", "_dev", "_validation", "_test")


def list_files(path, suffixes=ROW_SUFFIXES) -> list[Path]:
    """`path` itself, or every file under it with one of `suffixes`, sorted; BenchError if none."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise BenchError(f"{path}: no such file or directory")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)
    if not files:
        raise BenchError(f"{path}: holds no {' / '.join(suffixes)} files")
    return files


def task_stem(file: Path) -> str:
    """A per-task file's task: its stem without a split suffix (`copa_train.tsv` -> `copa`)."""
    stem = file.stem
    for suffix in SPLIT_SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def read_rows(file: Path, columns: dict, where: str, task: Optional[str] = None) -> list[dict]:
    """The rows of one Parquet / JSONL / JSON-list file as {our key: value}, only the mapped columns;
    with `task`, only that task's rows (in Parquet, row groups whose statistics exclude it are not read:
    one task of a many-task dump costs its share, not the file). A mapped column a file lacks is an
    error naming the file, the column and `where` it was mapped."""
    wanted = {key: column for key, column in columns.items() if column}
    if file.suffix == ".parquet":
        names = open_parquet(file).schema_arrow.names
        for key, column in wanted.items():
            if column not in names:
                raise BenchError(
                    f"{file}: no column {column!r} ({where}.{key}); its columns are {names[:20]}"
                )
        filters = [(columns["task"], "==", task)] if task is not None and columns.get("task") else None
        try:
            table = pq.read_table(file, columns=list(dict.fromkeys(wanted.values())), filters=filters)
        except (OSError, pa.ArrowException) as e:
            raise BenchError(f"{file}: cannot read ({e})") from None
        cells = {key: table.column(column).to_pylist() for key, column in wanted.items()}
        return [{key: cells[key][k] for key in wanted} for k in range(table.num_rows)]
    if file.suffix == ".jsonl":
        records = [(at, record) for _, at, record in jsonl_objects(file)]
    else:
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BenchError(f"{file}: not a readable JSON file ({e})") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise BenchError(f"{file}: expected a JSON list of objects")
        records = [(f"{file}[{i}]", record) for i, record in enumerate(data)]
    rows = []
    for at, record in records:
        missing = [column for column in wanted.values() if column not in record]
        if missing:
            raise BenchError(f"{at}: no key {missing[0]!r} (mapped in {where})")
        rows.append({key: record[column] for key, column in wanted.items()})
    return rows


def references(value, at: str) -> tuple[str, ...]:
    """A row's outputs: a string, or a list of strings (several references)."""
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)) or not values or not all(isinstance(v, str) for v in values):
        raise BenchError(f"{at}: the output must be a string or a non-empty list of strings, got {value!r}")
    return tuple(values)


def row_example(row: dict, at: str) -> Example:
    if not isinstance(row.get("input"), str):
        raise BenchError(f"{at}: the input must be a string, got {row.get('input')!r}")
    options = row.get("options") or ()
    return Example(
        input=row["input"],
        references=references(row.get("output"), at),
        options=tuple(options),
        template=str(row.get("template") or ""),
    )


def group_by_task(files: list[Path], columns: dict, where: str) -> dict[str, list[Path]]:
    """Local task name -> the files holding its rows: the task column when mapped, else the file stem."""
    tasks: dict[str, list[Path]] = {}
    for file in files:
        if columns.get("task"):
            names = {str(row["task"]) for row in read_rows(file, {"task": columns["task"]}, where)}
        else:
            names = {task_stem(file)}
        for name in sorted(names):
            tasks.setdefault(name, []).append(file)
    return tasks


def load_rows(files: list[Path], columns: dict, where: str, local: Optional[str]) -> list[dict]:
    """The rows of task `local` in `files` (all rows when no task column is mapped), in file order."""
    rows = []
    for file in files:
        for row in read_rows(file, columns, where, local if columns.get("task") else None):
            if not columns.get("task") or str(row["task"]) == local:
                rows.append(row)
    return rows


def read_collection(benchmark: str, path, columns: dict) -> list[Task]:
    """Tasks of a Parquet/JSONL collection, one example per row (one template per instance)."""
    where = f"collections.{benchmark}.columns"
    tasks = []
    for local, files in group_by_task(list_files(path), columns, where).items():

        def load(files=files, local=local):
            rows = load_rows(files, columns, where, local)
            return [(row_example(row, f"{files[0]} ({local} row {i})"),) for i, row in enumerate(rows)]

        tasks.append(Task(name=qualified_name(benchmark, local), benchmark=benchmark, load=load))
    return tasks
