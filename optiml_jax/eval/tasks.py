"""Evaluation data: SNI task files and metaseq `{"src", "tgt"}` JSONL, read with every reference output.

Unlike training (data/), which keeps one output per instance and skips what it cannot use, evaluation
keeps all references of an instance (scores are the best over them) and refuses bad input: a skipped
instance would silently change the score. So a record without references, or of the wrong shape, is
an `EvalDataError` naming its file and key (`task.json#id: 'output' ...`, `file.jsonl:12: ...`).

* SNI: a task file, or a directory of `task*.json` optionally filtered by a split file (e.g. SNI's
  `splits/default/test_tasks.txt`). The first `max_instances` instances of each task, in file order,
  are the official evaluation instances (100 in SNI's protocol). References are kept exactly as the
  task file lists them, as the official scorer does: an instance whose only reference is "" (one in
  task1564) is scored against "" (an empty prediction matches it exactly), with a warning.
* JSONL: one record per line, `src` the ready prompt; the references are a `references` list, or
  `tgt` (a string or a list). The task is the record's `task`, else the file's stem; the category its
  `category`, else "uncategorized". The id of a record is its line number.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

from optiml_jax.data.sources import DataError, detect_format, jsonl_files, read_split_file, sni_files
from optiml_jax.eval.metrics import UNCATEGORIZED, category_name

log = logging.getLogger(__name__)

DEFAULT_MAX_INSTANCES = 100  # SNI's evaluation instances per task
MAX_LABELS = 100  # distinct outputs of a task kept as its label set


class EvalDataError(DataError):
    """Evaluation data that cannot be scored as given; the message names the file and key."""


@dataclasses.dataclass(frozen=True)
class EvalInstance:
    id: str | int  # the SNI instance's own id; the line number in a JSONL file
    input: str  # SNI: the instance's input (prompts.py builds the prompt); JSONL: the whole prompt
    references: tuple[str, ...]
    source: str  # "file#id" or "file:line", for messages
    options: tuple[str, ...] = ()  # answer candidates of a JSONL record: ranked by likelihood (scoring.py)


@dataclasses.dataclass(frozen=True)
class EvalTask:
    name: str
    category: str  # category_name() of the task's first category
    path: str
    instances: tuple[EvalInstance, ...]
    definition: Optional[str] = None  # SNI; None for JSONL, whose inputs are ready prompts
    positive_examples: tuple[tuple[str, str], ...] = ()  # (input, output), in file order
    # SNI: the distinct reference outputs of all the file's instances, in order of first appearance
    # (None when there are more than MAX_LABELS): the candidates of rank classification
    labels: Optional[tuple[str, ...]] = None

    @property
    def is_sni(self) -> bool:
        return self.definition is not None


def load_eval_tasks(
    path: str | Path,
    split_file: Optional[str | Path] = None,
    max_instances: int = DEFAULT_MAX_INSTANCES,
    format: str = "auto",
) -> list[EvalTask]:
    """The tasks at `path` (see the module doc), each with its first `max_instances` instances
    (0 = all). Tasks of the same name (JSONL records naming their task) are merged in file order."""
    if isinstance(max_instances, bool) or not isinstance(max_instances, int) or max_instances < 0:
        raise ValueError(f"max_instances must be an integer >= 0 (0 = all), got {max_instances!r}")
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "sni":
        files = sni_files(path, split_file)
        if split_file is not None:
            missing = sorted(set(read_split_file(split_file)) - {f.stem for f in files})
            if missing:  # e.g. a partial download: the scores are then not comparable with published ones
                log.warning(
                    "%s lists %d task(s) with no file in %s, evaluated without them (first: %s)",
                    split_file,
                    len(missing),
                    path,
                    ", ".join(missing[:3]),
                )
        return [read_sni_task(file, max_instances) for file in files]
    if fmt == "parquet":
        raise EvalDataError(f"{path}: evaluation reads SNI task files or JSONL, not Parquet")
    if fmt != "jsonl":
        raise ValueError(f"format must be auto, sni or jsonl, got {format!r}")
    if split_file is not None:
        raise EvalDataError(f"{split_file}: a split file selects SNI task files; {path} is JSONL")
    tasks: dict[str, EvalTask] = {}
    for file in jsonl_files(path):
        for task in read_jsonl_tasks(file, max_instances):
            if task.name in tasks:
                old = tasks[task.name]
                task = dataclasses.replace(
                    old, instances=(old.instances + task.instances)[: max_instances or None]
                )
            tasks[task.name] = task
    return list(tasks.values())


def _load_json(path: Path):
    try:
        return json.loads(path.read_bytes().decode("utf-8-sig"))
    except OSError as e:
        raise EvalDataError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise EvalDataError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise EvalDataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def _references(value, where: str, key: str) -> tuple[str, ...]:
    refs = [value] if isinstance(value, str) else value
    if not isinstance(refs, list) or not refs:
        raise EvalDataError(
            f"{where}: {key!r} must be a non-empty list of reference strings, got {value!r:.80}"
        )
    bad = [r for r in refs if not isinstance(r, str)]
    if bad:
        raise EvalDataError(f"{where}: {key!r} holds a non-string reference {bad[0]!r:.80}")
    return tuple(refs)


def _definition(data: dict, where: str) -> str:
    value = data.get("Definition")
    parts = [value] if isinstance(value, str) else value
    if (
        not isinstance(parts, list)
        or not all(isinstance(p, str) for p in parts)
        or not "".join(parts).strip()
    ):
        raise EvalDataError(f"{where}#Definition: must be a non-empty string or list of strings")
    return "\n".join(p.strip() for p in parts if p.strip())


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


def read_sni_task(path: str | Path, max_instances: int = DEFAULT_MAX_INSTANCES) -> EvalTask:
    path = Path(path)
    task = _read_sni_task(path, max_instances)
    _warn_empty_references(task.instances)
    return task


def _warn_empty_references(instances) -> None:
    for instance in instances:
        if not any(r.strip() for r in instance.references):
            log.warning(
                "%s: its only reference is empty; scored against it as the official SNI scorer does",
                instance.source,
            )


def _read_sni_task(path: Path, max_instances: int) -> EvalTask:
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("Instances"), list):
        raise EvalDataError(f"{path}#Instances: expected a task object with an 'Instances' list")
    where = str(path)
    instances = []
    for i, inst in enumerate(data["Instances"][: max_instances or None]):
        ident = inst.get("id") if isinstance(inst, dict) else None
        ident = ident if isinstance(ident, str) and ident else f"Instances[{i}]"
        at = f"{where}#{ident}"
        if not isinstance(inst, dict) or not isinstance(inst.get("input"), str):
            raise EvalDataError(f"{at}: 'input' must be a string")
        if "output" not in inst:
            raise EvalDataError(f"{at}: no 'output' (the reference outputs)")
        references = _references(inst["output"], at, "output")
        instances.append(EvalInstance(ident, inst["input"], references, at))
    if not instances:
        raise EvalDataError(f"{path}#Instances: no instances")
    return EvalTask(
        name=path.stem,
        category=_category(data),
        path=where,
        instances=tuple(instances),
        definition=_definition(data, where),
        positive_examples=_positive_examples(data, where),
        labels=_label_set(data["Instances"]),
    )


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


def _options(record: dict, at: str) -> tuple[str, ...]:
    options = record.get("options", [])
    if (
        not isinstance(options, list)
        or not all(isinstance(o, str) and o for o in options)
        or len(set(options)) != len(options)
        or len(options) == 1
    ):
        raise EvalDataError(f"{at}: 'options' must be a list of at least two distinct non-empty strings")
    return tuple(options)


def jsonl_objects(path: str | Path) -> Iterator[tuple[int, str, dict]]:
    """(line number, "file:line", object) of every non-blank line of a JSONL file; EvalDataError names
    the file and line that is not a JSON object."""
    path = Path(path)
    try:
        lines = path.read_bytes().decode("utf-8-sig").splitlines()
    except OSError as e:
        raise EvalDataError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise EvalDataError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        at = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{at}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise EvalDataError(f"{at}: expected a JSON object")
        yield number, at, record


def read_jsonl_tasks(path: str | Path, max_instances: int = DEFAULT_MAX_INSTANCES) -> list[EvalTask]:
    path = Path(path)
    tasks: dict[str, tuple[str, list]] = {}
    for number, at, record in jsonl_objects(path):
        if not isinstance(record.get("src"), str):
            raise EvalDataError(f"{at}: 'src' must be a string (the prompt)")
        options = _options(record, at)
        if "label" in record and options:
            label = record["label"]
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(options):
                raise EvalDataError(
                    f"{at}: 'label' must be an index into the {len(options)} options, got {label!r:.40}"
                )
            key, references = "label", (options[label],)
        else:
            key = "references" if "references" in record else "tgt"
            if key not in record:
                raise EvalDataError(f"{at}: no 'tgt', 'references' or 'label' (the reference outputs)")
            references = _references(record[key], at, key)
        if options and not set(references) & set(options):
            raise EvalDataError(f"{at}: no reference ({key!r}) is one of the 'options'")
        task = record.get("task", path.stem)
        category = record.get("category", UNCATEGORIZED)
        if not isinstance(task, str) or not task or not isinstance(category, str):
            raise EvalDataError(f"{at}: 'task' and 'category' must be non-empty strings")
        category, instances = tasks.setdefault(task, (category_name(category), []))
        if not max_instances or len(instances) < max_instances:
            instances.append(EvalInstance(number, record["src"], references, at, options))
    if not tasks:
        raise EvalDataError(f"{path}: no records")
    return [
        EvalTask(name=name, category=category, path=str(path), instances=tuple(instances))
        for name, (category, instances) in tasks.items()
    ]


def _record_id(source: str) -> int | str:
    """A training example's id from its source: a JSONL line number ("file:12"), or "row N" (Parquet)."""
    tail = source.rsplit(":", 1)[1]
    return int(tail) if tail.isdigit() else tail


