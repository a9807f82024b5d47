"""The split file (`--split configs/bench/optiml.yaml`, spec §4) and the level of every task:

    fully_held_out_categories: [...]    every task of these categories is evaluation only
    partially_supervised_tasks: [...]   evaluation-only tasks of categories that are trained on
    fully_supervised_tasks: [...]       train tasks whose last N instances are evaluated ...
    fully_supervised_instances: N       ... and never trained on
    dev_tasks: [...]                    evaluation tasks reported as dev (the others are test)
    dev_categories: [...]               every evaluation task of these categories is dev too (the paper's
                                        dev holds whole held-out categories, Table 15)

A task name of a collection that was given but not found, or a category no task or registry entry has,
is an error listing the near matches; names of collections not given are skipped (a partial build)."""

from __future__ import annotations

import dataclasses
import difflib

from optiml_jax.bench.registry import read_yaml_mapping
from optiml_jax.bench.tasks import BenchError, benchmark_of

LIST_KEYS = (
    "fully_held_out_categories",
    "partially_supervised_tasks",
    "fully_supervised_tasks",
    "dev_tasks",
    "dev_categories",
)
KEYS = LIST_KEYS + ("fully_supervised_instances",)


@dataclasses.dataclass(frozen=True)
class SplitFile:
    fully_held_out_categories: tuple[str, ...]
    partially_supervised_tasks: tuple[str, ...]
    fully_supervised_tasks: tuple[str, ...]
    fully_supervised_instances: int
    dev_tasks: tuple[str, ...]
    dev_categories: tuple[str, ...] = ()
    path: str = ""

    def is_dev(self, task) -> bool:
        """Whether an evaluation task's rows are dev (else test)."""
        return task.name in self.dev_tasks or task.category in self.dev_categories


def load_split(path) -> SplitFile:
    data = read_yaml_mapping(path, "split")
    unknown = sorted(map(str, set(data) - set(KEYS)))
    if unknown:
        raise BenchError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(KEYS)})")
    values = {}
    for key in LIST_KEYS:
        value = data.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise BenchError(f"{path}: {key} must be a list of names, got {value!r}")
        values[key] = tuple(value)
    count = data.get("fully_supervised_instances", 0)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise BenchError(f"{path}: fully_supervised_instances must be a whole number >= 0, got {count!r}")
    both = set(values["partially_supervised_tasks"]) & set(values["fully_supervised_tasks"])
    if both:
        raise BenchError(f"{path}: {sorted(both)[0]!r} is both partially and fully supervised")
    return SplitFile(**values, fully_supervised_instances=count, path=str(path))


def _near(name: str, candidates) -> str:
    near = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    return f"near matches: {', '.join(near)}" if near else "no near match"


def check_names(split: SplitFile, tasks: dict, built: set[str], categories: set[str]) -> None:
    """BenchError for a listed task of a built collection that is not there, or an unknown category."""
    for key in ("partially_supervised_tasks", "fully_supervised_tasks", "dev_tasks"):
        for name in getattr(split, key):
            if name not in tasks and benchmark_of(name) in built:
                raise BenchError(f"{split.path}: {key}: no task {name!r} ({_near(name, tasks)})")
    for key in ("fully_held_out_categories", "dev_categories"):
        for category in getattr(split, key):
            if category not in categories:
                raise BenchError(
                    f"{split.path}: {key}: no category {category!r} ({_near(category, categories)})"
                )


def level_of(split: SplitFile, name: str, category: str) -> str:
    """The task's level: train (with fully_supervised: also evaluated on its last instances),
    fully_held_out or partially_supervised (evaluation only)."""
    if category in split.fully_held_out_categories:
        if name in split.fully_supervised_tasks:
            raise BenchError(
                f"{split.path}: {name!r} is fully supervised but its category {category!r} is held out"
            )
        return "fully_held_out"
    if name in split.partially_supervised_tasks:
        return "partially_supervised"
    if name in split.fully_supervised_tasks:
        return "fully_supervised"
    return "train"
