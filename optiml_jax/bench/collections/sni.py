"""Super-NaturalInstructions task files (`tasks/taskNNN_*.json`). Definitions and instances are read by
the data package's SNI reader (sources.read_sni_task: validated, bad instances skipped); what the bench
needs beyond it is read here: the task's `Categories` and `Source` fields and every reference output of
an instance (the reader keeps one)."""

from __future__ import annotations

import json
from pathlib import Path

from optiml_jax.bench.tasks import BenchError, Example, Task
from optiml_jax.data import sources


def _task_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
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
    task = sources.read_sni_task(path, sources.SkipStats(log=False))
    if task is None:
        return []
    outputs = {
        inst.get("id"): inst.get("output")
        for inst in _task_file(path).get("Instances", [])
        if isinstance(inst, dict)
    }
    instances = []
    for ident, text, output in task.instances:
        every = outputs.get(ident)
        refs = tuple(o for o in every if isinstance(o, str)) if isinstance(every, list) else ()
        instances.append((Example(input=text, references=refs or (output,)),))
    return instances


def read(path, columns: dict, known=frozenset()) -> list[Task]:
    tasks = []
    for file in sources.sni_files(path):
        data = _task_file(file)
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
