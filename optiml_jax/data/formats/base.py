"""The registry of data formats, and what every format's reader shares.

A format is one module of this package defining a `Format` subclass and registering it with
`@register` (as Levanter registers its dataset formats by name). It says

* how it is detected: `suffixes` of its files, `pattern` of its files in a directory, or `claims()`
  for a path of its own form (`hf:NAME`);
* how a process reads its share for training: `scan()` notes where the usable records of its share
  of a file are (records.py exchanges the notes), and `sources()` reads one record back as an Example;
* how it yields evaluation instances: `eval_tasks()`, every reference kept.

Training (records.py), evaluation (eval/tasks.py) and the configuration's and CLIs' choices
(`format_choices()`: data.format, eval.tasks.format, --format) all ask the registry, so adding a
format is one new module (imported by this package's __init__) plus its tests.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, Iterable, Optional, Protocol, Union

from optiml_jax.data.sources import (
    DataError,
    EvalDataError,
    Example,
    Fields,
    SNIExample,
    definition_text,
    fields_hint,
)

AUTO = "auto"
UNCATEGORIZED = "uncategorized"


def category_name(category: str) -> str:
    """'Textual Entailment' -> 'textual_entailment' (the official grouping key)."""
    return "_".join(category.lower().split()) or UNCATEGORIZED


@dataclasses.dataclass(frozen=True)
class EvalInstance:
    id: str | int  # the SNI instance's own id; the line number in a JSONL file; "row N" in Parquet
    # SNI (or a mapped definition): the instance's input (prompts.py builds the prompt); else the prompt
    input: str
    references: tuple[str, ...]
    source: str  # "file#id" or "file:line", for messages
    options: tuple[str, ...] = ()  # answer candidates of a record: ranked by likelihood (scoring.py)


@dataclasses.dataclass(frozen=True)
class EvalTask:
    name: str
    category: str  # category_name() of the task's first category
    path: str
    instances: tuple[EvalInstance, ...]
    definition: Optional[str] = None  # SNI; None for records whose inputs are ready prompts
    positive_examples: tuple[tuple[str, str], ...] = ()  # (input, output), in file order
    # SNI: the distinct reference outputs of all the file's instances, in order of first appearance
    # (None when there are more than MAX_LABELS): the candidates of rank classification
    labels: Optional[tuple[str, ...]] = None

    @property
    def is_sni(self) -> bool:
        return self.definition is not None


class Source(Protocol):
    """Where a task's records of one file are read back from: `example(a, b, number, index)` is the
    record at (a, b) (byte span, or Parquet row group and row), `number` its line/row/position in the file
    and `index` its number among its task's usable records."""

    def example(self, a: int, b: int, number: int, index: int) -> Union[Example, SNIExample]: ...


class Format:
    """One data format. Subclasses set the class attributes and implement the methods their kind
    of sharing needs (`whole_files`: a file is one document that one process parses whole; else every
    process scans its byte range of each file)."""

    name: str = ""
    suffixes: tuple[str, ...] = ()  # a file with one of these suffixes is this format
    pattern: str = ""  # the files of this format in a directory (glob); default: "*" + its first suffix
    recursive: bool = True  # `pattern` is searched in subdirectories too
    described: str = ""  # how messages name its files; default: its first suffix
    selectable: bool = True  # a value of data.format / --format (False: detected from the path only)
    whole_files: bool = False
    has_exemplars: bool = False  # few-shot templates need the file's own exemplars
    reads_as: Optional[str] = None  # the format of the files files() gives, if another one's
    takes_split_file: bool = False  # a split file (data.train_tasks, --split) selects its files

    def claims(self, path) -> bool:
        """Whether `path` has this format's own form, whatever is on disk (e.g. `hf:NAME`)."""
        return False

    def files(self, path, split_file=None) -> list[Path]:
        """The data files of `path`: the file itself, or this format's files under a directory."""
        if split_file is not None:
            raise EvalDataError(f"{split_file}: a split file selects SNI task files; {path} is {self.name}")
        return find_files(path, self.pattern, self.recursive, self.described)

    def listed(self, path, file: Path) -> str:
        """What processes compare to know they read the same file."""
        return str(file)

    # ------------------------------------------------------------------ training
    def scan(self, path: Path, fields: Fields, me: int, count: int) -> tuple[dict, object]:
        """(entry, records) of process `me`'s share of a file: `entry` is JSON (its "skips" are (number,
        reason, detail); "lines" the lines the share counted, if its numbers count from the share's start;
        "tasks" the task names its task codes index), `records` flat int64 (a, b, number, task code)."""
        raise NotImplementedError

    def where(self, path: str, number: int) -> str:
        """How messages locate record `number` of a file."""
        return f"{path}:{number}"

    def sources(self, path: str, fields: Fields, seed: int) -> Callable[[str], Source]:
        """task name -> the Source reading that task's records of the file back."""
        raise NotImplementedError

    # ------------------------------------------------------------------ evaluation
    def eval_tasks(self, path, split_file, max_instances: int, fields: Fields) -> list[EvalTask]:
        """The evaluation tasks at `path`, each with its first `max_instances` instances (0 = all): by
        default those of the records eval_records() gives (records_eval_tasks), merged across files."""
        return merge_eval_tasks(
            (
                records_eval_tasks(file, self.eval_records(file, fields), max_instances, fields)
                for file in self.files(path, split_file)
            ),
            max_instances,
        )

    def eval_records(self, file: Path, fields: Fields) -> Iterable[tuple[int | str, str, dict]]:
        """(id, "where", {key: value}) of every record of a file, for records_eval_tasks."""
        raise NotImplementedError


