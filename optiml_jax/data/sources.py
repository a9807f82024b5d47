"""Data formats: Super-NaturalInstructions task files, metaseq `src`/`tgt` JSONL and Parquet tables (the
hub's format). Finding the files, checking every record, noting where each usable one is (a byte span;
for Parquet its row group and row: records.py indexes them and reads one back when a batch needs it)
and turning a record into an `Example`.

JSONL and Parquet records go through one column mapping, `Fields` (data.fields): which key or column
holds the prompt (`src`), the target (`tgt`), optionally the row's task (`task`; else the file's stem)
and an SNI-style instruction (`definition`: the prompt is then SNI's template of definition and input).

Bad data never crashes deep inside training. Every record that cannot be used is either skipped and
counted in a `SkipStats` (reason -> count; the first few per file are logged with `file:line`, then a
per-file summary), or, with `on_error="raise"`, raises a `DataError` that names `file:line` (JSONL),
`file:row N` (Parquet, rows counted from 0 at the file's start, as pandas and `datasets` number them)
or `file#instance_id` (SNI). A Parquet file whose mapped column is missing or does not hold strings is
a `DataError` naming the file and column. The reader does the checking so that templates, tokenizer
and packer can assume clean strings.
"""

from __future__ import annotations

import array
import dataclasses
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Union

from optiml_jax.data import templates

logger = logging.getLogger(__name__)

ON_ERROR_CHOICES = ("skip", "raise")
# Per file, this many skipped records are logged one by one; the rest only appear in the summary, so a
# corrupt million-line file does not flood the log.
MAX_LOGGED_PER_FILE = 5
# Locations kept per reason in SkipStats.samples, for the training loop's report.
MAX_SAMPLES_PER_REASON = 5


class DataError(ValueError):
    """A data file or record is unusable; the message names the file and line (or instance id)."""


@dataclasses.dataclass(frozen=True)
class Example:
    task: str
    src: str
    tgt: str
    source: str  # "file:line" (JSONL), "file:row N" (Parquet) or "file#instance_id" (SNI), for error messages


@dataclasses.dataclass(frozen=True)
class SNIExample:
    """One SNI instance, formatted (templates.format_sni) only when its `src` is asked for.

    Every instance of a task refers to the task's one definition and exemplars instead of holding its
    own formatted copy (the definition is most of a zero-shot prompt, and k-shot prompts repeat the
    exemplars too), and a training process formats only the instances of its own batch rows."""

    task: str
    source: str
    definition: str
    input: str
    output: str
    exemplars: tuple[tuple[str, str], ...]
    seed: int
    index: int
    # False for a JSONL/Parquet row with a definition column (data.fields.definition): its one target is
    # its only reference, where a task file's instance has all of its references in the file
    in_task_file: bool = True

    @property
    def src(self) -> str:
        return templates.format_sni(
            self.definition,
            self.input,
            self.output,
            exemplars=self.exemplars,
            seed=self.seed,
            task=self.task,
            index=self.index,
        )[0]

    @property
    def tgt(self) -> str:
        return self.output.strip()


@dataclasses.dataclass(frozen=True)
class SNITask:
    """One SNI task file, validated. `instances` are (id, input, output) with one chosen output."""

    name: str
    path: str
    definition: str
    positive_examples: tuple[tuple[str, str], ...]
    instances: tuple[tuple[str, str, str], ...]


class SkipStats:
    """Counts skipped records by reason and logs where they were; or raises with on_error="raise"."""

    def __init__(self, on_error: str = "skip", log: bool = True):
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
        self.on_error = on_error
        self.log = log
        self.counts: Counter = Counter()
        self.samples: dict[str, list[str]] = {}
        self._per_file: Counter = Counter()
        self._per_file_reasons: dict[str, Counter] = {}

    def skip(self, reason: str, file: str, where: str, detail: str = "") -> None:
        """Records one unusable record at `where` ("file:line" or "file#id") in `file`."""
        message = f"{where}: {reason}" + (f" ({detail})" if detail else "")
        if self.on_error == "raise":
            raise DataError(message + "; set data.on_error='skip' to skip such records")
        self.counts[reason] += 1
        samples = self.samples.setdefault(reason, [])
        if len(samples) < MAX_SAMPLES_PER_REASON:
            samples.append(where)
        self._per_file[file] += 1
        self._per_file_reasons.setdefault(file, Counter())[reason] += 1
        if self.log and self._per_file[file] <= MAX_LOGGED_PER_FILE:
            logger.warning("skipping record %s", message)

    def end_file(self, file: str) -> None:
        """Logs the per-file summary once a file is read (only when something was skipped)."""
        n = self._per_file.get(file, 0)
        if n and self.log:
            reasons = ", ".join(f"{r}={c}" for r, c in sorted(self._per_file_reasons[file].items()))
            shown = min(n, MAX_LOGGED_PER_FILE)
            logger.warning("%s: skipped %d record(s) (%d shown above): %s", file, n, shown, reasons)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def __repr__(self) -> str:
        return f"SkipStats({self.as_dict()})"


