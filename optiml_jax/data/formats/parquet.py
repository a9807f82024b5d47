"""Parquet tables (the hub's format), through pyarrow, imported when a Parquet file is met (an optional
start-up cost: reading only SNI or JSONL data never pays for it).

Process p checks the rows of the row groups that start in its byte range of each file (every process
reads each file's footer), reading only the mapped columns, and notes the row group and row of every
usable row. While training a row group is read again (its mapped columns) when a row of it is needed,
and the most recent ones are kept, so the rows of a batch in one group cost one read. Random access costs
a row group per example: files with small row groups read fastest. Evaluation reads the mapped columns
and, where the table has them, `references`, `options`, `label` and `category` (as JSONL records).
"""

from __future__ import annotations

import array
import dataclasses
import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Optional, Union

from optiml_jax.data.formats.base import (
    Format,
    changed,
    register,
)
from optiml_jax.data.sources import (
    DataError,
    Example,
    Fields,
    SNIExample,
    TaskCodes,
    check_record,
    fields_hint,
    record_example,
)

# Row groups of a Parquet file kept in memory while training (per file; mapped columns only).
CACHED_ROW_GROUPS = 4
# Columns evaluation reads besides the mapped ones, when the table has them (see base.records_eval_tasks).
EVAL_COLUMNS = ("references", "options", "label", "category")


def open_parquet(path: str | os.PathLike, metadata=None):
    """A pyarrow ParquetFile (its footer read: schema and row groups, unless `metadata` from an earlier
    open is given), or a DataError naming the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path, metadata=metadata)
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror or e})") from None
    except pa.ArrowException as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None


def _holds_strings(kind, lists: bool) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if lists and (
        pa.types.is_list(kind) or pa.types.is_large_list(kind)
    ):  # SNI's list-of-strings definitions
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def check_parquet_schema(handle, path, fields: Fields) -> None:
    """DataError naming the file and column when a mapped column is missing or does not hold strings:
    every row would be unusable, so it is the file's error, not a skip per row."""
    schema = handle.schema_arrow
    for name, column in fields.mapped():
        if column not in schema.names:
            shown = ", ".join(schema.names[:20]) + (", ..." if len(schema.names) > 20 else "")
            raise DataError(f"{path}: no column {column!r} (data.fields.{name}); its columns are {shown}")
        kind = schema.field(column).type
        if not _holds_strings(kind, lists=name == "definition"):
            raise DataError(f"{path}: column {column!r} (data.fields.{name}) holds {kind}, not strings")


def read_row_group(handle, path, group: int, columns: list[str]):
    """One row group as a pyarrow Table, reading only `columns`."""
    import pyarrow as pa

    try:
        return handle.read_row_group(group, columns=columns)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: cannot read row group {group} ({e})") from None