_REGISTRY: dict[str, Format] = {}


def register(cls: type[Format]) -> type[Format]:
    """Class decorator: registers one instance of a Format subclass under its `name`."""
    if not cls.name or cls.name == AUTO or cls.name in _REGISTRY:
        raise ValueError(f"format name {cls.name!r} is empty, reserved or registered twice")
    fmt = cls()
    if cls.suffixes:
        fmt.pattern = fmt.pattern or f"*{cls.suffixes[0]}"
        fmt.described = fmt.described or cls.suffixes[0]
    _REGISTRY[cls.name] = fmt
    return cls


def unregister(name: str) -> None:
    """Removes a registered format (for tests that register one of their own)."""
    _REGISTRY.pop(name, None)


def get_format(name: str) -> Format:
    if name not in _REGISTRY:
        raise ValueError(f"format must be one of {', '.join(format_choices())}, got {name!r}")
    return _REGISTRY[name]


def selectable_names() -> tuple[str, ...]:
    return tuple(name for name, fmt in _REGISTRY.items() if fmt.selectable)


def format_choices() -> tuple[str, ...]:
    """The values of data.format, eval.tasks.format and --format: "auto" and every selectable format."""
    return (AUTO, *selectable_names())


def find_files(path, pattern: str, recursive: bool, described: str) -> list[Path]:
    """A file, or the files matching `pattern` under a directory, sorted; DataError when there are none."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: no such file or directory")
    found = path.rglob(pattern) if recursive else path.glob(pattern)
    files = sorted(p for p in found if p.is_file())
    if not files:
        raise DataError(f"{path}: directory holds no {described} files")
    return files


def resolve_format(path, format: str = AUTO) -> Format:
    """The format reading `path`: the one `format` names, else the one that claims the path's form,
    else the one its suffix or its directory's files say (DataError when none or several do)."""
    if format != AUTO:
        return get_format(format)
    for fmt in _REGISTRY.values():
        if fmt.claims(path):
            return fmt
    return get_format(detect_format(path))


def detect_format(path: str | os.PathLike) -> str:
    """The selectable format whose suffix a file has, or whose files a directory holds."""
    formats = [fmt for fmt in _REGISTRY.values() if fmt.selectable]
    path = Path(path)
    if path.is_file():
        for fmt in formats:
            if path.suffix in fmt.suffixes:
                return fmt.name
        known = ", ".join(f"{s} ({fmt.described})" for fmt in formats for s in fmt.suffixes)
        raise DataError(
            f"{path}: cannot tell the data format from the suffix {path.suffix!r}; "
            f"use {known}, or set data.format"
        )
    if not path.is_dir():
        raise DataError(f"{path}: no such file or directory")
    found = [
        fmt
        for fmt in formats
        if fmt.pattern and any(p.is_file() for p in (path.rglob if fmt.recursive else path.glob)(fmt.pattern))
    ]
    if len(found) > 1:
        raise DataError(
            f"{path}: holds both {' and '.join(fmt.described for fmt in found)} files; set data.format "
            f"to {' or '.join(repr(fmt.name) for fmt in found)}"
        )
    if found:
        return found[0].name
    described = [fmt.described for fmt in formats]
    raise DataError(f"{path}: holds neither {', '.join(described[:-1])} nor {described[-1]} files")


def changed(where: str, what: str = "line") -> DataError:
    """The error of a record that no longer reads as it did when the run indexed it."""
    return DataError(
        f"{where}: the {what} no longer holds the usable record found there when the run started; "
        f"the file changed after it was read"
    )


