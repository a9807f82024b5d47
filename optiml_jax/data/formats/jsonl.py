"""metaseq's JSONL: one JSON object a line, its prompt and target under data.fields' keys (`src`, `tgt`).

Process p checks the lines that START in the p-th of `process_count` equal byte ranges of each file and
notes the byte span of every usable line; a line is read again (one seek) when a batch needs it. The
same line decoder reads evaluation records, which keep every reference (`tgt` as a list, `references`,
or `label` into `options`).
"""

from __future__ import annotations

import array
import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from optiml_jax.data.formats.base import (
    Format,
    changed,
    register,
)
from optiml_jax.data.sources import (
    EvalDataError,
    Example,
    Fields,
    SNIExample,
    TaskCodes,
    check_record,
    open_data_file,
    read_span,
    record_example,
)


@dataclasses.dataclass
class JsonlScan:
    """What one scan of the lines starting in a byte range of a JSONL file found. Line numbers are
    counted from the range's first line (1-based): the caller adds the lines of earlier ranges."""

    lines: int = 0
    # start byte, end byte, line, task code (TaskCodes; 0 without a task field) of each usable line,
    # flat: 32 bytes a record, not a tuple's ~150
    records: array.array = dataclasses.field(default_factory=lambda: array.array("q"))
    skips: list = dataclasses.field(default_factory=list)  # (line, reason, detail)
    tasks: TaskCodes = dataclasses.field(default_factory=TaskCodes)


def decode_jsonl_line(raw: bytes) -> tuple[Optional[dict], Optional[tuple[str, str]]]:
    """(the line's JSON object, None), (None, (reason, detail)) for a line that is not one, (None, None)
    for a blank line (not a record: e.g. a trailing newline). Training and evaluation read lines here."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, ("invalid_utf8", f"byte {e.start}: {e.reason}")
    if not line.strip():
        return None, None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return None, ("malformed_json", e.msg + f" at column {e.colno}")
    except RecursionError:
        return None, ("malformed_json", "nested too deeply")
    if not isinstance(record, dict):
        return None, ("not_an_object", f"got JSON {type(record).__name__}")
    return record, None


def check_jsonl_line(
    raw: bytes,
    fields: Fields = Fields(),  # noqa: B008 (frozen, never mutated)
) -> tuple[Optional[dict], Optional[tuple[str, str]]]:
    """({our name: value}, None) for a usable line (check_record), else as decode_jsonl_line."""
    record, problem = decode_jsonl_line(raw)
    return (None, problem) if record is None else check_record(record, fields)


# (raw line, fields) -> (values, None) | (None, (reason, detail)) | (None, None) for a line that is no record
LineCheck = Callable[[bytes, Fields], tuple[Optional[dict], Optional[tuple[str, str]]]]


def scan_jsonl(
    path: str | os.PathLike,
    lo: int = 0,
    hi: Optional[int] = None,
    fields: Fields = Fields(),  # noqa: B008 (frozen, never mutated)
    check: LineCheck = check_jsonl_line,
) -> JsonlScan:
    """Checks the lines of a JSONL file that START in bytes [lo, hi) (all of it by default), reading only
    those lines: ranges that tile a file give every line to exactly one scan. `check` reads one line (a
    format of one record a line, e.g. plain text, passes its own)."""
    scan = JsonlScan()
    with open_data_file(path) as handle:
        if lo > 0:  # the first line starting at or after lo: lo itself if the byte before it ends a line
            handle.seek(lo - 1)
            lo += len(handle.readline()) - 1
            handle.seek(lo)
        offset = lo
        while hi is None or offset < hi:
            raw = handle.readline()
            if not raw:
                break
            start, offset = offset, offset + len(raw)
            scan.lines += 1
            if start == 0 and raw.startswith(b"\xef\xbb\xbf"):
                raw, start = raw[3:], 3  # UTF-8 byte-order mark written by some editors
            values, problem = check(raw, fields)
            if values is not None:
                code, problem = scan.tasks.record(values)
            if values is not None and problem is None:
                end = offset - (1 if raw.endswith(b"\n") else 0)
                scan.records.extend((start, end, scan.lines, code))
            elif problem is not None:
                scan.skips.append((scan.lines, *problem))
    return scan


@dataclasses.dataclass(frozen=True)
class JsonlSource:
    path: str
    task: str
    fields: Fields = Fields()
    seed: int = 0
    check: LineCheck = check_jsonl_line

    def example(self, start: int, end: int, line: int, index: int) -> Union[Example, SNIExample]:
        values, _ = self.check(read_span(self.path, start, end), self.fields)
        if values is None or values.get("task", self.task) != self.task:
            raise changed(f"{self.path}:{line}")
        return record_example(values, self.task, f"{self.path}:{line}", self.seed, index)


def jsonl_objects(path: str | os.PathLike) -> Iterator[tuple[int, str, dict]]:
    """(line number, "file:line", object) of every non-blank line of a JSONL file; EvalDataError names
    the file and line that is not a JSON object."""
    path = Path(path)
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise EvalDataError(f"{path}: cannot read ({e.strerror})") from None
    if lines and lines[0].startswith(b"\xef\xbb\xbf"):
        lines[0] = lines[0][3:]
    for number, raw in enumerate(lines, start=1):
        at = f"{path}:{number}"
        record, problem = decode_jsonl_line(raw)
        if problem is not None:
            reason, detail = problem
            what = {"invalid_utf8": "not UTF-8", "malformed_json": "not valid JSON"}.get(reason)
            raise EvalDataError(f"{at}: {what} ({detail})" if what else f"{at}: expected a JSON object")
        if record is not None:
            yield number, at, record


@register
class JsonlFormat(Format):
    name = "jsonl"
    suffixes = (".jsonl",)

    def scan(self, path: Path, fields: Fields, me: int, count: int) -> tuple[dict, array.array]:
        size = path.stat().st_size
        scan = scan_jsonl(path, size * me // count, size * (me + 1) // count, fields)
        entry = {"lines": scan.lines, "skips": scan.skips, "tasks": scan.tasks.names}
        return {**entry, "benchmarks": scan.tasks.benchmark_list()}, scan.records

    def sources(self, path: str, fields: Fields, seed: int):
        return lambda task: JsonlSource(path, task, fields, seed)

    def eval_records(self, file: Path, fields: Fields):
        return jsonl_objects(file)
