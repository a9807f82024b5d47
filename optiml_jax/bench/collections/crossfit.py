"""CrossFit: TSV files of `input<TAB>output` lines, one per task and split, as its task scripts write them:
`{task}/{task}_full_{seed}_{split}.tsv` (the whole dataset, what OPT-IML trained on),
`{task}/{task}_{k}_{seed}_{split}.tsv` (a k-shot sample) or plainly `{task}_{split}.tsv`. A task's
answers are the fields after the input, several answers joined by tabs or by ` [SEP] `.

One variant is read per task, so no instance is read twice: the full one, else the plain one, else the
largest k-shot sample (lowest seed). A task's instances are its splits' lines in the order train, dev,
test (so the fully supervised instances, the last ones, come from its test split)."""

from __future__ import annotations

import re
from pathlib import Path

from optiml_jax.bench.collections.generic import list_files
from optiml_jax.bench.tasks import BenchError, Example, Task, qualified_name

_SPLIT_ORDER = {"train": 0, "dev": 1, "test": 2}
_NAME = re.compile(r"^(?P<task>.+?)(?:_(?P<k>full|\d+)_(?P<seed>\d+))?_(?P<split>train|dev|test)$")


def _variant_rank(variant: tuple) -> tuple:
    """Sort key, best first: full, then plain, then k-shot by larger k and lower seed."""
    k, seed = variant
    if k == "full":
        return (0, 0, seed)
    if k is None:
        return (1, 0, 0)
    return (2, -k, seed)


def _parse(file: Path) -> tuple[str, tuple, str]:
    """(task, (k, seed), split) of a TSV file's name."""
    match = _NAME.match(file.stem)
    if not match:
        raise BenchError(
            f"{file}: expected {{task}}[_full_{{seed}} | _{{k}}_{{seed}}]_{{train,dev,test}}.tsv"
        )
    k, seed = match["k"], match["seed"]
    variant = (k if k in (None, "full") else int(k), int(seed) if seed else 0)
    return match["task"], variant, match["split"]


def _answers(output: str) -> tuple[str, ...]:
    return tuple(a.strip() for field in output.split("\t") for a in field.split(" [SEP] "))


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
            instances.append((Example(input=text, references=_answers(output)),))
    return instances


def read(path, columns: dict, known=frozenset()) -> list[Task]:
    variants: dict[str, dict[tuple, list[tuple[str, Path]]]] = {}
    for file in list_files(path, (".tsv",)):
        task, variant, split = _parse(file)
        variants.setdefault(task, {}).setdefault(variant, []).append((split, file))
    tasks = []
    for local, by_variant in sorted(variants.items()):
        best = min(by_variant, key=_variant_rank)
        files = [file for split, file in sorted(by_variant[best], key=lambda p: (_SPLIT_ORDER[p[0]], p[1]))]
        tasks.append(
            Task(name=qualified_name("crossfit", local), benchmark="crossfit", load=lambda f=files: _load(f))
        )
    return tasks
