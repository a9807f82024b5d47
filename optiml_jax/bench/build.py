"""build_bench: collections in, OPT-IML Bench out (spec §3-§5).

1. Read every collection's tasks (metadata; instances are loaded later, a task at a time), give each
   its category, sources, instruction and dropped templates (task file or registry).
2. Remove CrossFit/ExMix/T5 tasks whose data source another collection has; give every task its level
   from the split file; remove train tasks sharing a data source with an evaluation task.
3. Evaluation side (held-out tasks, fully supervised tasks' last instances): prompted, written to dev/
   and test/, its 13-grams indexed (overlap.EvalIndex).
4. Train side, streamed over worker processes (forked after 3, sharing the index): each worker loads a
   task, drops templates, caps, prompts, writes its shard and looks its 13-grams up in the index.
5. Pairs over the threshold to overlap.json (their train tasks removed with --drop-overlapping train);
   manifest.json and report.md. The directory appears complete or not at all."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from optiml_jax.bench import consolidate, output, prompts, report, splits
from optiml_jax.bench.collections import READERS
from optiml_jax.bench.overlap import NGRAM, EvalIndex
from optiml_jax.bench.registry import load_registry
from optiml_jax.bench.tasks import BENCHMARKS, INSTRUCTION_TYPES, BenchError, Task, normalise_source
from optiml_jax.fileio import atomic_output_dir, check_output_dir

logger = logging.getLogger(__name__)
DROP_CHOICES = ("none", "train")
EVAL_LEVELS = ("fully_held_out", "partially_supervised")


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    seed: int = 0
    max_per_task: int = 100_000
    max_per_task_flan: int = 30_000
    max_dev_per_task: int = 250  # spec §5: validation, at most 250 prompts per task
    overlap_threshold: float = 0.01
    drop_overlapping: str = "none"
    workers: Optional[int] = None  # None: every core

    def task_cap(self, task: Task) -> int:
        return self.max_per_task_flan if task.benchmark == "flan" else self.max_per_task


@dataclasses.dataclass
class BuildResult:
    manifest: dict
    overlap: list
    train_examples: int
    eval_examples: int
    workers: int
    index_bytes: int  # the evaluation side's n-gram index, held by every worker (shared, forked)
    # Seconds: `build` (all, wall), `eval` (before the train pass: collections scanned, evaluation side
    # written and indexed; wall), `train` (the train pass, wall), `overlap` (hashing + lookups, wall per
    # worker); the `_cpu` ones are CPU seconds (a shared host's load does not change them).
    timings: dict


MISSING_NAMED = 10  # tasks named in a missing-category error (the rest counted)


def read_collections(collections: dict, registry, progress: bool) -> list[Task]:
    for name, path in collections.items():  # every path checked before any is read
        if name not in BENCHMARKS:
            raise BenchError(
                f"--collection {name}={path}: unknown collection (known: {', '.join(BENCHMARKS)})"
            )
        if not Path(path).exists():
            raise BenchError(f"--collection {name}={path}: no such file or directory")
    tasks: list[Task] = []
    for name, path in tqdm(collections.items(), desc="collections", disable=not progress):
        tasks += READERS[name](path, registry.columns.get(name, {}), known=frozenset(registry.tasks))
    seen: dict[str, str] = {}
    for task in tasks:
        if task.name in seen:
            raise BenchError(f"task {task.name!r} is read twice ({seen[task.name]} and {task.benchmark})")
        seen[task.name] = task.benchmark
        entry = registry.tasks.get(task.name)
        if entry is not None:
            task.category = entry.category or task.category
            task.sources = entry.sources or task.sources
            task.instruction = entry.instruction
            task.drop_templates = entry.drop_templates
        task.sources = registry.canonical_sources(task.sources)
    # every task the registry misses, in one error: a new dump is fixed in one edit, not one per run
    for what, it, lacking in (
        ("category", "it", [t for t in tasks if not t.category]),
        ("instruction", "one", [t for t in tasks if _needs_instruction(t)]),
    ):
        named = ", ".join(f"{t.name!r} ({t.benchmark})" for t in lacking[:MISSING_NAMED])
        if len(lacking) == 1:
            raise BenchError(f"task {named} has no {what}: add {it} to {registry.path}")
        if lacking:
            more = f" and {len(lacking) - MISSING_NAMED} more" if len(lacking) > MISSING_NAMED else ""
            raise BenchError(
                f"{len(lacking)} tasks have no {what}: {named}{more}; add them to {registry.path}"
            )
    return tasks


def _needs_instruction(task: Task) -> bool:
    return INSTRUCTION_TYPES[task.benchmark] != "instance" and not (task.instruction or task.definition)


def assign_levels(tasks: list[Task], split, built: set, known_categories: set) -> tuple[dict, dict]:
    """({task: level}, {removed task: reason}); `built`: the collections given, `known_categories`
    the registry's (a held-out category of a collection not given is no error)."""
    by_name = {t.name: t for t in tasks}
    splits.check_names(split, by_name, built, {t.category for t in tasks} | known_categories)
    levels = {t.name: splits.level_of(split, t.name, t.category) for t in tasks}
    removed = consolidate.shared_source_removals(tasks)
    eval_sources: dict[str, str] = {}
    for task in tasks:
        if levels[task.name] in EVAL_LEVELS and task.name not in removed:
            for source in task.sources:
                eval_sources.setdefault(normalise_source(source), task.name)
    for task in tasks:
        if levels[task.name] in EVAL_LEVELS or task.name in removed:
            continue
        for source in task.sources:
            holder = eval_sources.get(normalise_source(source))
            if holder:
                removed[task.name] = (
                    f"shares data source {source!r} with evaluation task {holder!r} (spec §4)"
                )
                break
    return levels, removed


