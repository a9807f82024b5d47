"""Super-NaturalInstructions task files: one JSON document a task (`task*.json`), its definition,
exemplars ("Positive Examples") and instances, each with its reference outputs.

A task file cannot be parsed from the middle, so files are dealt out whole, largest first to the least
loaded process; the owner parses its files and notes the byte span of every usable instance and of the
Instances array. Every process then reads only the rest of each file (its definition and exemplars: a few
KB of a file that is mostly instances). Training takes one reference per instance (_choose_output);
evaluation keeps every reference, exactly as the file lists them. Both read the file with one parser
(parse_task_file). A file that cannot be used at all (truncated, not JSON, no definition) is a skip
named by its file with the number of instances it held, or with data.on_error=raise an error; in
evaluation it is always an error.
"""

from __future__ import annotations

import array
import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Optional

from optiml_jax.data.formats.base import (
    UNCATEGORIZED,
    EvalDataError,
    EvalInstance,
    EvalTask,
    Fields,
    Format,
    category_name,
    find_files,
    references,
    register,
)
from optiml_jax.data.sources import (
    DataError,
    SkipStats,
    SNIExample,
    bad_unicode,
    check_string_field,
    definition_text,
    open_data_file,
    read_span,
)

logger = logging.getLogger(__name__)

MAX_LABELS = 100  # distinct outputs of a task kept as its label set
# What evaluation's error says of a task file parse_task_file finds unusable, by reason.
UNUSABLE_FILE = {
    "invalid_utf8": "not UTF-8",
    "malformed_json": "not valid JSON",
    "bad_task_file": "not an SNI task file",
}


@dataclasses.dataclass(frozen=True)
class SNITask:
    """One SNI task file, validated. `instances` are (id, input, output) with one chosen output."""

    name: str
    path: str
    definition: str
    positive_examples: tuple[tuple[str, str], ...]
    instances: tuple[tuple[str, str, str], ...]


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
        if isinstance(candidate, str) and candidate.strip() and not bad_unicode(candidate):
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
            and not bad_unicode(ex["input"])
            and not bad_unicode(ex["output"])
        )
        if ok:
            positives.append((ex["input"], ex["output"]))
        else:
            skips.append(("bad_exemplar", f"{name}#Positive Examples[{i}]", "needs string input and output"))
    return definition_text(data.get("Definition")), tuple(positives)


def _check_instance(inst, i: int, name: str) -> tuple[str, Optional[str], Optional[tuple[str, str, str]]]:
    """(id, chosen output, None) for a usable instance, else (id, None, (reason, where, detail))."""
    ident = inst.get("id") if isinstance(inst, dict) else None
    ident = ident if isinstance(ident, str) and ident else f"Instances[{i}]"
    where = f"{name}#{ident}"
    if not isinstance(inst, dict):
        return ident, None, ("not_an_object", where, f"instance is {type(inst).__name__}")
    problem = check_string_field(inst, "input")
    if problem:
        return ident, None, (problem[0], where, problem[1])
    if "output" not in inst:
        return ident, None, ("missing_field", where, "no 'output' field")
    output, why = _choose_output(inst["output"])
    if output is None:
        reason = "empty_target" if why.startswith("no non-empty") else "non_string_field"
        return ident, None, (reason, where, why)
    return ident, output, None


@dataclasses.dataclass
class ParsedTask:
    """A task file parsed once (parse_task_file): the top-level object, or the problem that makes the
    whole file unusable, with what training indexes (character spans, turned into byte offsets)."""

    data: Optional[dict] = None
    problem: Optional[tuple[str, str, str]] = None  # (reason, where, why)
    lost: int = 0  # instances of an unusable file
    text: str = ""
    base: int = 0  # bytes before `text` (a UTF-8 byte-order mark)
    array_span: tuple[int, int] = (0, 0)
    spans: list = dataclasses.field(default_factory=list)


def _instances_lost(raw: bytes) -> int:
    """How many instances an unusable task file holds, counted by their "input" keys after "Instances"
    (a truncated or damaged file cannot be parsed to count them)."""
    start = raw.find(b'"Instances"')
    return raw.count(b'"input"', start) if start >= 0 else 0