def row_group_share(metadata, me: int, count: int) -> range:
    """The row groups process `me` of `count` scans at start-up: those starting in its 1/count of the
    file's row-group bytes (uncompressed; as JSONL lines are shared), a contiguous run, so process order
    is file order."""
    sizes = [metadata.row_group(g).total_byte_size for g in range(metadata.num_row_groups)]
    total, start, owners = max(sum(sizes), 1), 0, []
    for size in sizes:
        owners.append(min(start * count // total, count - 1))
        start += size
    mine = [g for g, q in enumerate(owners) if q == me]
    return range(mine[0], mine[-1] + 1) if mine else range(0)


def group_first_rows(metadata) -> list[int]:
    """Row (in the file) of each row group's first row."""
    firsts, row = [], 0
    for g in range(metadata.num_row_groups):
        firsts.append(row)
        row += metadata.row_group(g).num_rows
    return firsts


@dataclasses.dataclass
class ParquetScan:
    """What one scan of a share of a Parquet file's row groups found; rows count from the file's start."""

    # row group, row in the group, row in the file, task code of each usable row, flat (as JsonlScan)
    records: array.array = dataclasses.field(default_factory=lambda: array.array("q"))
    skips: list = dataclasses.field(default_factory=list)  # (row, reason, detail)
    tasks: TaskCodes = dataclasses.field(default_factory=TaskCodes)


def scan_parquet(
    path: str | os.PathLike,
    fields: Fields = Fields(),  # noqa: B008 (frozen, never mutated)
    me: int = 0,
    count: int = 1,
) -> ParquetScan:
    """Checks every row of process `me`'s share of a Parquet file's row groups (row_group_share),
    reading only the mapped columns of those groups and the file's footer."""
    handle = open_parquet(path)
    check_parquet_schema(handle, path, fields)
    columns, scan = fields.columns, ParquetScan()
    firsts = group_first_rows(handle.metadata)
    for group in row_group_share(handle.metadata, me, count):
        table = read_row_group(handle, path, group, columns)
        cells = {column: table.column(column).to_pylist() for column in columns}
        for k in range(table.num_rows):
            values, problem = check_record({c: cells[c][k] for c in columns}, fields)
            if values is not None:
                code, problem = scan.tasks.record(values)
            if problem is not None:
                scan.skips.append((firsts[group] + k, *problem))
            else:
                scan.records.extend((group, k, firsts[group] + k, code))
    return scan


class RowGroups:
    """The row groups of one Parquet file, read (mapped columns only) when a row of theirs is needed; the
    CACHED_ROW_GROUPS most recent are kept, as Arrow tables. One per file, shared by the tasks with rows
    in it."""

    def __init__(self, path: str, fields: Fields):
        self.path, self.fields = path, fields
        self._cache: OrderedDict = OrderedDict()  # group -> pyarrow Table
        self._footer = None  # (size, mtime) of the file when its metadata was read, the metadata

    def _open(self):
        # Opened per read, so a run over many files holds no descriptors; the footer is parsed again only
        # when the file changed (parsing it costs as much as reading a group of a thousand rows).
        try:
            stat = os.stat(self.path)
        except OSError as e:
            raise DataError(f"{self.path}: cannot open ({e.strerror})") from None
        version = (stat.st_size, stat.st_mtime_ns)
        if self._footer is None or self._footer[0] != version:
            self._cache.clear()
            self._footer = (version, open_parquet(self.path).metadata)
        return open_parquet(self.path, metadata=self._footer[1])

    def row(self, group: int, k: int) -> Optional[dict]:
        """{column: value} of row k of a group, None when the group has no such row."""
        table = self._cache.get(group)
        if table is None:
            handle = self._open()
            if group >= handle.metadata.num_row_groups:
                return None
            table = read_row_group(handle, self.path, group, self.fields.columns)
            self._cache[group] = table
            if len(self._cache) > CACHED_ROW_GROUPS:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(group)
        if k >= table.num_rows:
            return None
        return {column: table.column(column)[k].as_py() for column in self.fields.columns}


@dataclasses.dataclass(frozen=True)
class ParquetSource:
    path: str
    task: str
    groups: RowGroups
    seed: int = 0

    def example(self, group: int, k: int, row: int, index: int) -> Union[Example, SNIExample]:
        where = f"{self.path}:row {row}"
        record = self.groups.row(group, k)
        values = check_record(record, self.groups.fields)[0] if record is not None else None
        if values is None or values.get("task", self.task) != self.task:
            raise changed(where, "row")
        return record_example(values, self.task, where, self.seed, index)


def parquet_rows(path: Path, fields: Fields) -> Iterator[tuple[str, str, dict]]:
    """("row N", "file:row N", {column: value}) of every row of a file, for evaluation: the mapped
    columns (the prompt's must be there) and those of EVAL_COLUMNS the table has."""
    handle = open_parquet(path)
    names = handle.schema_arrow.names
    if fields.src not in names:
        raise DataError(
            f"{path}: no column {fields.src!r} (data.fields.src); its columns are {', '.join(names[:20])}"
            + fields_hint(dict.fromkeys(names), fields, keys=False)
        )
    wanted = [*fields.columns, *EVAL_COLUMNS] + ([] if fields.task else ["task"])
    columns = [c for c in dict.fromkeys(wanted) if c in names]
    for group, first in zip(range(handle.metadata.num_row_groups), group_first_rows(handle.metadata)):
        table = read_row_group(handle, path, group, columns)
        cells = {column: table.column(column).to_pylist() for column in columns}
        for k in range(table.num_rows):
            yield f"row {first + k}", f"{path}:row {first + k}", {c: cells[c][k] for c in columns}


@register
class ParquetFormat(Format):
    name = "parquet"
    suffixes = (".parquet",)

    def where(self, path: str, number: int) -> str:
        return f"{path}:row {number}"

    def scan(self, path: Path, fields: Fields, me: int, count: int) -> tuple[dict, array.array]:
        scan = scan_parquet(path, fields, me, count)
        return {
            "skips": scan.skips,
            "tasks": scan.tasks.names,
            "benchmarks": scan.tasks.benchmark_list(),
        }, scan.records

    def sources(self, path: str, fields: Fields, seed: int):
        groups = RowGroups(path, fields)  # one per file: its cached row groups serve all its tasks
        return lambda task: ParquetSource(path, task, groups, seed)

    def eval_records(self, file: Path, fields: Fields):
        return parquet_rows(file, fields)
