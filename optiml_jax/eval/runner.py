"""Generation evaluation end to end: tasks -> prompts -> greedy completions -> official scores -> files.

    tasks = load_eval_tasks("natural-instructions/tasks", "natural-instructions/splits/default/test_tasks.txt")
    result = evaluate_generation(model, params, tokenizer, tasks, EvalSettings(shots=2))
    write_results("out/", result)        # predictions.jsonl, metrics.json, report.md

The fine-tuning loop and `python -m optiml_jax.evaluate` both call these; `rescore` scores an existing
predictions file with no model, so other systems' outputs are scored by the same code.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

from optiml_jax.eval.metrics import METRICS, UNCATEGORIZED, InstanceScorer, aggregate
from optiml_jax.eval.prompts import DEFAULT_DELIMITER, PROMPT_TEMPLATES, build_prompt
from optiml_jax.eval.tasks import EvalDataError, EvalTask, jsonl_objects

PREDICTIONS_FILE, METRICS_FILE, REPORT_FILE = "predictions.jsonl", "metrics.json", "report.md"


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
    add_bos: bool = False  # prompts start without </s>, as the fine-tuning data does (data/packing.py)

    def __post_init__(self):
        if self.template not in PROMPT_TEMPLATES:
            raise ValueError(f"template must be one of {', '.join(PROMPT_TEMPLATES)}, got {self.template!r}")
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


def prompts_for(tasks: Sequence[EvalTask], settings: EvalSettings) -> list[tuple[EvalTask, object, str]]:
    """(task, instance, prompt) for every instance, in task order."""
    if settings.shots and not any(task.is_sni for task in tasks):
        raise EvalDataError("shots > 0 takes the tasks' positive examples, which only SNI task files have")
    return [(task, instance, build_prompt(task, instance, template=settings.template, shots=settings.shots,
                                          delimiter=settings.delimiter))
            for task in tasks for instance in task.instances]


def score_records(records: Iterable[dict], scorer: Optional[InstanceScorer] = None) -> list[dict]:
    """Adds each metric (percent) to records holding "prediction" and "references"."""
    scorer = scorer or InstanceScorer()
    return [{**record, **scorer(record["prediction"], record["references"])} for record in records]


def evaluate_generation(model, params, tokenizer, tasks: Sequence[EvalTask], settings: EvalSettings = EvalSettings(),
                        *, mesh=None, rules=None, progress: bool = False) -> EvalResult:
    """Greedy answers to every instance of `tasks`, scored as the official SNI scorer does."""
    from optiml_jax.eval.generation import generate_completions
    from optiml_jax.sharding import DEFAULT_RULES

    items = prompts_for(tasks, settings)
    prompt_ids = tokenizer.encode_batch([prompt for _, _, prompt in items], add_bos=settings.add_bos)
    texts, truncated, stats = generate_completions(
        model, params, tokenizer, prompt_ids, max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
        stop=settings.stop, mesh=mesh, rules=rules or DEFAULT_RULES, progress=progress)
    records = [{"task": task.name, "id": instance.id, "category": task.category, "prompt": prompt,
                "prediction": text, "references": list(instance.references), "truncated": cut}
               for (task, instance, prompt), text, cut in zip(items, texts, truncated)]
    records = score_records(records)
    metrics = aggregate(records)
    metrics["settings"] = {**dataclasses.asdict(settings), "stop": list(settings.stop),
                           "tasks": len(tasks), "generation": stats.as_dict()}
    return EvalResult(records=records, metrics=metrics)


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
    records = [{k: v for k, v in r.items() if k not in METRICS} for r in read_predictions(path)]
    records = score_records(records)
    metrics = aggregate(records)
    metrics["settings"] = {"predictions": str(path)}
    return EvalResult(records=records, metrics=metrics)


# ---------------------------------------------------------------------- files
def report_markdown(metrics: dict, title: str = "Evaluation") -> str:
    """A per-category and per-task table a person reads (values in percent)."""
    def row(name, m, extra=""):
        return (f"| {name} |{extra} {m['instances']} | {m['exact_match']:.2f} | {m['rouge1']:.2f} | "
                f"{m['rougeL']:.2f} |")

    overall = metrics["overall"]
    lines = [f"# {title}", "",
             f"{overall['instances']} instances: exact match {overall['exact_match']:.2f}, "
             f"ROUGE-1 {overall['rouge1']:.2f}, ROUGE-L {overall['rougeL']:.2f} (percent, micro-averaged).", "",
             "## Per category", "", "| category | primary metric | instances | exact match | ROUGE-1 | ROUGE-L |",
             "|---|---|---:|---:|---:|---:|"]
    lines += [row(name, m, f" {m['primary_metric']} |") for name, m in metrics["per_category"].items()]
    lines += ["", "## Per task", "", "| task | instances | exact match | ROUGE-1 | ROUGE-L |", "|---|---:|---:|---:|---:|"]
    lines += [row(name, m) for name, m in metrics["per_task"].items()]
    settings = metrics.get("settings")
    if settings:
        lines += ["", "## Settings", "", "```json", json.dumps(settings, indent=2, ensure_ascii=False), "```"]
    return "\n".join(lines) + "\n"


def write_results(directory: str | os.PathLike, result: EvalResult, *, overwrite: bool = False,
                  title: str = "Evaluation") -> Path:
    """predictions.jsonl, metrics.json and report.md, written into a temporary directory and renamed
    into place (from one process: other processes must not call this)."""
    from optiml_jax.checkpoint import atomic_output_dir

    with atomic_output_dir(directory, overwrite=overwrite, collective=False) as tmp:
        with open(tmp / PREDICTIONS_FILE, "w", encoding="utf-8") as f:
            for record in result.records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        (tmp / METRICS_FILE).write_text(json.dumps(result.metrics, indent=2, ensure_ascii=False) + "\n",
                                        encoding="utf-8")
        (tmp / REPORT_FILE).write_text(report_markdown(result.metrics, title), encoding="utf-8")
    return Path(directory)


# ---------------------------------------------------------------------- inside fine-tuning
def settings_from_config(tasks_cfg, batch_size: int) -> EvalSettings:
    """EvalSettings of a run config's `eval.tasks` section (batch_size when the section leaves it unset)."""
    return EvalSettings(template=tasks_cfg.template, shots=tasks_cfg.shots, delimiter=tasks_cfg.delimiter,
                        max_new_tokens=tasks_cfg.max_new_tokens, batch_size=tasks_cfg.batch_size or batch_size,
                        stop=tuple(tasks_cfg.stop))


