"""Consolidation (spec §3): which tasks of which collection are kept, which templates, how many
examples. Every random choice is a pure function of (seed, task, what), so a task reads the same in any
worker and any run."""

from __future__ import annotations

import random

from optiml_jax.bench.tasks import Instance, Task, normalise_source

# Collections whose tasks are kept only when no other collection has their data source.
SOURCE_EXCLUSIVE = ("crossfit", "exmix", "t5")


def shared_source_removals(tasks: list[Task]) -> dict[str, str]:
    """{task: reason} for each CrossFit/ExMix/T5 task one of whose data sources another collection has."""
    holders: dict[str, set[str]] = {}
    for task in tasks:
        for source in task.sources:
            holders.setdefault(normalise_source(source), set()).add(task.benchmark)
    removed = {}
    for task in tasks:
        if task.benchmark not in SOURCE_EXCLUSIVE:
            continue
        for source in task.sources:
            others = sorted(holders[normalise_source(source)] - {task.benchmark})
            if others:
                removed[task.name] = f"data source {source!r} is also in {', '.join(others)} (spec §3)"
                break
    return removed


def drop_templates(
    instances: list[Instance], drop: tuple[str, ...]
) -> tuple[list[tuple[int, Instance]], int]:
    """(index, instance) pairs left once the prompts of the `drop` templates are gone (an instance with
    none left goes too), and how many prompts were dropped. Indices are the collection's."""
    kept, dropped = [], 0
    for index, alternatives in enumerate(instances):
        left = tuple(e for e in alternatives if e.template not in drop) if drop else alternatives
        dropped += len(alternatives) - len(left)
        if left:
            kept.append((index, left))
    return kept, dropped


def cap(items: list, limit: int, seed: int, task: str, what: str) -> list:
    """At most `limit` of `items` drawn at random (seeded by task and purpose), in their own order."""
    if limit is None or len(items) <= limit:
        return items
    chosen = sorted(
        random.Random(f"optiml_jax.bench.cap:{seed}:{task}:{what}").sample(range(len(items)), limit)
    )
    return [items[i] for i in chosen]


def draw_template(alternatives: Instance, seed: int, task: str, index: int):
    """One prompt of an instance's templates (N examples -> N prompts, spec §5)."""
    if len(alternatives) == 1:
        return alternatives[0]
    return random.Random(f"optiml_jax.bench.template:{seed}:{task}:{index}").choice(alternatives)