def _bad_unicode(text: str) -> bool:
    # json.loads accepts "\ud800" escapes, giving lone surrogates that the tokenizer cannot encode.
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _check_string_field(record: dict, key: str) -> Optional[tuple[str, str]]:
    """(reason, detail) if record[key] is not a usable string, else None."""
    if key not in record:
        return "missing_field", f"no {key!r} field"
    value = record[key]
    if not isinstance(value, str):
        return (
            "non_string_field",
            f"{key!r} is {'null' if value is None else type(value).__name__}, expected string",
        )
    if _bad_unicode(value):
        return "invalid_unicode", f"{key!r} holds a lone surrogate"
    return None


# ---------------------------------------------------------------------------------------- fields
FIELD_NAMES = ("src", "tgt", "task", "definition")


@dataclasses.dataclass(frozen=True)
class Fields:
    """The key (JSONL) or column (Parquet) holding each of our fields (data.fields). `src`, `tgt`: the
    prompt and the target; `task`: the name of the row's task (None: the file's stem names the task of
    all its rows); `definition`: an SNI-style instruction (None: `src` is the whole prompt; else `src`
    is the instance's input and the prompt is SNI's zero-shot template, templates.format_sni)."""

    src: str = "src"
    tgt: str = "tgt"
    task: Optional[str] = None
    definition: Optional[str] = None

    @classmethod
    def from_mapping(cls, mapping) -> "Fields":
        """From data.fields (our name -> column); ValueError naming the bad key or value."""
        if mapping is None:
            return cls()
        if not isinstance(mapping, Mapping):
            raise ValueError(
                f"must map our names ({', '.join(FIELD_NAMES)}) to the file's columns, "
                f"e.g. {{src: inputs, tgt: targets}}; got {mapping!r}"
            )
        unknown = sorted(map(str, set(mapping) - set(FIELD_NAMES)))
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r} (known: {', '.join(FIELD_NAMES)})")
        for key, column in mapping.items():
            optional = key in ("task", "definition")  # null: not read (as when left out)
            if not (isinstance(column, str) and column or optional and column is None):
                raise ValueError(f"{key} must name a column (a non-empty string), got {column!r}")
        return cls(**mapping)

    def mapped(self) -> list[tuple[str, str]]:
        """(our name, column) of every field read from the records."""
        return [(name, getattr(self, name)) for name in FIELD_NAMES if getattr(self, name) is not None]

    @property
    def columns(self) -> list[str]:
        return list(dict.fromkeys(column for _, column in self.mapped()))


def check_record(record: dict, fields: Fields) -> tuple[Optional[dict], Optional[tuple[str, str]]]:
    """({our name: value}, None) for a usable record (a JSONL object, a Parquet row), else (None,
    (reason, detail)).

    Empty `src` is allowed (plain language-model text has only a target); an empty or all-whitespace
    `tgt` is skipped because the example would train only on `</s>`."""
    problem = _check_string_field(record, fields.src) or _check_string_field(record, fields.tgt)
    if problem:
        return None, problem
    values = {"src": record[fields.src], "tgt": record[fields.tgt]}
    if not values["tgt"].strip():
        return None, ("empty_target", "")
    if fields.task is not None:
        problem = _check_string_field(record, fields.task)
        if problem:
            return None, problem
        if not record[fields.task].strip():
            return None, ("empty_task", f"{fields.task!r} is empty")
        values["task"] = record[fields.task]
    if fields.definition is not None:
        if fields.definition not in record:
            return None, ("missing_field", f"no {fields.definition!r} field")
        values["definition"] = _definition_text(record[fields.definition])
        if values["definition"] is None:
            return None, (
                "bad_definition",
                f"{fields.definition!r} is not a non-empty string (or list of strings)",
            )
    return values, None


