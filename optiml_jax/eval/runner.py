"""Generation evaluation end to end: tasks -> prompts -> greedy completions -> official scores -> files.

    tasks = load_eval_tasks(
        "natural-instructions/tasks", "natural-instructions/splits/default/test_tasks.txt"
    )
    result = evaluate(model, params, tokenizer, tasks, EvalSettings(shots=2))
    write_results("out/", result)        # predictions.jsonl, metrics.json, report.md

Tasks are answered by greedy generation, or, where they have answer options (settings.mode), by rank
classification: every option scored by its log-likelihood (scoring.py). The fine-tuning loop and
`python -m optiml_jax.evaluate` both call these; `rescore` scores an existing
predictions file with no model, so other systems' outputs are scored by the same code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from optiml_jax.data.sources import Fields
from optiml_jax.eval.generation import generate_completions
from optiml_jax.eval.metrics import ALL_METRICS, UNCATEGORIZED, InstanceScorer, aggregate
from optiml_jax.eval.prompts import DEFAULT_DELIMITER, PROMPT_TEMPLATES, build_prompt
from optiml_jax.eval.scoring import Scorer, encode_pair
from optiml_jax.eval.tasks import EvalDataError, EvalTask, holdout_eval_tasks, jsonl_objects, load_eval_tasks
from optiml_jax.fileio import atomic_output_dir
from optiml_jax.sharding import DEFAULT_RULES
from optiml_jax.tokenizer import PROMPT_ADD_BOS

log = logging.getLogger(__name__)

PREDICTIONS_FILE, METRICS_FILE, REPORT_FILE = "predictions.jsonl", "metrics.json", "report.md"
MODES = ("auto", "generate", "rank")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How prompts are built and answers generated (the paper's protocol by default: zero-shot, greedy,
    up to 256 new tokens, stopping at </s>)."""

    template: str = "optiml"  # prompts.PROMPT_TEMPLATES
    shots: int = 0  # the task's first k positive examples before the instance
    delimiter: str = DEFAULT_DELIMITER  # the answer cue of the optiml template
    max_new_tokens: int = 256
    batch_size: int = 8  # global: rows of one generation batch, split over the data-parallel devices
    stop: tuple[str, ...] = ()  # a completion is cut before the first of these
    add_bos: bool = PROMPT_ADD_BOS  # the project's prompt convention (tokenizer.PROMPT_ADD_BOS)
    # MODES: "auto" ranks the tasks whose every instance lists options (JSONL) and generates the rest;
    # "rank" also ranks SNI tasks over their label set (when it has at most max_options labels)
    mode: str = "auto"
    max_options: int = 10

    def __post_init__(self):
        if self.template not in PROMPT_TEMPLATES:
            raise ValueError(f"template must be one of {', '.join(PROMPT_TEMPLATES)}, got {self.template!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if (
            isinstance(self.max_options, bool)
            or not isinstance(self.max_options, int)
            or self.max_options < 2
        ):
            raise ValueError(f"max_options must be an integer >= 2, got {self.max_options!r}")
        for name in ("shots", "max_new_tokens", "batch_size"):
            value, low = getattr(self, name), 0 if name == "shots" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a tuple of non-empty strings, got {self.stop!r}")


@dataclasses.dataclass
class EvalResult:
    records: list[dict]  # one per instance, in task order: predictions.jsonl's lines
    metrics: dict  # metrics.json


def score_records(records: Iterable[dict], scorer: Optional[InstanceScorer] = None) -> list[dict]:
    """Each record's metrics (percent), recomputed: accuracy from the option log-probabilities of a
    ranked record, exact match and ROUGE of the "prediction" against the "references" otherwise."""
    scorer = scorer or InstanceScorer()
    out = []
    for record in records:
        record = {k: v for k, v in record.items() if k not in ALL_METRICS}
        if "option_logprobs" in record:
            out.append(
                {**record, **_rank_scores(record["options"], record["option_logprobs"], record["references"])}
            )
        else:
            out.append({**record, **scorer(record["prediction"], record["references"])})
    return out


def _rank_scores(options, logprobs, references) -> dict:
    """The likeliest option, with and without dividing by its length in characters, and whether each is
    right."""
    best = options[int(np.argmax(logprobs))]
    best_norm = options[int(np.argmax([lp / len(option) for lp, option in zip(logprobs, options)]))]
    return {
        "prediction": best,
        "prediction_norm": best_norm,
        "acc": 100.0 * (best in references),
        "acc_norm": 100.0 * (best_norm in references),
    }


