"""CrossFit: one TSV per task and split (`{task}/{task}_{train,dev,test}.tsv`), `input<TAB>output`,
several answers joined by ` [SEP] `. A task's instances are its splits' lines in the order train, dev,
test (so the fully supervised instances, the last ones, come from its test split)."""

from __future__ import annotations

from pathlib import Path

from optiml_jax.bench.collections.generic import list_files, task_stem
from optiml_jax.bench.tasks import BenchError, Example, Task, qualified_name

_SPLIT_ORDER = {"train": 0, "dev": 1, "test": 2}


def _split_rank(file: Path):
    return _SPLIT_ORDER.get(file.stem.rsplit("_", 1)[-1], 3), file.name


def _load(files: list[Path]):
    instances = []
    for file in files:
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise BenchError(f"{file}: cannot read ({e})") from None
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            text, tab, output = line.partition("\t")
            if not tab:
                raise BenchError(f"{file}:{number}: expected input<TAB>output")
            answers = tuple(a.strip() for a in output.split(" [SEP] "))
            instances.append((Example(input=text, references=answers),))
    return instances


def read(path, columns: dict, known=frozenset()) -> list[Task]:
    by_task: dict[str, list[Path]] = {}
    for file in sorted(list_files(path, (".tsv",)), key=_split_rank):
        by_task.setdefault(task_stem(file), []).append(file)
    return [
        Task(
            name=qualified_name("crossfit", local),
            benchmark="crossfit",
            load=lambda files=files: _load(files),
        )
        for local, files in sorted(by_task.items())
    ]