def instances_of(task: Task, settings: BenchSettings, split, level: str, side: str) -> tuple[list, int]:
    """The task's (index, instance) pairs for `side` ("train" or "eval") and the prompts dropped."""
    kept, dropped = consolidate.drop_templates(task.load(), task.drop_templates)
    held = split.fully_supervised_instances
    if level == "fully_supervised" and held:
        kept = kept[-held:] if side == "eval" else kept[:-held]
    kept = consolidate.cap(kept, settings.task_cap(task), settings.seed, task.name, side)
    if side == "eval" and split.is_dev(task):
        kept = consolidate.cap(kept, settings.max_dev_per_task, settings.seed, task.name, "dev")
    return kept, dropped


def texts(rows: list[dict]) -> list[str]:
    return [f"{row['src']} {row['tgt']}" for row in rows]


def _split_of(task: Task, level: str, removed: dict, split) -> str:
    if task.name in removed:
        return "removed"
    if level in ("train", "fully_supervised"):
        return "train"
    return "dev" if split.is_dev(task) else "test"


class WorkerDied(RuntimeError):
    """A train-pass worker process ended without its result (exit 1, no output written)."""


# The train pass's shared state, set before the worker processes are forked (they inherit it).
_JOB: dict = {}


def _train_task(i: int) -> dict:
    task, level, settings, split, directory, index = (
        _JOB[k] for k in ("tasks", "levels", "settings", "split", "directory", "index")
    )
    task = task[i]
    cpu_start = time.process_time()
    kept, dropped = instances_of(task, settings, split, level[task.name], "train")
    rows = prompts.task_rows(task, kept, settings.seed, "train")
    if rows:
        output.write_rows(output.shard_path(directory, "train", task.name), rows)
    start, overlap_cpu = time.perf_counter(), time.process_time()
    fractions = index.fractions(index.matches(texts(rows)), skip_task=task.name)
    pairs = sorted((e, float(f)) for e, f in fractions.items() if f > settings.overlap_threshold)
    return {
        "examples": len(rows),
        "templates": len({row["template"] for row in rows}),
        "dropped_prompts": dropped,
        "pairs": pairs,
        "overlap": time.perf_counter() - start,
        "overlap_cpu": time.process_time() - overlap_cpu,
        "train_cpu": time.process_time() - cpu_start,
    }


def _eval_side(eval_tasks, levels, settings, split, directory, info, progress) -> dict[str, list[str]]:
    """Writes the evaluation rows to dev/ and test/; {task: its rows' texts} for the overlap index."""
    eval_texts = {}
    for task in tqdm(eval_tasks, desc="evaluation tasks", disable=not progress):
        kept, dropped = instances_of(task, settings, split, levels[task.name], "eval")
        rows = prompts.task_rows(task, kept, settings.seed, levels[task.name])
        eval_split = "dev" if split.is_dev(task) else "test"
        if rows:
            output.write_rows(output.shard_path(directory, eval_split, task.name), rows)
            eval_texts[task.name] = texts(rows)
        info[task.name]["examples_by_split"][eval_split] = len(rows)
        info[task.name]["dropped_prompts"] = dropped
        info[task.name]["templates"] = len({row["template"] for row in rows})
    return eval_texts


def _train_pass(train_tasks, workers: int, info: dict, timings: dict, progress: bool) -> list[dict]:
    """Runs _train_task over `train_tasks` (on `workers` forked processes, _JOB already set), fills
    their entries of `info` and the CPU timings; the overlapping pairs over the threshold."""
    overlap, pool = [], None
    try:
        if workers == 1:
            results = map(_train_task, range(len(train_tasks)))
        else:
            # an executor, not a Pool: a worker killed (the OOM killer) breaks it at once, where a Pool
            # would wait for the lost task forever
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
            results = pool.map(_train_task, range(len(train_tasks)))
        bar = tqdm(total=len(train_tasks), desc="train tasks (write + 13-gram overlap)", disable=not progress)
        for task, result in zip(train_tasks, results):
            entry = info[task.name]
            entry["examples_by_split"]["train"] = result["examples"]
            entry["dropped_prompts"] += result["dropped_prompts"]
            entry["templates"] = max(entry.get("templates", 0), result["templates"])
            for key in ("overlap", "overlap_cpu", "train_cpu"):
                timings[key] += result[key]
            overlap += [
                {"train_task": task.name, "eval_task": e, "fraction": round(f, 6)} for e, f in result["pairs"]
            ]
            bar.update()
        bar.close()
    except BrokenProcessPool:
        raise WorkerDied(
            "a worker process of the train pass died (killed, or out of memory: try fewer --workers); "
            "nothing was written"
        ) from None
    finally:
        _JOB.clear()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return overlap