def merge_eval_tasks(task_lists: Iterable[list[EvalTask]], max_instances: int) -> list[EvalTask]:
    """Tasks of the same name (records of several files naming their task) merged in file order."""
    tasks: dict[str, EvalTask] = {}
    for found in task_lists:
        for task in found:
            if task.name in tasks:
                old = tasks[task.name]
                task = dataclasses.replace(
                    old, instances=(old.instances + task.instances)[: max_instances or None]
                )
            tasks[task.name] = task
    return list(tasks.values())


def check_max_instances(max_instances) -> None:
    if isinstance(max_instances, bool) or not isinstance(max_instances, int) or max_instances < 0:
        raise ValueError(f"max_instances must be an integer >= 0 (0 = all), got {max_instances!r}")


# ------------------------------------------------------------------ evaluation records (JSONL, Parquet)
def references(value, where: str, key: str) -> tuple[str, ...]:
    refs = [value] if isinstance(value, str) else value
    if not isinstance(refs, list) or not refs:
        raise EvalDataError(
            f"{where}: {key!r} must be a non-empty list of reference strings, got {value!r:.80}"
        )
    bad = [r for r in refs if not isinstance(r, str)]
    if bad:
        raise EvalDataError(f"{where}: {key!r} holds a non-string reference {bad[0]!r:.80}")
    return tuple(refs)


def _options(record: dict, at: str) -> tuple[str, ...]:
    options = record.get("options", [])
    if options is None:  # a Parquet table with an options column has null where a row has none
        options = []
    if (
        not isinstance(options, list)
        or not all(isinstance(o, str) and o for o in options)
        or len(set(options)) != len(options)
        or len(options) == 1
    ):
        raise EvalDataError(f"{at}: 'options' must be a list of at least two distinct non-empty strings")
    return tuple(options)


def _record_references(record: dict, at: str, fields: Fields, options: tuple) -> tuple[str, ...]:
    if record.get("label") is not None and options:
        label = record["label"]
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(options):
            raise EvalDataError(
                f"{at}: 'label' must be an index into the {len(options)} options, got {label!r:.40}"
            )
        key, refs = "label", (options[label],)
    else:
        key = "references" if record.get("references") is not None else fields.tgt
        if record.get(key) is None:
            raise EvalDataError(
                f"{at}: no {fields.tgt!r}, 'references' or 'label' (the reference outputs)"
                + fields_hint(record, fields)
            )
        refs = references(record[key], at, key)
    if options and not set(refs) & set(options):
        raise EvalDataError(f"{at}: no reference ({key!r}) is one of the 'options'")
    return refs


def records_eval_tasks(
    path, records: Iterable[tuple[int | str, str, dict]], max_instances: int, fields: Fields
) -> list[EvalTask]:
    """The evaluation tasks of a file's records, given as (id, "where", {key: value}): the prompt in
    `fields.src`, the references in `references`, else `fields.tgt` (a string or a list), else `label`
    (an index into `options`, the candidates of rank classification). The task is `fields.task`, else
    the record's `task`, else the file's stem; the category its `category`, else "uncategorized". With
    `fields.definition` the prompt is SNI's template of that definition and the record's `src`."""
    path = Path(path)
    task_key = fields.task or "task"
    tasks: dict[str, tuple[str, Optional[str], list]] = {}
    for ident, at, record in records:
        if not isinstance(record.get(fields.src), str):
            raise EvalDataError(
                f"{at}: {fields.src!r} must be a string (the prompt)" + fields_hint(record, fields)
            )
        options = _options(record, at)
        refs = _record_references(record, at, fields, options)
        task = record.get(task_key)
        task = path.stem if task is None and fields.task is None else task
        category = record.get("category")
        category = UNCATEGORIZED if category is None else category
        if not isinstance(task, str) or not task or not isinstance(category, str):
            raise EvalDataError(f"{at}: {task_key!r} and 'category' must be non-empty strings")
        definition = None
        if fields.definition is not None:
            definition = definition_text(record.get(fields.definition))
            if definition is None:
                raise EvalDataError(
                    f"{at}: {fields.definition!r} (data.fields.definition) must be a non-empty string "
                    f"or list of strings"
                )
        category, task_definition, instances = tasks.setdefault(
            task, (category_name(category), definition, [])
        )
        if definition != task_definition:
            raise EvalDataError(
                f"{at}: task {task!r} has another {fields.definition!r} than its first record; a task "
                f"has one definition"
            )
        if not max_instances or len(instances) < max_instances:
            instances.append(EvalInstance(ident, record[fields.src], refs, at, options))
    if not tasks:
        raise EvalDataError(f"{path}: no records")
    return [
        EvalTask(
            name=name, category=category, path=str(path), instances=tuple(instances), definition=definition
        )
        for name, (category, definition, instances) in tasks.items()
    ]
