"""What every data format's reader shares: the examples it yields, the column mapping of records
(`Fields`, data.fields), the checks of a record's values and the counting of what is skipped
(`SkipStats`). The formats themselves, one module each, are in formats/.

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

import dataclasses
import logging
import os
from collections import Counter
from collections.abc import Mapping
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


class EvalDataError(DataError):
    """Evaluation data that cannot be scored as given; the message names the file and key."""


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
        self.first_message: Optional[str] = None  # of the first skip, for "no usable examples" errors

    def skip(self, reason: str, file: str, where: str, detail: str = "") -> None:
        """Records one unusable record at `where` ("file:line" or "file#id") in `file`."""
        message = f"{where}: {reason}" + (f" ({detail})" if detail else "")
        if self.on_error == "raise":
            raise DataError(message + "; set data.on_error='skip' to skip such records")
        self.counts[reason] += 1
        self.first_message = self.first_message or message
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


def bad_unicode(text: str) -> bool:
    # json.loads accepts "\ud800" escapes, giving lone surrogates that the tokenizer cannot encode.
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def check_string_field(record: dict, key: str) -> Optional[tuple[str, str]]:
    """(reason, detail) if record[key] is not a usable string, else None."""
    if key not in record:
        return "missing_field", f"no {key!r} field"
    value = record[key]
    if not isinstance(value, str):
        return (
            "non_string_field",
            f"{key!r} is {'null' if value is None else type(value).__name__}, expected string",
        )
    if bad_unicode(value):
        return "invalid_unicode", f"{key!r} holds a lone surrogate"
    return None


def definition_text(value) -> Optional[str]:
    # SNI stores "Definition" as a list of strings (almost always one); older files use a string.
    if isinstance(value, str):
        parts = [value]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        parts = value
    else:
        return None
    text = "\n".join(p.strip() for p in parts if p.strip())
    return text if text and not bad_unicode(text) else None


# ---------------------------------------------------------------------------------------- fields
FIELD_NAMES = ("src", "tgt", "task", "definition", "benchmark")


@dataclasses.dataclass(frozen=True)
class Fields:
    """The key (JSONL) or column (Parquet) holding each of our fields (data.fields). `src`, `tgt`: the
    prompt and the target; `task`: the name of the row's task (None: the file's stem names the task of
    all its rows); `definition`: an SNI-style instruction (None: `src` is the whole prompt; else `src`
    is the instance's input and the prompt is SNI's zero-shot template, templates.format_sni);
    `benchmark`: the collection the row's task belongs to (data.mixture weighs collections; None: not
    read). A `src` of None reads plain text: an empty prompt and `tgt` the whole text (data.mixture's
    `loss: all` slices)."""

    src: Optional[str] = "src"
    tgt: str = "tgt"
    task: Optional[str] = None
    definition: Optional[str] = None
    benchmark: Optional[str] = None

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
            optional = key in ("task", "definition", "benchmark")  # null: not read (as when left out)
            if not (isinstance(column, str) and column or optional and column is None):
                raise ValueError(f"{key} must name a column (a non-empty string), got {column!r}")
        return cls(**mapping)

    @classmethod
    def from_text(cls, text: Optional[str]) -> "Fields":
        """From `src=inputs,tgt=targets` (evaluation's --fields); ValueError naming the bad part."""
        if not text:
            return cls()
        mapping = {}
        for part in text.split(","):
            name, sep, column = (p.strip() for p in part.partition("="))
            if not sep:
                raise ValueError(f"expected NAME=COLUMN pairs separated by commas, got {part!r}")
            mapping[name] = column
        return cls.from_mapping(mapping)

    def mapped(self) -> list[tuple[str, str]]:
        """(our name, column) of every field read from the records."""
        return [(name, getattr(self, name)) for name in FIELD_NAMES if getattr(self, name) is not None]

    @property
    def columns(self) -> list[str]:
        return list(dict.fromkeys(column for _, column in self.mapped()))


# Key pairs that datasets use for a prompt and its target: a record that has one of them and not the
# configured keys most likely needs data.fields.
COMMON_FIELD_PAIRS = (
    ("source", "target"),
    ("input", "output"),
    ("inputs", "targets"),
    ("prompt", "completion"),
    ("instruction", "response"),
    ("question", "answer"),
)


def fields_hint(record: dict, fields: Fields, keys: bool = True) -> str:
    """A hint for a record that lacks the configured src/tgt keys and has a common pair: "; its keys are
    ...: map them with data.fields.src=... data.fields.tgt=..." (`keys=False`: without the key list);
    else ""."""
    if fields.src in record and fields.tgt in record:
        return ""
    for src, tgt in COMMON_FIELD_PAIRS:
        if src in record and tgt in record:
            listed = f"; its keys are {', '.join(map(str, list(record)[:10]))}" if keys else ""
            return f"{listed}: map them with data.fields.src={src} data.fields.tgt={tgt}"
    return ""


def check_record(record: dict, fields: Fields) -> tuple[Optional[dict], Optional[tuple[str, str]]]:
    """({our name: value}, None) for a usable record (a JSONL object, a Parquet row), else (None,
    (reason, detail)).

    Empty `src` is allowed (plain language-model text has only a target); an empty or all-whitespace
    `tgt` is skipped because the example would train only on `</s>`."""
    problem = (fields.src is not None and check_string_field(record, fields.src)) or check_string_field(
        record, fields.tgt
    )
    if problem:
        if problem[0] == "missing_field":
            problem = (problem[0], problem[1] + fields_hint(record, fields))
        return None, problem
    values = {"src": "" if fields.src is None else record[fields.src], "tgt": record[fields.tgt]}
    if not values["tgt"].strip():
        return None, ("empty_target", "")
    for name in ("task", "benchmark"):
        column = getattr(fields, name)
        if column is not None:
            problem = check_string_field(record, column)
            if problem:
                return None, problem
            if not record[column].strip():
                return None, (f"empty_{name}", f"{column!r} is empty")
            values[name] = record[column]
    if fields.definition is not None:
        if fields.definition not in record:
            return None, ("missing_field", f"no {fields.definition!r} field")
        values["definition"] = definition_text(record[fields.definition])
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
    """Task names a scan met, numbered in order of appearance (an int64 index carries the numbers), and
    the benchmark each one's rows name (data.fields.benchmark)."""

    def __init__(self):
        self.names: list[str] = []
        self._codes: dict[str, int] = {}
        self.benchmarks: dict[int, str] = {}  # task code -> benchmark (code 0: a file without a task field)

    def code(self, name: str) -> int:
        if name not in self._codes:
            self._codes[name] = len(self.names)
            self.names.append(name)
        return self._codes[name]

    def record(self, values: dict) -> tuple[Optional[int], Optional[tuple[str, str]]]:
        """(task code, None) of a usable record's values, or (None, (reason, detail)) when its benchmark
        differs from the one earlier rows of its task named (a task belongs to one benchmark)."""
        code = self.code(values["task"]) if "task" in values else 0
        benchmark = values.get("benchmark")
        if benchmark is not None:
            first = self.benchmarks.setdefault(code, benchmark)
            if first != benchmark:
                return None, ("benchmark_conflict", f"benchmark {benchmark!r}; its task's rows say {first!r}")
        return code, None

    def benchmark_list(self) -> list:
        """Benchmark per task code (None where no row named one), as JSON carries it."""
        return [self.benchmarks.get(code) for code in range(max(len(self.names), 1))]


def open_data_file(path: str | os.PathLike):
    try:
        return open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror})") from None


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
