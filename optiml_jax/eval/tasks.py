"""Evaluation data, read with every reference output through the data-format registry
(data/formats/): SNI task files, JSONL, Parquet and hub datasets, the same formats training reads.

Unlike training (data/), which keeps one output per instance and skips what it cannot use, evaluation
keeps all references of an instance (scores are the best over them) and refuses bad input: a skipped
instance would silently change the score. So a record without references, or of the wrong shape, is
an `EvalDataError` naming its file and key (`task.json#id: 'output' ...`, `file.jsonl:12: ...`).

* SNI: a task file, or a directory of `task*.json` optionally filtered by a split file (e.g. SNI's
  `splits/default/test_tasks.txt`). The first `max_instances` instances of each task, in file order,
  are the official evaluation instances (100 in SNI's protocol). References are kept exactly as the
  task file lists them, as the official scorer does: an instance whose only reference is "" (one in
  task1564) is scored against "" (an empty prediction matches it exactly), with a warning.
* JSONL and Parquet: one record per line / row, its prompt under `src` (or the key `fields` maps it
  to, as data.fields does for training); the references are a `references` list, or `tgt` (a string
  or a list), or `label` into `options`. The task is the record's `task` (or fields.task), else the
  file's stem; the category its `category`, else "uncategorized". The id of a record is its line
  number (JSONL) or "row N" (Parquet).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping, Optional, Sequence

from optiml_jax.data.formats import AUTO, EvalInstance, EvalTask, resolve_format
from optiml_jax.data.formats.base import UNCATEGORIZED, check_max_instances
from optiml_jax.data.formats.jsonl import jsonl_objects
from optiml_jax.data.formats.sni import MAX_LABELS, read_sni_eval_task, warn_empty_references
from optiml_jax.data.sources import EvalDataError, Fields

DEFAULT_MAX_INSTANCES = 100  # SNI's evaluation instances per task

__all__ = [
    "DEFAULT_MAX_INSTANCES",
    "MAX_LABELS",
    "EvalDataError",
    "EvalInstance",
    "EvalTask",
    "holdout_eval_tasks",
    "jsonl_objects",
    "load_eval_tasks",
    "read_sni_task",
]


def read_sni_task(path: str | Path, max_instances: int = DEFAULT_MAX_INSTANCES) -> EvalTask:
    """One SNI task file for evaluation (its first `max_instances` instances, 0 = all; every reference),
    as the notebooks and user code read it: the format registry's one SNI parser."""
    task = read_sni_eval_task(Path(path), max_instances)
    warn_empty_references(task.instances)
    return task


def load_eval_tasks(
    path: str | Path,
    split_file: Optional[str | Path] = None,
    max_instances: int = DEFAULT_MAX_INSTANCES,
    format: str = AUTO,
    fields: Optional[Fields] = None,
) -> list[EvalTask]:
    """The tasks at `path` (see the module doc), each with its first `max_instances` instances
    (0 = all). Tasks of the same name (records naming their task) are merged in file order. `fields`
    maps our names to the keys / columns of JSONL and Parquet records (data.fields)."""
    check_max_instances(max_instances)
    fmt = resolve_format(path, format)
    return fmt.eval_tasks(path, split_file, max_instances, fields or Fields())


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
            full = read_sni_eval_task(Path(path), max_instances=0)
            by_id = {instance.id: instance for instance in full.instances}
            instances = tuple(by_id[e.source.rsplit("#", 1)[1]] for e in examples)
            warn_empty_references(instances)
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