def holdout_eval_tasks(
    held_out: Mapping[str, Sequence], max_instances: int = DEFAULT_MAX_INSTANCES
) -> list[EvalTask]:
    """Evaluation tasks of the instances a fine-tuning run holds out (data.eval_holdout): `held_out` is
    the eval loader's task name -> examples. SNI examples get every reference of their instance from
    the task file (training kept one); a JSONL example's reference is its `tgt`."""
    tasks = []
    for name, examples in held_out.items():
        examples = list(examples)[: max_instances or None]
        if not examples:
            continue
        path = examples[0].source.rsplit(":", 1)[0]
        if getattr(
            examples[0], "in_task_file", False
        ):  # SNI: the instances, by id, of the task file they came from
            path = examples[0].source.rsplit("#", 1)[0]
            full = _read_sni_task(Path(path), max_instances=0)
            by_id = {instance.id: instance for instance in full.instances}
            instances = tuple(by_id[e.source.rsplit("#", 1)[1]] for e in examples)
            _warn_empty_references(instances)
            tasks.append(dataclasses.replace(full, name=name, instances=instances))
        elif hasattr(
            examples[0], "definition"
        ):  # JSONL/Parquet rows with a definition (data.fields.definition)
            instances = tuple(
                EvalInstance(_record_id(e.source), e.input, (e.tgt,), e.source) for e in examples
            )
            tasks.append(
                EvalTask(
                    name=name,
                    category=UNCATEGORIZED,
                    path=path,
                    instances=instances,
                    definition=examples[0].definition,
                )
            )
        else:
            instances = tuple(EvalInstance(_record_id(e.source), e.src, (e.tgt,), e.source) for e in examples)
            tasks.append(EvalTask(name=name, category=UNCATEGORIZED, path=path, instances=instances))
    if not tasks:
        raise EvalDataError("the held-out instances (data.eval_holdout) are empty")
    return tasks
