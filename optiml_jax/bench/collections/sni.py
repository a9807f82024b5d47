"""Super-NaturalInstructions task files (`tasks/taskNNN_*.json`). Instances, with every reference output,
are read by the data package's one SNI parser (data/formats/sni.py, as evaluation reads them); what the
bench needs beyond it is read here: the task's `Categories`, `Source` and `Definition` fields."""

from __future__ import annotations

import json
from pathlib import Path

from optiml_jax.bench.tasks import BenchError, Example, Task
from optiml_jax.data.formats import get_format
from optiml_jax.data.formats.sni import read_sni_eval_task
from optiml_jax.data.sources import EvalDataError

HEADER_KEYS = ("Categories", "Source", "Definition")
_INSTANCES_KEY = b'"Instances"'
_HEAD_BYTES = 1 << 16


def _task_header(path: Path) -> dict:
    """The task file's fields before its `Instances` (SNI writes them first): the few KB a header needs,
    not the instances, which the data package's parser reads when the task is loaded. A file the head
    does not parse as such (keys elsewhere, the word in a string) is parsed whole."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(_HEAD_BYTES)
        cut = head.find(_INSTANCES_KEY)
        if cut > 0:
            try:
                data = json.loads(head[:cut].decode("utf-8-sig") + '"Instances": []}')
                if isinstance(data, dict) and all(key in data for key in HEADER_KEYS):
                    return data
            except (ValueError, UnicodeDecodeError):
                pass
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BenchError(f"{path}: not a readable SNI task file ({e})") from None
    if not isinstance(data, dict):
        raise BenchError(f"{path}: an SNI task file holds a JSON object")
    return data


def _field_list(data: dict, key: str, path: Path) -> tuple[str, ...]:
    value = data.get(key) or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BenchError(f"{path}: {key!r} must be a list of strings, got {value!r}")
    return tuple(value)


def _load(path: Path):
    try:
        task = read_sni_eval_task(path, 0)
    except EvalDataError as e:
        raise BenchError(str(e)) from None
    return [(Example(input=inst.input, references=inst.references),) for inst in task.instances]


def read(path, columns: dict, known=frozenset()) -> list[Task]:
    tasks = []
    for file in get_format("sni").files(path):
        data = _task_header(file)
        categories = _field_list(data, "Categories", file)
        definition = data.get("Definition")
        definition = " ".join(definition) if isinstance(definition, list) else definition
        tasks.append(
            Task(
                name=file.stem,
                benchmark="sni",
                load=lambda file=file: _load(file),
                category=categories[0] if categories else None,
                sources=_field_list(data, "Source", file),
                definition=definition if isinstance(definition, str) else None,
            )
        )
    return tasks
