"""The FLAN collection's dumps (Parquet/JSONL): `inputs`, `targets`, the task in `task` or
`_task_name`, `_template_type` (zs_opt, zs_noopt, fs_opt, fs_noopt) and `_template_idx`. Every row is one
instance already prompted with one of its task's templates, so the templates are kept as they are
(`template` = `zs_opt:3`); only the zero-shot rows are read (the paper trains without demonstrations,
spec §5: few-shot prompts are built at evaluation). The options a zs_opt prompt lists as `- option`
lines (FLAN's `OPTIONS:` block) become the row's options when the target is one of them, so the
evaluation suites can rank them. A task is named by its dump name without the version,
"/" and ":" written "_" (`super_glue/rte:1.0.2` -> `flan_super_glue_rte`, `huggingface:xsum` ->
`flan_huggingface_xsum`)."""

from __future__ import annotations

import re

from optiml_jax.bench.collections import generic
from optiml_jax.bench.tasks import Example, Task, qualified_name
from optiml_jax.data.formats.jsonl import jsonl_objects
from optiml_jax.data.formats.parquet import open_parquet

DEFAULT_COLUMNS = {"input": "inputs", "output": "targets", "type": "_template_type", "idx": "_template_idx"}
ZERO_SHOT = ("zs_opt", "zs_noopt")
_VERSION = re.compile(r":\d+(\.\d+)*$")


def listed_options(prompt: str, target: str) -> tuple[str, ...]:
    """The last block of two or more `- option` lines in the prompt, if the target is one of them."""
    blocks, block = [], []
    for line in prompt.splitlines() + [""]:
        if line.startswith("- "):
            block.append(line[2:].strip())
        else:
            if len(block) >= 2:
                blocks.append(block)
            block = []
    options = tuple(blocks[-1]) if blocks else ()
    return options if target.strip() in options else ()


def local_name(dump_name: str) -> str:
    """The task's name in the registry (without `flan_`) for its name in the dump."""
    return re.sub(r"[/:]", "_", _VERSION.sub("", dump_name))


def _task_column(files) -> str:
    """FLAN dumps name the task `task` (the hub's flan collections) or `_task_name` (the generation code)."""
    first = files[0]
    if first.suffix == ".parquet":
        names = open_parquet(first).schema_arrow.names
    else:
        names = list(next(iter(jsonl_objects(first)), (0, "", {}))[2])
    return "_task_name" if "_task_name" in names and "task" not in names else "task"


def read(path, columns: dict, known=frozenset()) -> list[Task]:
    files = generic.list_files(path)
    columns = {**DEFAULT_COLUMNS, "task": _task_column(files), **columns}
    where = "collections.flan.columns"
    tasks = []
    for local, task_files in generic.group_by_task(files, columns, where).items():

        def load(task_files=task_files, local=local):
            instances = []
            for i, row in enumerate(generic.load_rows(task_files, columns, where, local)):
                if row["type"] not in ZERO_SHOT:
                    continue
                refs = generic.references(row["output"], f"{task_files[0]} ({local} row {i})")
                template = f"{row['type']}:{row['idx']}"
                options = listed_options(row["input"], refs[0])
                example = Example(input=row["input"], references=refs, options=options, template=template)
                instances.append((example,))
            return instances

        tasks.append(Task(name=qualified_name("flan", local_name(local)), benchmark="flan", load=load))
    return tasks