def evaluate(
    model,
    params,
    tokenizer,
    tasks: Sequence[EvalTask],
    settings: EvalSettings = EvalSettings(),
    *,
    mesh=None,
    rules=None,
    progress: bool = False,
) -> EvalResult:
    """Every instance of `tasks`, generated and scored as the official SNI scorer does, or ranked by
    likelihood over its options (settings.mode); records in task order."""

    rules = rules or DEFAULT_RULES
    ranked, generated, skipped = _split_by_mode(tasks, settings)
    records, extra = {}, {"tasks": len(tasks) - len(skipped)}
    if skipped:
        log.warning(
            "mode=rank: %d task(s) have more than %d distinct outputs (or none listed) and are not "
            "evaluated: %s",
            len(skipped),
            settings.max_options,
            ", ".join(skipped[:5]),
        )
        extra["skipped_tasks"] = skipped
    if generated:
        generation_records, stats = _generate_records(
            model, params, tokenizer, generated, settings, mesh, rules, progress
        )
        records.update(generation_records)
        extra["generation"] = stats
    if ranked:
        rank_records, stats = _rank_records(model, params, tokenizer, ranked, settings, mesh, rules)
        records.update(rank_records)
        extra["ranking"] = stats
    ordered = [
        records[(task.name, i)]
        for task in tasks
        for i in range(len(task.instances))
        if (task.name, i) in records
    ]
    if not ordered:
        raise EvalDataError("nothing to evaluate: every task was skipped")
    metrics = aggregate(ordered)
    metrics["settings"] = {**dataclasses.asdict(settings), "stop": list(settings.stop), **extra}
    return EvalResult(records=ordered, metrics=metrics)


def evaluate_generation(
    model, params, tokenizer, tasks: Sequence[EvalTask], settings: EvalSettings = EvalSettings(), **kwargs
) -> EvalResult:
    """`evaluate` with every task answered by generation."""
    return evaluate(model, params, tokenizer, tasks, dataclasses.replace(settings, mode="generate"), **kwargs)


def _split_by_mode(tasks, settings):
    """(tasks to rank with their options per instance, tasks to generate, names of skipped tasks)."""
    ranked, generated, skipped = [], [], []
    for task in tasks:
        with_options = all(instance.options for instance in task.instances)
        if settings.mode == "generate" or (settings.mode == "auto" and not with_options):
            generated.append(task)
        elif with_options:
            ranked.append((task, [instance.options for instance in task.instances]))
        elif task.labels and len(task.labels) <= settings.max_options:
            ranked.append((task, [task.labels] * len(task.instances)))
        else:
            skipped.append(task.name)
    return ranked, generated, skipped


def _record(task, index, instance, prompt) -> dict:
    return {
        "task": task.name,
        "id": instance.id,
        "category": task.category,
        "prompt": prompt,
        "references": list(instance.references),
    }


def _generate_records(model, params, tokenizer, tasks, settings, mesh, rules, progress):

    items = [(task, i, instance, prompt) for task, i, instance, prompt in _prompts(tasks, settings)]
    prompt_ids = tokenizer.encode_batch([item[3] for item in items], add_bos=settings.add_bos)
    texts, truncated, stats = generate_completions(
        model,
        params,
        tokenizer,
        prompt_ids,
        max_new_tokens=settings.max_new_tokens,
        batch_size=settings.batch_size,
        stop=settings.stop,
        mesh=mesh,
        rules=rules,
        progress=progress,
    )
    scorer = InstanceScorer()
    records = {}
    for (task, i, instance, prompt), text, cut in zip(items, texts, truncated):
        record = {**_record(task, i, instance, prompt), "prediction": text, "truncated": cut}
        records[(task.name, i)] = {**record, **scorer(text, record["references"])}
    return records, stats.as_dict()


def _rank_records(model, params, tokenizer, ranked, settings, mesh, rules):
    """Rank classification: every option's summed log-probability as the continuation " " + option."""
    import time

    tasks = [task for task, _ in ranked]
    options_of = {task.name: options for task, options in ranked}
    items = list(_prompts(tasks, settings))
    groups = []
    for task, i, _instance, prompt in items:
        encoded = [
            encode_pair(tokenizer, prompt, " " + option, settings.add_bos)
            for option in options_of[task.name][i]
        ]
        groups.append((encoded[0][0], [ids for _, ids in encoded]))
    scorer = Scorer(
        model,
        params,
        tokenizer,
        batch_size=settings.batch_size,
        add_bos=settings.add_bos,
        mesh=mesh,
        rules=rules,
    )
    start = time.perf_counter()
    scores = scorer.score_groups(groups)
    seconds = time.perf_counter() - start
    records = {}
    for (task, i, instance, prompt), option_scores in zip(items, scores):
        options, logprobs = list(options_of[task.name][i]), [s.logprob for s in option_scores]
        records[(task.name, i)] = {
            **_record(task, i, instance, prompt),
            "options": options,
            "option_logprobs": logprobs,
            "option_tokens": [s.tokens for s in option_scores],
            **_rank_scores(options, logprobs, instance.references),
        }
    stats = {
        "instances": len(items),
        "options": sum(len(g[1]) for g in groups),
        "seconds": round(seconds, 3),
        "programs": len(scorer.shapes),
    }
    return records, stats


