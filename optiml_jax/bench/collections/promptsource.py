"""P3 / PromptSource dumps: one subset per (dataset, template), a directory (or file) named
`{dataset}_{template}` of Parquet/JSONL rows `inputs_pretokenized`, `targets_pretokenized`; the
rank-classification subsets add `answer_choices` and `is_correct` (one row per choice: the correct one is
kept, the choices become the options). A subset belongs to the longest registry task whose name it starts
with (`promptsource_super_glue_copa` takes `super_glue_copa_best_option`, template `best_option`); one
no task claims is a task of its own. Row k of every subset of a task is the same instance, so instance k
has one prompt per template, and the build draws one of them (spec §5)."""

from __future__ import annotations

from pathlib import Path

from optiml_jax.bench.collections import generic
from optiml_jax.bench.tasks import BenchError, Example, Task, qualified_name
from optiml_jax.data.formats.jsonl import jsonl_objects
from optiml_jax.data.formats.parquet import open_parquet

DEFAULT_COLUMNS = {"input": "inputs_pretokenized", "output": "targets_pretokenized"}
PREFIX = "promptsource_"


def _subsets(path: Path) -> dict[str, list[Path]]:
    if not path.is_dir():
        raise BenchError(f"{path}: a P3 dump is a directory of subsets (one per dataset and template)")
    subsets: dict[str, list[Path]] = {}
    for child in sorted(path.iterdir()):
        if child.is_dir():
            subsets[child.name] = generic.list_files(child)
        elif child.suffix in generic.ROW_SUFFIXES:
            subsets.setdefault(generic.task_stem(child), []).append(child)
    if not subsets:
        raise BenchError(f"{path}: holds no P3 subsets (directories or .parquet/.jsonl files)")
    return subsets


def _owner(subset: str, locals_: list[str]) -> tuple[str, str]:
    """(local task, template) of a subset."""
    for local in locals_:  # longest first
        if subset == local:
            return local, ""
        if subset.startswith(local + "_"):
            return local, subset[len(local) + 1 :]
    return subset, ""


def _subset_examples(files: list[Path], columns: dict, template: str) -> list[Example]:
    where = "collections.promptsource.columns"
    examples = []
    for file in files:
        extra = {}
        for key, column in (("options", "answer_choices"), ("correct", "is_correct")):
            if _has_column(file, column):
                extra[key] = column
        for i, row in enumerate(generic.read_rows(file, {**columns, **extra}, where)):
            if "correct" in row and not row["correct"]:
                continue
            at = f"{file} (row {i})"
            refs = generic.references(row["output"], at)
            options = tuple(row.get("options") or ())
            examples.append(Example(input=row["input"], references=refs, options=options, template=template))
    return examples


def _has_column(file: Path, column: str) -> bool:
    if file.suffix == ".parquet":
        return column in open_parquet(file).schema_arrow.names
    first = next(iter(jsonl_objects(file)), None) if file.suffix == ".jsonl" else None
    return first is not None and column in first[2]


def read(path, columns: dict, known=frozenset()) -> list[Task]:
    columns = {**DEFAULT_COLUMNS, **columns}
    locals_ = sorted((n[len(PREFIX) :] for n in known if n.startswith(PREFIX)), key=len, reverse=True)
    by_task: dict[str, list[tuple[str, list[Path]]]] = {}
    for subset, files in _subsets(Path(path)).items():
        local, template = _owner(subset, locals_)
        by_task.setdefault(local, []).append((template or subset, files))

    def load(subsets):
        per_template = [_subset_examples(files, columns, template) for template, files in subsets]
        count = max(map(len, per_template), default=0)
        return [tuple(examples[k] for examples in per_template if k < len(examples)) for k in range(count)]

    return [
        Task(name=qualified_name("promptsource", local), benchmark="promptsource", load=lambda s=s: load(s))
        for local, s in sorted(by_task.items())
    ]