def parse_task_file(path: str | os.PathLike) -> ParsedTask:
    """Reads and parses one SNI task file: the one parser of training's scan and evaluation."""
    name = str(path)
    with open_data_file(path) as handle:
        raw = handle.read()
    base = 3 if raw.startswith(b"\xef\xbb\xbf") else 0

    def unusable(reason: str, where: str, why: str) -> ParsedTask:
        return ParsedTask(problem=(reason, where, why), lost=_instances_lost(raw))

    try:
        text = raw[base:].decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, base + e.start) + 1
        return unusable("invalid_utf8", f"{name}:{line}", e.reason)
    array_span, spans = (0, 0), []
    try:
        data, array_span, spans = _parse_task(text)
    except (ValueError, RecursionError):
        try:
            data = json.loads(text)  # for its message; or valid JSON that is not an object
        except json.JSONDecodeError as e:
            return unusable("malformed_json", f"{name}:{e.lineno}", e.msg)
        except RecursionError:
            return unusable("malformed_json", f"{name}:1", "nested too deeply")
        if isinstance(data, dict):  # _parse_task reads every JSON object json.loads reads
            raise AssertionError(f"{name}: parsed by json.loads but not by _parse_task") from None
    if not isinstance(data, dict) or not isinstance(data.get("Instances"), list):
        return unusable("bad_task_file", f"{name}#Instances", "expected an object with an 'Instances' list")
    return ParsedTask(data=data, text=text, base=base, array_span=array_span, spans=spans)


def _whole_file_skipped(lost: int, why: str) -> str:
    return f"whole task file skipped, its task loses {lost} instance(s): {why}"