def _drop_overlapping(overlap: list, info: dict, directory: Path) -> list:
    """--drop-overlapping train: the train task of every reported pair removed, its shards deleted. A
    fully supervised task removed takes its held-out rows along, so pairs against those are settled
    last and dropped (nothing is left to overlap); the pairs that stand are returned."""
    # pairs against evaluation-only tasks first: those tasks stay whatever happens
    for pair in sorted(overlap, key=lambda p: info[p["eval_task"]]["level"] == "fully_supervised"):
        entry = info[pair["train_task"]]
        if entry["split"] == "removed" or info[pair["eval_task"]]["split"] == "removed":
            continue
        entry["split"] = "removed"
        entry["removed_reason"] = (
            f"{pair['fraction']:.1%} of {pair['eval_task']!r}'s examples share a {NGRAM}-gram "
            "with it (spec §4)"
        )
        entry["examples_by_split"] = {"train": 0, "dev": 0, "test": 0}
        for split in output.SPLITS:  # a fully supervised task goes whole
            output.shard_path(directory, split, pair["train_task"]).unlink(missing_ok=True)
    return [pair for pair in overlap if info[pair["eval_task"]]["split"] != "removed"]


def build_bench(
    collections: dict,
    registry_path,
    split_path,
    output_dir,
    settings: BenchSettings = BenchSettings(),  # noqa: B008 (frozen)
    overwrite: bool = False,
    progress: bool = True,
) -> BuildResult:
    """Builds OPT-IML Bench from `collections` ({name: path}) into `output_dir` (see the module doc)."""
    started, cpu_started = time.perf_counter(), time.process_time()
    if settings.drop_overlapping not in DROP_CHOICES:
        raise BenchError(
            f"--drop-overlapping must be one of {', '.join(DROP_CHOICES)}, got {settings.drop_overlapping!r}"
        )
    check_output_dir(output_dir, overwrite)
    registry = load_registry(registry_path)
    split = splits.load_split(split_path)
    tasks = read_collections(collections, registry, progress)
    levels, removed = assign_levels(tasks, split, set(collections), registry.categories())
    info = {
        t.name: {
            "benchmark": t.benchmark,
            "category": t.category,
            "sources": list(t.sources),
            "split": _split_of(t, levels[t.name], removed, split),
            "level": levels[t.name],
            "examples": 0,
            "examples_by_split": {"train": 0, "dev": 0, "test": 0},
            "dropped_prompts": 0,
            "removed_reason": removed.get(t.name),
        }
        for t in tasks
    }
    kept = [t for t in tasks if t.name not in removed]
    train_tasks = [t for t in kept if levels[t.name] in ("train", "fully_supervised")]
    workers = max(1, min(settings.workers or os.cpu_count() or 1, len(train_tasks) or 1))
    timings = dict.fromkeys(("overlap", "overlap_cpu", "train_cpu"), 0.0)
    with atomic_output_dir(output_dir, overwrite=overwrite, collective=False) as directory:
        eval_tasks = [t for t in kept if levels[t.name] != "train"]
        eval_texts = _eval_side(eval_tasks, levels, settings, split, directory, info, progress)
        index = EvalIndex.build(eval_texts)
        timings.update(eval=time.perf_counter() - started, eval_cpu=time.process_time() - cpu_started)
        _JOB.update(
            tasks=train_tasks, levels=levels, settings=settings, split=split, directory=directory, index=index
        )
        overlap = _train_pass(train_tasks, workers, info, timings, progress)
        timings["train"] = time.perf_counter() - started - timings["eval"]
        timings["overlap"] /= workers
        if settings.drop_overlapping == "train":
            overlap = _drop_overlapping(overlap, info, directory)
        for entry in info.values():
            entry["examples"] = sum(entry["examples_by_split"].values())
        for name in output.SPLITS:
            (directory / name).mkdir(exist_ok=True)
        manifest = {
            "tasks": info,
            "settings": {
                **dataclasses.asdict(settings),
                "workers": workers,
                "ngram": NGRAM,
                "collections": {k: str(v) for k, v in collections.items()},
                "registry": str(registry_path),
                "split": str(split_path),
                "fully_supervised_instances": split.fully_supervised_instances,
            },
        }
        output.write_json(directory / "manifest.json", manifest)
        output.write_json(directory / "overlap.json", overlap)
        report.write_report(directory / "report.md", manifest, overlap)
    timings["build"] = time.perf_counter() - started
    return BuildResult(
        manifest=manifest,
        overlap=overlap,
        train_examples=sum(e["examples_by_split"]["train"] for e in info.values()),
        eval_examples=sum(
            e["examples_by_split"]["dev"] + e["examples_by_split"]["test"] for e in info.values()
        ),
        workers=workers,
        index_bytes=index.nbytes,
        timings=timings,
    )
