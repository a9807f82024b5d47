"""Readers: Super-NaturalInstructions task files and metaseq `src`/`tgt` JSONL, as `Example`s.

Bad data never crashes deep inside training. Every record that cannot be used is either skipped and
counted in a `SkipStats` (reason -> count; the first few per file are logged with `file:line`, then a
per-file summary), or, with `on_error="raise"`, raises a `DataError` that names `file:line` (JSONL) or
`file#instance_id` (SNI). The reader does the checking so that templates, tokenizer and packer can
assume clean strings.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

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
    source: str  # "file:line" (JSONL) or "file#instance_id" (SNI), for error messages


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

    @property
    def src(self) -> str:
        return templates.format_sni(self.definition, self.input, self.output, exemplars=self.exemplars,
                                    seed=self.seed, task=self.task, index=self.index)[0]

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

    def __init__(self, on_error: str = "skip"):
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
        self.on_error = on_error
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
        if self._per_file[file] <= MAX_LOGGED_PER_FILE:
            logger.warning("skipping record %s", message)

    def end_file(self, file: str) -> None:
        """Logs the per-file summary once a file is read (only when something was skipped)."""
        n = self._per_file.get(file, 0)
        if n:
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
        return "non_string_field", f"{key!r} is {type(value).__name__}, expected string"
    if _bad_unicode(value):
        return "invalid_unicode", f"{key!r} holds a lone surrogate"
    return None


# ---------------------------------------------------------------------------------------- JSONL
def read_jsonl(path: str | os.PathLike, stats: SkipStats, task: Optional[str] = None) -> Iterator[Example]:
    """Yields the usable `{"src", "tgt"}` records of one metaseq JSONL file; task defaults to its stem.

    Empty `src` is allowed (plain language-model text has only a target); an empty or all-whitespace
    `tgt` is skipped because the example would train only on `</s>`.
    """
    path = Path(path)
    name = str(path)
    task = task or path.stem
    try:
        handle = open(path, "rb")
    except OSError as e:
        raise DataError(f"{name}: cannot open ({e.strerror})") from None
    with handle:
        for lineno, raw in enumerate(handle, start=1):
            where = f"{name}:{lineno}"
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # UTF-8 byte-order mark written by some editors
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                stats.skip("invalid_utf8", name, where, f"byte {e.start}: {e.reason}")
                continue
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) are not records
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                stats.skip("malformed_json", name, where, e.msg + f" at column {e.colno}")
                continue
            except RecursionError:
                stats.skip("malformed_json", name, where, "nested too deeply")
                continue
            if not isinstance(record, dict):
                stats.skip("not_an_object", name, where, f"got JSON {type(record).__name__}")
                continue
            problem = _check_string_field(record, "src") or _check_string_field(record, "tgt")
            if problem:
                stats.skip(problem[0], name, where, problem[1])
                continue
            if not record["tgt"].strip():
                stats.skip("empty_target", name, where)
                continue
            yield Example(task=task, src=record["src"], tgt=record["tgt"], source=where)
    stats.end_file(name)


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


def read_jsonl_tasks(path: str | os.PathLike, stats: SkipStats) -> dict[str, list[Example]]:
    """Examples grouped by task. Each `.jsonl` file is one corpus (task), named by its file stem; files
    with the same stem in different subdirectories (metaseq's shards `00/`, `01/`, ...) are the same
    corpus and are concatenated in path order. We mix all shards at once instead of metaseq's one shard
    per epoch: the mixer already cycles and reshuffles every task per epoch."""
    tasks: dict[str, list[Example]] = {}
    for file in jsonl_files(path):
        tasks.setdefault(file.stem, []).extend(read_jsonl(file, stats, task=file.stem))
    return tasks


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


def read_sni_task(path: str | os.PathLike, stats: SkipStats) -> Optional[SNITask]:
    """One SNI task file; None (counted) if the file as a whole is unusable."""
    path = Path(path)
    name = str(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{name}: cannot open ({e.strerror})") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        stats.skip("invalid_utf8", name, f"{name}:{line}", f"whole task file skipped: {e.reason}")
        stats.end_file(name)
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        stats.skip("malformed_json", name, f"{name}:{e.lineno}", f"whole task file skipped: {e.msg}")
        stats.end_file(name)
        return None
    except RecursionError:
        stats.skip("malformed_json", name, f"{name}:1", "whole task file skipped: nested too deeply")
        stats.end_file(name)
        return None
    if not isinstance(data, dict) or not isinstance(data.get("Instances"), list):
        stats.skip("bad_task_file", name, f"{name}#Instances",
                   "whole task file skipped: expected an object with an 'Instances' list")
        stats.end_file(name)
        return None
    definition = _definition_text(data.get("Definition"))
    if definition is None:
        stats.skip("bad_task_file", name, f"{name}#Definition",
                   "whole task file skipped: 'Definition' missing or not (a list of) non-empty strings")
        stats.end_file(name)
        return None

    positives = []
    raw_positives = data.get("Positive Examples", [])
    if not isinstance(raw_positives, list):
        raw_positives = []
    for i, ex in enumerate(raw_positives):
        ok = (isinstance(ex, dict) and isinstance(ex.get("input"), str) and isinstance(ex.get("output"), str)
              and ex["output"].strip() and not _bad_unicode(ex["input"]) and not _bad_unicode(ex["output"]))
        if ok:
            positives.append((ex["input"], ex["output"]))
        else:
            stats.skip("bad_exemplar", name, f"{name}#Positive Examples[{i}]", "needs string input and output")

    instances = []
    for i, inst in enumerate(data["Instances"]):
        ident = inst.get("id") if isinstance(inst, dict) else None
        ident = ident if isinstance(ident, str) and ident else f"Instances[{i}]"
        where = f"{name}#{ident}"
        if not isinstance(inst, dict):
            stats.skip("not_an_object", name, where, f"instance is {type(inst).__name__}")
            continue
        problem = _check_string_field(inst, "input")
        if problem:
            stats.skip(problem[0], name, where, problem[1])
            continue
        if "output" not in inst:
            stats.skip("missing_field", name, where, "no 'output' field")
            continue
        output, why = _choose_output(inst["output"])
        if output is None:
            reason = "empty_target" if why.startswith("no non-empty") else "non_string_field"
            stats.skip(reason, name, where, why)
            continue
        instances.append((ident, inst["input"], output))
    stats.end_file(name)
    return SNITask(name=path.stem, path=name, definition=definition,
                   positive_examples=tuple(positives), instances=tuple(instances))


def sni_examples(task: SNITask, template: str = "zero_shot", num_shots: int = 0,
                 seed: int = 0) -> list[SNIExample]:
    """Every instance of `task`, to be formatted with `templates.format_sni` (see there for the layout)."""
    exemplars = task.positive_examples[:num_shots] if template == "few_shot" else ()
    return [SNIExample(task=task.name, source=f"{task.path}#{ident}", definition=task.definition, input=text,
                       output=output, exemplars=exemplars, seed=seed, index=index)
            for index, (ident, text, output) in enumerate(task.instances)]


def read_sni_tasks(path: str | os.PathLike, stats: SkipStats, *, split_file=None, template: str = "zero_shot",
                   num_shots: int = 0, seed: int = 0) -> dict[str, list[SNIExample]]:
    """The examples (formatted on demand, see SNIExample) of every usable SNI task file under `path`, by task."""
    tasks: dict[str, list[Example]] = {}
    for file in sni_files(path, split_file):
        task = read_sni_task(file, stats)
        if task is not None:
            tasks.setdefault(task.name, []).extend(sni_examples(task, template, num_shots, seed))
    return tasks


# ---------------------------------------------------------------------------------------- dispatch
FORMATS = ("auto", "sni", "jsonl")


def detect_format(path: str | os.PathLike) -> str:
    """"sni" for `.json` files / directories of `task*.json`, "jsonl" for `.jsonl` files / trees."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".json":
            return "sni"
        if path.suffix == ".jsonl":
            return "jsonl"
        raise DataError(f"{path}: cannot tell the data format from the suffix {path.suffix!r}; "
                        f"use .json (SNI task) or .jsonl (src/tgt lines), or set data.format")
    if not path.is_dir():
        raise DataError(f"{path}: no such file or directory")
    has_sni = any(p.is_file() for p in path.glob("task*.json"))
    has_jsonl = any(p.is_file() for p in path.rglob("*.jsonl"))
    if has_sni and has_jsonl:
        raise DataError(f"{path}: holds both SNI task*.json and .jsonl files; set data.format to 'sni' or 'jsonl'")
    if has_sni:
        return "sni"
    if has_jsonl:
        return "jsonl"
    raise DataError(f"{path}: holds neither SNI task*.json files nor .jsonl files")


def read_tasks(paths: str | os.PathLike | Sequence[str | os.PathLike], stats: SkipStats, *,
               format: str = "auto", split_file=None, template: str = "zero_shot", num_shots: int = 0,
               seed: int = 0) -> dict[str, list[Example]]:
    """All examples under `paths` (one path or several), grouped by task, in a deterministic order.

    Task name collisions between paths merge into one task (same name = same corpus).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    tasks: dict[str, list[Example]] = {}
    for path in paths:
        fmt = detect_format(path) if format == "auto" else format
        if fmt == "sni":
            found = read_sni_tasks(path, stats, split_file=split_file, template=template,
                                   num_shots=num_shots, seed=seed)
        else:
            if template != "zero_shot":
                raise DataError(f"{path}: template {template!r} applies to SNI task files only; "
                                f"JSONL records already hold the final src/tgt")
            found = read_jsonl_tasks(path, stats)
        for name, examples in found.items():
            tasks.setdefault(name, []).extend(examples)
    empty = [name for name, examples in tasks.items() if not examples]
    for name in empty:
        logger.warning("task %s has no usable examples; it is left out", name)
        del tasks[name]
    return tasks


def iter_examples(tasks: dict[str, list[Example]]) -> Iterable[Example]:
    for examples in tasks.values():
        yield from examples