def record_example(
    values: dict, task: str, source: str, seed: int, index: int
) -> Union[Example, "SNIExample"]:
    """The example of a record check_record accepted: its src and tgt as they are, or, with a definition,
    an SNI instance (prompted as task files' instances are, `index` seeding its answer delimiter)."""
    if "definition" in values:
        return SNIExample(
            task=task,
            source=source,
            definition=values["definition"],
            input=values["src"],
            output=values["tgt"],
            exemplars=(),
            seed=seed,
            index=index,
            in_task_file=False,
        )
    return Example(task=task, src=values["src"], tgt=values["tgt"], source=source)


class TaskCodes:
    """Task names a scan met, numbered in order of appearance (an int64 index carries the numbers)."""

    def __init__(self):
        self.names: list[str] = []
        self._codes: dict[str, int] = {}

    def code(self, name: str) -> int:
        if name not in self._codes:
            self._codes[name] = len(self.names)
            self.names.append(name)
        return self._codes[name]


# ---------------------------------------------------------------------------------------- JSONL
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


def check_jsonl_line(
    raw: bytes, fields: Fields = Fields()
) -> tuple[Optional[dict], Optional[tuple[str, str]]]:
    """({our name: value}, None) for a usable line (check_record), (None, (reason, detail)) for an
    unusable one, (None, None) for a blank line (not a record: e.g. a trailing newline)."""
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
    return check_record(record, fields)


def open_data_file(path: str | os.PathLike):
    try:
        return open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror})") from None


def scan_jsonl(
    path: str | os.PathLike, lo: int = 0, hi: Optional[int] = None, fields: Fields = Fields()
) -> JsonlScan:
    """Checks the lines of a JSONL file that START in bytes [lo, hi) (all of it by default), reading only
    those lines: ranges that tile a file give every line to exactly one scan."""
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
            values, problem = check_jsonl_line(raw, fields)
            if values is not None:
                end = offset - (1 if raw.endswith(b"\n") else 0)
                code = scan.tasks.code(values["task"]) if "task" in values else 0
                scan.records.extend((start, end, scan.lines, code))
            elif problem is not None:
                scan.skips.append((scan.lines, *problem))
    return scan