def _prompts(tasks, settings):
    """(task, index, instance, prompt) of every instance, in task order."""
    if settings.shots and not any(task.is_sni for task in tasks):
        raise EvalDataError("shots > 0 takes the tasks' positive examples, which only SNI task files have")
    for task in tasks:
        for i, instance in enumerate(task.instances):
            yield (
                task,
                i,
                instance,
                build_prompt(
                    task,
                    instance,
                    template=settings.template,
                    shots=settings.shots,
                    delimiter=settings.delimiter,
                ),
            )


def read_predictions(path: str | os.PathLike) -> list[dict]:
    """The records of a predictions file (ours, or another system's with the same fields): each needs
    "task", "id", "prediction" and "references"; "category" defaults to uncategorized."""
    records = []
    for _, at, record in jsonl_objects(path):
        for key in ("task", "id", "prediction", "references"):
            if key not in record:
                raise EvalDataError(f"{at}: no {key!r}")
        if not isinstance(record["prediction"], str) or not isinstance(record["task"], str):
            raise EvalDataError(f"{at}: 'task' and 'prediction' must be strings")
        refs = record["references"]
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise EvalDataError(f"{at}: 'references' must be a non-empty list of strings")
        records.append({**record, "category": record.get("category") or UNCATEGORIZED})
    if not records:
        raise EvalDataError(f"{path}: no predictions")
    return records


def rescore(path: str | os.PathLike) -> EvalResult:
    """Scores an existing predictions file with no model (old metric fields are recomputed)."""
    records = score_records(read_predictions(path))
    metrics = aggregate(records)
    metrics["settings"] = {"predictions": str(path)}
    return EvalResult(records=records, metrics=metrics)


# ---------------------------------------------------------------------- files
def _value(m: dict, metric: str) -> str:
    return f"{m[metric]:.2f}" if metric in m else "-"


def report_markdown(metrics: dict, title: str = "Evaluation") -> str:
    """A per-category and per-task table a person reads (values in percent)."""
    shown = [m for m in ALL_METRICS if m in metrics["overall"]]
    names = {
        "exact_match": "exact match",
        "rouge1": "ROUGE-1",
        "rougeL": "ROUGE-L",
        "acc": "acc",
        "acc_norm": "acc_norm",
    }
    header = " | ".join(names[m] for m in shown)

    def row(name, m, extra=""):
        return f"| {name} |{extra} {m['instances']} | " + " | ".join(_value(m, k) for k in shown) + " |"

    overall = metrics["overall"]
    summary = ", ".join(f"{names[m]} {overall[m]:.2f}" for m in shown)
    lines = [
        f"# {title}",
        "",
        f"{overall['instances']} instances: {summary} (percent, micro-averaged).",
        "",
        "## Per category",
        "",
        f"| category | primary metric | instances | {header} |",
        "|---|---|---:|" + "---:|" * len(shown),
    ]
    lines += [row(name, m, f" {m['primary_metric']} |") for name, m in metrics["per_category"].items()]
    lines += ["", "## Per task", "", f"| task | instances | {header} |", "|---|---:|" + "---:|" * len(shown)]
    lines += [row(name, m) for name, m in metrics["per_task"].items()]
    settings = metrics.get("settings")
    if settings:
        lines += ["", "## Settings", "", "```json", json.dumps(settings, indent=2, ensure_ascii=False), "```"]
    return "\n".join(lines) + "\n"