def tasks_from_config(tasks_cfg, held_out=None, resolve=lambda path: path) -> list[EvalTask]:
    """The tasks of `eval.tasks`: its data path, or with data "holdout" the eval loader's held-out
    instances `held_out` (task name -> examples)."""
    from optiml_jax.eval.tasks import holdout_eval_tasks, load_eval_tasks

    if tasks_cfg.data == "holdout":
        if held_out is None:
            raise EvalDataError("eval.tasks.data=holdout but the run holds no instances out (data.eval_holdout)")
        return holdout_eval_tasks(held_out, tasks_cfg.max_instances)
    split = resolve(tasks_cfg.split) if tasks_cfg.split else None
    return load_eval_tasks(resolve(tasks_cfg.data), split, tasks_cfg.max_instances, tasks_cfg.format)


def metric_scalars(metrics: dict, prefix: str = "eval_tasks") -> dict[str, float]:
    """TensorBoard / metrics.jsonl scalars: every metric overall, exact match and ROUGE-L per task."""
    out = {f"{prefix}/{m}": metrics["overall"][m] for m in METRICS}
    for task, values in metrics["per_task"].items():
        out.update({f"{prefix}/{task}/exact_match": values["exact_match"], f"{prefix}/{task}/rougeL": values["rougeL"]})
    generation = metrics.get("settings", {}).get("generation", {})
    if generation:
        out[f"{prefix}/seconds"] = generation["seconds"]
        out[f"{prefix}/truncated_prompts"] = generation["truncated"]
    return out


def progress_table(by_step: dict[int, dict]) -> str:
    """Per-task exact match and ROUGE-L at the first and last evaluated steps (a plain-text table)."""
    first, last = min(by_step), max(by_step)
    steps = [first] if first == last else [first, last]
    header = f"{'task':<50}" + "".join(f" {'EM@' + str(s):>9} {'RL@' + str(s):>9}" for s in steps)
    lines = [header]
    names = list(by_step[last]["per_task"]) + ["overall"]
    for name in names:
        row = f"{name[:50]:<50}"
        for s in steps:
            m = by_step[s]["overall"] if name == "overall" else by_step[s]["per_task"].get(name)
            row += f" {m['exact_match']:>9.2f} {m['rougeL']:>9.2f}" if m else f" {'-':>9} {'-':>9}"
        lines.append(row)
    return "\n".join(lines)