def jsonl_files(path: str | os.PathLike) -> list[Path]:
    """A `.jsonl` file, or every `.jsonl` under a directory (metaseq `train/00/x.jsonl` nesting too)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: no such file or directory")
    files = sorted(p for p in path.rglob("*.jsonl") if p.is_file())
    if not files:
        raise DataError(f"{path}: directory holds no .jsonl files")
    return files


# ---------------------------------------------------------------------------------------- Parquet
# Parquet is read through pyarrow, imported when a Parquet file is met: reading only SNI or JSONL data
# never pays for it.
def parquet_files(path: str | os.PathLike) -> list[Path]:
    """A `.parquet` file, or every `.parquet` under a directory (the hub's `data/train-0000N-of-...`)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: no such file or directory")
    files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
    if not files:
        raise DataError(f"{path}: directory holds no .parquet files")
    return files


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
    path: str | os.PathLike, fields: Fields = Fields(), me: int = 0, count: int = 1
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
            if values is None:
                scan.skips.append((firsts[group] + k, *problem))
            else:
                code = scan.tasks.code(values["task"]) if "task" in values else 0
                scan.records.extend((group, k, firsts[group] + k, code))
    return scan


# ---------------------------------------------------------------------------------------- SNI
def read_split_file(path: str | os.PathLike) -> list[str]:
    """Task names, one per line, as in SNI's `splits/default/train_tasks.txt` (# comments allowed)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: split file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: split file is not UTF-8 ({e.reason} at byte {e.start})") from None
    names = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line[:-5] if line.endswith(".json") else line)
    return names


def sni_files(path: str | os.PathLike, split_file: Optional[str | os.PathLike] = None) -> list[Path]:
    """A task `.json` file, or the `task*.json` files of a directory, optionally only those listed in
    `split_file`. Split entries without a file here are fine (a sample holds a subset of the split)."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.glob("task*.json") if p.is_file())
        if not files:
            raise DataError(f"{path}: directory holds no SNI task*.json files")
    else:
        raise DataError(f"{path}: no such file or directory")
    if split_file is not None:
        wanted = set(read_split_file(split_file))
        kept = [f for f in files if f.stem in wanted]
        logger.info("%s: split %s keeps %d of %d task files", path, split_file, len(kept), len(files))
        if not kept:
            raise DataError(f"{split_file}: none of the {len(files)} task files in {path} is listed")
        files = kept
    return files


def _definition_text(value) -> Optional[str]:
    # SNI stores "Definition" as a list of strings (almost always one); older files use a string.
    if isinstance(value, str):
        parts = [value]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        parts = value
    else:
        return None
    text = "\n".join(p.strip() for p in parts if p.strip())
    return text if text and not _bad_unicode(text) else None


def _choose_output(output) -> tuple[Optional[str], str]:
    """(chosen output, reason if none). SNI instances list several reference outputs (any is correct
    for ROUGE evaluation). For training we take the FIRST non-empty one: deterministic without an RNG,
    one training example per instance (so EPS proportions count instances, not references), and never
    an empty target (task1564 has an output "" that would teach the model to answer with just `</s>`)."""
    if isinstance(output, str):
        output = [output]
    if not isinstance(output, list):
        return None, f"'output' is {type(output).__name__}, expected a list of strings"
    for candidate in output:
        if isinstance(candidate, str) and candidate.strip() and not _bad_unicode(candidate):
            return candidate, ""
    return None, "no non-empty string in 'output'"


@dataclasses.dataclass
class SNIScan:
    """What parsing one SNI task file found. Byte offsets are into the file as stored."""

    problem: Optional[tuple[str, str, str]] = None  # (reason, where, detail): the whole file is unusable
    definition: str = ""
    positive_examples: tuple[tuple[str, str], ...] = ()
    instances: list = dataclasses.field(default_factory=list)  # (start, end, i) of usable Instances[i]
    skips: list = dataclasses.field(default_factory=list)  # (reason, where, detail) of exemplars, instances
    instances_span: tuple[int, int] = (0, 0)  # bytes of the Instances array (header readers skip it)
    parsed: list = dataclasses.field(default_factory=list)  # (id, input, output) of usable instances


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _parse_task(text: str) -> tuple[dict, tuple[int, int], list[tuple[int, int]]]:
    """(the top-level object, character span of its "Instances" array, spans of the array's elements),
    parsed once with the standard decoder, value by value. Raises ValueError (or RecursionError) where
    the text is not one JSON object; the caller then asks json.loads for its canonical message. Like
    json.loads, the last of repeated keys wins."""
    decode = json.JSONDecoder().raw_decode

    def skip(i):
        return _JSON_SPACE.match(text, i).end()

    def expect(i, char):
        if text[i : i + 1] != char:
            raise ValueError(f"expected {char!r} at character {i}")
        return skip(i + 1)

    data, array_span, spans = {}, (0, 0), []
    pos = expect(skip(0), "{")
    while text[pos : pos + 1] != "}":
        key, pos = decode(text, pos)
        if not isinstance(key, str):
            raise ValueError(f"object key at character {pos} is not a string")
        pos = expect(skip(pos), ":")
        if key == "Instances" and text[pos : pos + 1] == "[":
            start, items, spans = pos, [], []
            pos = skip(pos + 1)
            while text[pos : pos + 1] != "]":
                value, end = decode(text, pos)
                items.append(value)
                spans.append((pos, end))
                pos = skip(end)
                if text[pos : pos + 1] != "]":
                    pos = expect(pos, ",")
                    if text[pos : pos + 1] == "]":
                        raise ValueError(f"trailing comma before character {pos}")
            array_span, value, pos = (start, pos + 1), items, skip(pos + 1)
        else:
            value, pos = decode(text, pos)
            pos = skip(pos)
        data[key] = value
        if text[pos : pos + 1] != "}":
            pos = expect(pos, ",")
            if text[pos : pos + 1] == "}":
                raise ValueError(f"trailing comma before character {pos}")
    if skip(pos + 1) != len(text):
        raise ValueError(f"extra data after the object at character {pos + 1}")
    return data, array_span, spans


def _byte_offsets(text: str, positions: list[int], base: int) -> list[int]:
    """Byte offsets (in the UTF-8 file, `base` bytes before the text) of character positions."""
    if len(text) == len(text.encode("utf-8")):  # ASCII, the usual case: characters are bytes
        return [base + p for p in positions]
    found, char, byte = {}, 0, base
    for p in sorted(set(positions)):
        byte += len(text[char:p].encode("utf-8"))
        char, found[p] = p, byte
    return [found[p] for p in positions]


def _sni_header(data: dict, name: str, skips: list) -> tuple[Optional[str], tuple[tuple[str, str], ...]]:
    """(definition or None if unusable, usable positive examples) of a parsed task file."""
    positives = []
    raw_positives = data.get("Positive Examples", [])
    if not isinstance(raw_positives, list):
        raw_positives = []
    for i, ex in enumerate(raw_positives):
        ok = (
            isinstance(ex, dict)
            and isinstance(ex.get("input"), str)
            and isinstance(ex.get("output"), str)
            and ex["output"].strip()
            and not _bad_unicode(ex["input"])
            and not _bad_unicode(ex["output"])
        )
        if ok:
            positives.append((ex["input"], ex["output"]))
        else:
            skips.append(("bad_exemplar", f"{name}#Positive Examples[{i}]", "needs string input and output"))
    return _definition_text(data.get("Definition")), tuple(positives)


def _check_instance(inst, i: int, name: str) -> tuple[str, Optional[str], Optional[tuple[str, str, str]]]:
    """(id, chosen output, None) for a usable instance, else (id, None, (reason, where, detail))."""
    ident = inst.get("id") if isinstance(inst, dict) else None
    ident = ident if isinstance(ident, str) and ident else f"Instances[{i}]"
    where = f"{name}#{ident}"
    if not isinstance(inst, dict):
        return ident, None, ("not_an_object", where, f"instance is {type(inst).__name__}")
    problem = _check_string_field(inst, "input")
    if problem:
        return ident, None, (problem[0], where, problem[1])
    if "output" not in inst:
        return ident, None, ("missing_field", where, "no 'output' field")
    output, why = _choose_output(inst["output"])
    if output is None:
        reason = "empty_target" if why.startswith("no non-empty") else "non_string_field"
        return ident, None, (reason, where, why)
    return ident, output, None


def scan_sni_file(path: str | os.PathLike, keep_parsed: bool = False) -> SNIScan:
    """Parses and checks one SNI task file, recording the byte span of every usable instance (and, with
    `keep_parsed`, the instances themselves)."""
    name = str(path)
    with open_data_file(path) as handle:
        raw = handle.read()
    base = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
    scan = SNIScan()
    try:
        text = raw[base:].decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, base + e.start) + 1
        scan.problem = ("invalid_utf8", f"{name}:{line}", f"whole task file skipped: {e.reason}")
        return scan
    try:
        data, array_span, spans = _parse_task(text)
    except (ValueError, RecursionError):
        try:
            data = json.loads(text)  # for its message; or valid JSON that is not an object
        except json.JSONDecodeError as e:
            scan.problem = ("malformed_json", f"{name}:{e.lineno}", f"whole task file skipped: {e.msg}")
            return scan
        except RecursionError:
            scan.problem = ("malformed_json", f"{name}:1", "whole task file skipped: nested too deeply")
            return scan
        if isinstance(data, dict):  # _parse_task reads every JSON object json.loads reads
            raise AssertionError(f"{name}: parsed by json.loads but not by _parse_task") from None
    if not isinstance(data, dict) or not isinstance(data.get("Instances"), list):
        scan.problem = (
            "bad_task_file",
            f"{name}#Instances",
            "whole task file skipped: expected an object with an 'Instances' list",
        )
        return scan
    definition, scan.positive_examples = _sni_header(data, name, scan.skips)
    if definition is None:
        scan.problem = (
            "bad_task_file",
            f"{name}#Definition",
            "whole task file skipped: 'Definition' missing or not (a list of) non-empty strings",
        )
        scan.skips.clear()
        return scan
    scan.definition = definition
    usable = []
    for i, inst in enumerate(data["Instances"]):
        ident, output, problem = _check_instance(inst, i, name)
        if problem:
            scan.skips.append(problem)
            continue
        usable.append(i)
        if keep_parsed:
            scan.parsed.append((ident, inst["input"], output))
    offsets = _byte_offsets(
        text, [p for span in [array_span, *(spans[i] for i in usable)] for p in span], base
    )
    scan.instances_span = (offsets[0], offsets[1])
    scan.instances = list(zip(offsets[2::2], offsets[3::2], usable))
    return scan