def write_results(
    directory: str | os.PathLike,
    result: EvalResult,
    *,
    overwrite: bool = False,
    title: str = "Evaluation",
    report: Optional[str] = None,
) -> Path:
    """predictions.jsonl, metrics.json and report.md (`report`, default the per-category and per-task
    tables), written into a temporary directory and renamed into place (from one process: other
    processes must not call this)."""

    with atomic_output_dir(directory, overwrite=overwrite, collective=False) as tmp:
        with open(tmp / PREDICTIONS_FILE, "w", encoding="utf-8") as f:
            for record in result.records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        (tmp / METRICS_FILE).write_text(
            json.dumps(result.metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        report = report if report is not None else report_markdown(result.metrics, title)
        (tmp / REPORT_FILE).write_text(report, encoding="utf-8")
    return Path(directory)


# ---------------------------------------------------------------------- inside fine-tuning
def settings_from_config(tasks_cfg, batch_size: int, add_bos: bool = PROMPT_ADD_BOS) -> EvalSettings:
    """EvalSettings of a run config's `eval.tasks` section (batch_size when the section leaves it unset;
    add_bos: the run's data.add_bos, so its prompts are encoded as its training data)."""
    return EvalSettings(
        add_bos=add_bos,
        template=tasks_cfg.template,
        shots=tasks_cfg.shots,
        delimiter=tasks_cfg.delimiter,
        max_new_tokens=tasks_cfg.max_new_tokens,
        batch_size=tasks_cfg.batch_size or batch_size,
        stop=tuple(tasks_cfg.stop),
        mode=tasks_cfg.mode,
        max_options=tasks_cfg.max_options,
    )


def tasks_from_config(tasks_cfg, held_out=None, resolve=lambda path: path) -> list[EvalTask]:
    """The tasks of `eval.tasks`: its data path, or with data "holdout" the eval loader's held-out
    instances `held_out` (task name -> examples)."""

    if tasks_cfg.data == "holdout":
        if held_out is None:
            raise EvalDataError(
                "eval.tasks.data=holdout but the run holds no instances out (data.eval_holdout)"
            )
        return holdout_eval_tasks(held_out, tasks_cfg.max_instances)
    split = resolve(tasks_cfg.split) if tasks_cfg.split else None
    fields = Fields.from_text(tasks_cfg.fields)
    return load_eval_tasks(resolve(tasks_cfg.data), split, tasks_cfg.max_instances, tasks_cfg.format, fields)


def metric_scalars(metrics: dict, prefix: str = "eval_tasks") -> dict[str, float]:
    """TensorBoard / metrics.jsonl scalars: every metric overall; per task exact match and ROUGE-L, or
    acc and acc_norm for ranked tasks."""
    out = {f"{prefix}/{m}": v for m, v in metrics["overall"].items() if m in ALL_METRICS}
    for task, values in metrics["per_task"].items():
        out.update(
            {
                f"{prefix}/{task}/{m}": values[m]
                for m in ("exact_match", "rougeL", "acc", "acc_norm")
                if m in values
            }
        )
    generation = metrics.get("settings", {}).get("generation", {})
    if generation:
        out[f"{prefix}/seconds"] = generation["seconds"]
        out[f"{prefix}/truncated_prompts"] = generation["truncated"]
    return out


def headline(m: dict) -> tuple[tuple[str, str], tuple[str, str]]:
    """The two figures a table shows for a group: (EM, ROUGE-L) for generated answers, (acc, acc_norm)
    for ranked ones: ((label, key), (label, key))."""
    if "exact_match" in m:
        return ("EM", "exact_match"), ("RL", "rougeL")
    return ("acc", "acc"), ("accn", "acc_norm")


def summary_table(metrics: dict) -> str:
    """Per task and overall, the headline figures of one evaluation (plain text)."""
    lines = [f"{'task':<56} {'n':>5}   figures"]
    for name, m in [*metrics["per_task"].items(), ("overall", metrics["overall"])]:
        figures = "  ".join(f"{label} {m[key]:>6.2f}" for label, key in headline(m))
        lines.append(f"{name[:56]:<56} {m['instances']:>5}   {figures}")
    return "\n".join(lines)


def progress_table(by_step: dict[int, dict]) -> str:
    """Per task, the headline figures (EM and ROUGE-L, or acc and acc_norm) at the first and last
    evaluated steps (a plain-text table)."""
    first, last = min(by_step), max(by_step)
    steps = [first] if first == last else [first, last]
    lines = [f"{'task':<50}" + "".join(f" {'@' + str(s):>21}" for s in steps)]
    for name in [*by_step[last]["per_task"], "overall"]:
        row = f"{name[:50]:<50}"
        for s in steps:
            m = by_step[s]["overall"] if name == "overall" else by_step[s]["per_task"].get(name)
            row += " " + (
                "  ".join(f"{label} {m[key]:>6.2f}" for label, key in headline(m)) if m else "-"
            ).rjust(21)
        lines.append(row)
    return "\n".join(lines)
