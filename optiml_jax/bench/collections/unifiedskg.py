"""UnifiedSKG's seq2seq examples: JSON (a list) or JSONL files of `text_in`, `struct_in`, `seq_out`, one
task per file (`spider_train.json` -> spider). The input is the text, then the structured knowledge
(table, schema, dialogue state) after a blank line."""

from __future__ import annotations

from optiml_jax.bench.collections import generic
from optiml_jax.bench.tasks import Example, Task, qualified_name

DEFAULT_COLUMNS = {"input": "text_in", "struct": "struct_in", "output": "seq_out"}


def read(path, columns: dict, known=frozenset()) -> list[Task]:
    columns = {**DEFAULT_COLUMNS, **columns}
    where = "collections.unifiedskg.columns"
    tasks = []
    for local, files in generic.group_by_task(generic.list_files(path), columns, where).items():

        def load(files=files, local=local):
            instances = []
            for i, row in enumerate(generic.load_rows(files, columns, where, local)):
                at = f"{files[0]} ({local} row {i})"
                text = "\n\n".join(str(part) for part in (row["input"], row.get("struct")) if part)
                refs = generic.references(row["output"], at)
                instances.append((Example(input=text, references=refs),))
            return instances

        tasks.append(Task(name=qualified_name("unifiedskg", local), benchmark="unifiedskg", load=load))
    return tasks