def read_sni_header(path: str | os.PathLike, instances_span: tuple[int, int]) -> tuple[str, tuple]:
    """(definition, positive examples) of a task file that scan_sni_file found usable, reading only the
    bytes outside its Instances array (a few KB of a file that is mostly instances)."""
    start, end = instances_span
    with open_data_file(path) as handle:
        head = handle.read(start)
        handle.seek(end)
        tail = handle.read()
    try:
        data = json.loads((head + b"[]" + tail).decode("utf-8-sig"))
        definition, positives = _sni_header(data, str(path), [])
        if definition is None:
            raise ValueError("no usable definition")
    except (
        ValueError,
        AttributeError,
    ) as e:  # JSON and UTF-8 errors are ValueErrors; a non-object has no .get
        raise DataError(
            f"{path}: its definition and exemplars no longer parse ({e}); the file changed after it was read"
        ) from None
    return definition, positives


def read_sni_instance(path: str | os.PathLike, start: int, end: int, position: int) -> tuple[str, str, str]:
    """(id, input, output) of the usable instance at bytes [start, end) of a task file, which is
    Instances[position] (that names an instance without an id)."""
    try:
        inst = json.loads(read_span(path, start, end))
    except (json.JSONDecodeError, UnicodeDecodeError):
        inst = None
    ident, output, problem = _check_instance(inst, position, str(path))
    if problem:
        raise DataError(
            f"{path}: bytes {start}-{end} no longer hold the instance indexed there ({problem[0]}); "
            f"the file changed after it was read"
        )
    return ident, inst["input"], output


