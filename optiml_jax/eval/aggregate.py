"""A suite's figures as the paper aggregates them (§4.1, §6 of the bench spec), from predictions records.

Each record carries its entry's `task`, `template`, `shots`, `level`, `category`, `benchmark` and `metric`
(rougeL, exact_match or accuracy) and that metric's value (percent; accuracy is the record's `acc`).

* template: the mean over its instances; task: the mean over its templates (per shot setting);
* category (within a level): the mean over benchmarks of the mean over each benchmark's tasks, accuracy
  and ROUGE-L averaged together where a category mixes them, as the paper does;
* level: the mean over its categories; per_shot: the mean over every (level, category) group;
* per_category (across levels) and per_benchmark: the same means over tasks, by category or benchmark;
* selection_score: over the (level, category) groups, the mean of each group's 0-shot and 5-shot
  figures (summarisation 0-shot only), then the mean over groups: how the paper picks a checkpoint.

Numbers are percent, rounded to 4 decimals only on output; shot counts are strings ("0", "5").
"""

from __future__ import annotations

from statistics import fmean
from typing import Iterable, Mapping, Optional

from optiml_jax.eval.metrics import DECIMALS

METRIC_KEYS = {"rougeL": "rougeL", "exact_match": "exact_match", "accuracy": "acc"}
SELECTION_SHOTS = (0, 5)
ZERO_SHOT_ONLY = ("summarization",)  # categories whose demonstrations overflow the context (paper)


def record_score(record: Mapping) -> float:
    """The value of the record's entry metric (percent)."""
    return float(record[METRIC_KEYS[record["metric"]]])


def _rounded(groups: dict) -> dict:
    return {
        name: {str(k): round(v, DECIMALS) for k, v in sorted(by_shot.items())}
        for name, by_shot in groups.items()
    }


def _mean_over(values: dict[str, dict[int, list[float]]]) -> dict[str, dict[int, float]]:
    return {name: {k: fmean(v) for k, v in by_shot.items()} for name, by_shot in values.items()}


def _group(task_scores: dict, info: dict, key) -> dict[str, dict[int, float]]:
    """{group: {shots: mean over benchmarks of the mean over the group's tasks of that benchmark}}."""
    by_benchmark: dict = {}
    for (task, shots), score in task_scores.items():
        group = key(info[task])
        by_benchmark.setdefault(group, {}).setdefault(shots, {}).setdefault(
            info[task]["benchmark"], []
        ).append(score)
    return {
        group: {shots: fmean(fmean(v) for v in benchmarks.values()) for shots, benchmarks in by_shot.items()}
        for group, by_shot in by_benchmark.items()
    }


def selection_score(
    groups: Mapping[str, Mapping[int, float]], categories: Mapping[str, str]
) -> Optional[float]:
    """The mean over (level, category) groups of each one's 0-shot and 5-shot mean (0-shot alone for
    summarisation); None when no group has either."""
    values = []
    for group, by_shot in groups.items():
        shots = (0,) if categories[group] in ZERO_SHOT_ONLY else SELECTION_SHOTS
        present = [by_shot[k] for k in shots if k in by_shot]
        if present:
            values.append(fmean(present))
    return fmean(values) if values else None


def aggregate_suite(records: Iterable[Mapping]) -> dict:
    """metrics.json's suite figures (see the module doc): per_task, per_template, per_category,
    per_level, per_level_category, per_benchmark, per_shot and selection_score."""
    by_template: dict = {}
    info: dict = {}
    for record in records:
        info.setdefault(record["task"], {k: record[k] for k in ("level", "category", "benchmark", "metric")})
        key = (record["task"], int(record["shots"]), record["template"])
        by_template.setdefault(key, []).append(record_score(record))
    template_scores = {key: fmean(values) for key, values in by_template.items()}
    per_template: dict = {}
    for (task, shots, template), score in template_scores.items():
        per_template.setdefault(task, {}).setdefault(shots, {})[template] = score
    task_scores = {
        (task, shots): fmean(by_name.values())
        for task, by_shot in per_template.items()
        for shots, by_name in by_shot.items()
    }
    level_category = _group(task_scores, info, lambda i: (i["level"], i["category"]))
    per_level: dict = {}
    for (level, _), by_shot in level_category.items():
        for shots, score in by_shot.items():
            per_level.setdefault(level, {}).setdefault(shots, []).append(score)
    per_shot: dict = {}
    for by_shot in level_category.values():
        for shots, score in by_shot.items():
            per_shot.setdefault(shots, []).append(score)
    per_task: dict = {}
    for (task, shots), score in task_scores.items():
        per_task.setdefault(task, {})[shots] = score
    nested: dict = {}
    for (level, category), by_shot in level_category.items():
        nested.setdefault(level, {})[category] = {
            str(k): round(v, DECIMALS) for k, v in sorted(by_shot.items())
        }
    selection = selection_score(
        {f"{level}/{category}": v for (level, category), v in level_category.items()},
        {f"{level}/{category}": category for level, category in level_category},
    )
    return {
        "selection_score": None if selection is None else round(selection, DECIMALS),
        "per_shot": {str(k): round(fmean(v), DECIMALS) for k, v in sorted(per_shot.items())},
        "per_level": _rounded(_mean_over(per_level)),
        "per_level_category": nested,
        "per_category": _rounded(_group(task_scores, info, lambda i: i["category"])),
        "per_benchmark": _rounded(_group(task_scores, info, lambda i: i["benchmark"])),
        "per_task": _rounded(per_task),
        "per_template": {
            task: {
                str(k): {t: round(v, DECIMALS) for t, v in names.items()}
                for k, names in sorted(by_shot.items())
            }
            for task, by_shot in per_template.items()
        },
        "tasks": info,
    }