def scan_sni_file(path: str | os.PathLike, keep_parsed: bool = False) -> SNIScan:
    """Parses and checks one SNI task file, recording the byte span of every usable instance (and, with
    `keep_parsed`, the instances themselves)."""
    name = str(path)
    scan = SNIScan()
    parsed = parse_task_file(path)
    if parsed.problem:
        reason, where, why = parsed.problem
        scan.problem = (reason, where, _whole_file_skipped(parsed.lost, why))
        return scan
    data = parsed.data
    definition, scan.positive_examples = _sni_header(data, name, scan.skips)
    if definition is None:
        scan.problem = (
            "bad_task_file",
            f"{name}#Definition",
            _whole_file_skipped(
                len(data["Instances"]), "'Definition' missing or not (a list of) non-empty strings"
            ),
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
    positions = [p for span in [parsed.array_span, *(parsed.spans[i] for i in usable)] for p in span]
    offsets = _byte_offsets(parsed.text, positions, parsed.base)
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


@dataclasses.dataclass(frozen=True)
class SNISource:
    """A task file's instances, prompted with its `header`: (definition, the exemplars few-shot uses)."""

    path: str
    task: str
    header: tuple[str, tuple[tuple[str, str], ...]]
    seed: int

    def example(self, start: int, end: int, position: int, index: int) -> SNIExample:
        ident, text, output = read_sni_instance(self.path, start, end, position)
        return SNIExample(
            task=self.task,
            source=f"{self.path}#{ident}",
            definition=self.header[0],
            input=text,
            output=output,
            exemplars=self.header[1],
            seed=self.seed,
            index=index,
        )


# ---------------------------------------------------------------------------------------- evaluation
def warn_empty_references(instances) -> None:
    for instance in instances:
        if not any(r.strip() for r in instance.references):
            logger.warning(
                "%s: its only reference is empty; scored against it as the official SNI scorer does",
                instance.source,
            )


def _category(data: dict) -> str:
    categories = data.get("Categories")
    if isinstance(categories, list) and categories and isinstance(categories[0], str):
        return category_name(categories[0])
    return UNCATEGORIZED


def _positive_examples(data: dict, where: str) -> tuple[tuple[str, str], ...]:
    examples = data.get("Positive Examples", [])
    if not isinstance(examples, list):
        raise EvalDataError(f"{where}#Positive Examples: must be a list")
    out = []
    for i, example in enumerate(examples):
        if not (
            isinstance(example, dict)
            and isinstance(example.get("input"), str)
            and isinstance(example.get("output"), str)
        ):
            raise EvalDataError(f"{where}#Positive Examples[{i}]: needs string 'input' and 'output'")
        out.append((example["input"], example["output"]))
    return tuple(out)


def _label_set(instances: list) -> Optional[tuple[str, ...]]:
    labels: dict[str, None] = {}
    for inst in instances:
        outputs = inst.get("output") if isinstance(inst, dict) else None
        for output in [outputs] if isinstance(outputs, str) else outputs if isinstance(outputs, list) else ():
            if isinstance(output, str) and output.strip():
                labels[output] = None
                if len(labels) > MAX_LABELS:
                    return None
    return tuple(labels)


def read_sni_eval_task(path: str | os.PathLike, max_instances: int) -> EvalTask:
    """One task file's first `max_instances` instances (0 = all), every reference kept; EvalDataError
    naming the file and key of anything that cannot be scored."""
    path = Path(path)
    where = str(path)
    parsed = parse_task_file(path)
    if parsed.problem:
        reason, at, why = parsed.problem
        raise EvalDataError(f"{at}: {UNUSABLE_FILE[reason]} ({why})")
    data = parsed.data
    instances = []
    for i, inst in enumerate(data["Instances"][: max_instances or None]):
        ident = inst.get("id") if isinstance(inst, dict) else None
        ident = ident if isinstance(ident, str) and ident else f"Instances[{i}]"
        at = f"{where}#{ident}"
        if not isinstance(inst, dict) or not isinstance(inst.get("input"), str):
            raise EvalDataError(f"{at}: 'input' must be a string")
        if "output" not in inst:
            raise EvalDataError(f"{at}: no 'output' (the reference outputs)")
        instances.append(EvalInstance(ident, inst["input"], references(inst["output"], at, "output"), at))
    if not instances:
        raise EvalDataError(f"{path}#Instances: no instances")
    definition = definition_text(data.get("Definition"))
    if definition is None:
        raise EvalDataError(f"{where}#Definition: must be a non-empty string or list of strings")
    return EvalTask(
        name=path.stem,
        category=_category(data),
        path=where,
        instances=tuple(instances),
        definition=definition,
        positive_examples=_positive_examples(data, where),
        labels=_label_set(data["Instances"]),
    )


@register
class SNIFormat(Format):
    name = "sni"
    suffixes = (".json",)
    pattern = "task*.json"
    recursive = False
    described = "SNI task*.json"
    whole_files = True
    has_exemplars = True
    takes_split_file = True

    def files(self, path, split_file=None) -> list[Path]:
        """A task `.json` file, or the `task*.json` files of a directory, optionally only those listed in
        `split_file`. Split entries without a file here are fine (a sample holds a subset of the split)."""
        files = find_files(path, self.pattern, self.recursive, self.described)
        if split_file is not None:
            wanted = set(read_split_file(split_file))
            kept = [f for f in files if f.stem in wanted]
            logger.info("%s: split %s keeps %d of %d task files", path, split_file, len(kept), len(files))
            if not kept:
                raise DataError(f"{split_file}: none of the {len(files)} task files in {path} is listed")
            files = kept
        return files

    def scan(self, path: Path, fields: Fields, me: int, count: int):
        scan = scan_sni_file(path)
        entry = {
            "problem": scan.problem,
            "skips": scan.skips,
            "span": scan.instances_span,
            "header": [scan.definition, scan.positive_examples],
        }
        flat = array.array(
            "q", [v for start, end, position in scan.instances for v in (start, end, position, 0)]
        )
        return entry, flat

    def read_header(self, path: Path, entry: dict) -> tuple[str, tuple]:
        """(definition, exemplars) of a file another process scanned."""
        return read_sni_header(path, tuple(entry["span"]))

    def source(self, path: str, task: str, header: tuple, exemplars: int, seed: int) -> SNISource:
        definition, positives = header
        return SNISource(path, task, (definition, tuple(positives[:exemplars])), seed)

    def eval_tasks(self, path, split_file, max_instances: int, fields: Fields) -> list[EvalTask]:
        files = self.files(path, split_file)
        if split_file is not None:
            missing = sorted(set(read_split_file(split_file)) - {f.stem for f in files})
            if missing:  # e.g. a partial download: the scores are then not comparable with published ones
                logger.warning(
                    "%s lists %d task(s) with no file in %s, evaluated without them (first: %s)",
                    split_file,
                    len(missing),
                    path,
                    ", ".join(missing[:3]),
                )
        tasks = [read_sni_eval_task(file, max_instances) for file in files]
        for task in tasks:
            warn_empty_references(task.instances)
        return tasks