def read_span(path: str | os.PathLike, start: int, end: int) -> bytes:
    """Bytes [start, end) of a data file, read with one seek."""
    with open_data_file(path) as handle:
        handle.seek(start)
        raw = handle.read(end - start)
    if len(raw) != end - start:
        raise DataError(
            f"{path}: cannot read the record at bytes {start}-{end}: the file is now {start + len(raw)} "
            f"bytes long; it changed after it was read"
        )
    return raw


def read_sni_task(path: str | os.PathLike, stats: SkipStats) -> Optional[SNITask]:
    """One SNI task file, every usable instance parsed; None (counted) if the file as a whole is unusable."""
    name = str(path)
    scan = scan_sni_file(path, keep_parsed=True)
    for reason, where, detail in [scan.problem] if scan.problem else scan.skips:
        stats.skip(reason, name, where, detail)
    stats.end_file(name)
    if scan.problem:
        return None
    return SNITask(
        name=Path(path).stem,
        path=name,
        definition=scan.definition,
        positive_examples=scan.positive_examples,
        instances=tuple(scan.parsed),
    )


# ---------------------------------------------------------------------------------------- dispatch
FORMATS = ("auto", "sni", "jsonl", "parquet")
_SUFFIXES = {".json": "sni", ".jsonl": "jsonl", ".parquet": "parquet"}


def detect_format(path: str | os.PathLike) -> str:
    """ "sni" for `.json` files / directories of `task*.json`, "jsonl" for `.jsonl` files / trees,
    "parquet" for `.parquet` files / trees."""
    path = Path(path)
    if path.is_file():
        if path.suffix in _SUFFIXES:
            return _SUFFIXES[path.suffix]
        raise DataError(
            f"{path}: cannot tell the data format from the suffix {path.suffix!r}; "
            f"use .json (SNI task), .jsonl (src/tgt lines) or .parquet, or set data.format"
        )
    if not path.is_dir():
        raise DataError(f"{path}: no such file or directory")
    found = {
        "sni": any(p.is_file() for p in path.glob("task*.json")),
        "jsonl": any(p.is_file() for p in path.rglob("*.jsonl")),
        "parquet": any(p.is_file() for p in path.rglob("*.parquet")),
    }
    kinds = [kind for kind, present in found.items() if present]
    names = {"sni": "SNI task*.json", "jsonl": ".jsonl", "parquet": ".parquet"}
    if len(kinds) > 1:
        raise DataError(
            f"{path}: holds both {' and '.join(names[k] for k in kinds)} files; set data.format "
            f"to {' or '.join(repr(k) for k in kinds)}"
        )
    if kinds:
        return kinds[0]
    raise DataError(f"{path}: holds neither SNI task*.json files nor .jsonl or .parquet files")
