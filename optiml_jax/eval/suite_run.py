"""Running a suite (suite.py): every entry once per shot setting and template, in one process.

    suite = load_suite("configs/eval/optiml_validation.yaml")
    result = run_suite(model, params, tokenizer, suite, "out/")   # predictions.jsonl, metrics.json, report.md

Why it is fast: the prompts of every entry, template and shot setting are built first and answered by
two calls of runner.evaluate (one generating, one ranking), so every entry shares the same bucketed
programs (compiled once per shape per process, however many entries use them) and the batches are
full across entries. metrics.json's `compilations` counts the distinct programs run. `lm_eval:TASK`
entries go through lm-evaluation-harness with our model (suite_lm_eval.py).

An SNI task's templates are the SNI prompt templates (prompts.PROMPT_TEMPLATES; "all" = the training
template, "optiml", as the paper's one prompt per SNI task); a record file's are the values of its
records' `template` (a built bench's dev/ and test/), "all" = every one found.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import logging
import time
from typing import Optional

from optiml_jax.data.formats import resolve_format
from optiml_jax.data.formats.base import Format, merge_eval_tasks, records_eval_tasks
from optiml_jax.data.sources import Fields
from optiml_jax.eval.aggregate import aggregate_suite
from optiml_jax.eval.metrics import UNCATEGORIZED, mean_scores
from optiml_jax.eval.prompts import DEFAULT_DELIMITER, PROMPT_TEMPLATES
from optiml_jax.eval.runner import EvalResult, EvalSettings, evaluate, write_results
from optiml_jax.eval.shots import draw_demonstrations, fit_prompt, instance_level_prompt, task_level_prompt
from optiml_jax.eval.suite import ALL_TEMPLATES, Suite, SuiteEntry, is_pattern
from optiml_jax.eval.suite_report import suite_report
from optiml_jax.eval.tasks import EvalDataError, EvalInstance, EvalTask, load_eval_tasks
from optiml_jax.tokenizer import PROMPT_ADD_BOS

log = logging.getLogger(__name__)
NO_TEMPLATE = "default"  # the template of records that name none
SNI_DEFAULT_TEMPLATE = "optiml"


@dataclasses.dataclass(frozen=True)
class SuiteSettings:
    """How a suite's answers are generated (the paper's: greedy to </s> or 256 new tokens)."""

    max_new_tokens: Optional[int] = None  # None: the suite's (256 unless it says otherwise)
    batch_size: int = 8
    delimiter: str = DEFAULT_DELIMITER  # the answer cue of SNI's optiml template
    add_bos: bool = PROMPT_ADD_BOS  # the project's prompt convention, as runner.EvalSettings
    stop: tuple[str, ...] = ()

    def for_mode(self, mode: str) -> EvalSettings:
        """runner.evaluate's settings for the entries answered by `mode` (generate or rank)."""
        shared = ("max_new_tokens", "batch_size", "stop", "add_bos")
        return EvalSettings(mode=mode, **{name: getattr(self, name) for name in shared})


@dataclasses.dataclass(frozen=True)
class _Variant:
    """One template of an entry: its evaluated instances, and the pool its demonstrations come from."""

    template: str
    task: EvalTask  # the evaluated instances (the first max_instances)
    pool: tuple[tuple[str, str, object], ...]  # (input, answer, id of the instance it is, or None)


def _where(entry: SuiteEntry) -> str:
    return f"suite entry {entry.task!r} ({entry.data})"


def _matching(tasks: list[EvalTask], entry: SuiteEntry, path) -> list[EvalTask]:
    """The entry's task of `tasks` (a file of one task may name it otherwise), or with a pattern
    (`task: "*"`) every task whose name matches and whose category is the entry's."""
    if is_pattern(entry.task):
        found = [
            task
            for task in tasks
            if fnmatch.fnmatchcase(task.name, entry.task) and task.category in (entry.category, UNCATEGORIZED)
        ]
    else:
        found = [task for task in tasks if task.name == entry.task] or (tasks if len(tasks) == 1 else [])
    if not found:
        names = ", ".join(t.name for t in tasks[:8])
        raise EvalDataError(
            f"{_where(entry)}: {path} has no task {entry.task!r} of category {entry.category!r} "
            f"(it has {names}{', ...' if len(tasks) > 8 else ''})"
        )
    return found


def _records_by_template(path) -> Optional[dict[str, list[EvalTask]]]:
    """template -> the tasks (every instance) of a record file or directory; None for formats that give
    no records (SNI task files, hub datasets)."""
    fmt = resolve_format(path)
    if type(fmt).eval_records is Format.eval_records:  # the format reads whole tasks, not records
        return None
    by_template: dict[str, list] = {}
    for file in fmt.files(path):
        for ident, at, record in fmt.eval_records(file, Fields()):
            template = record.get("template")
            by_template.setdefault(str(template) if template is not None else NO_TEMPLATE, []).append(
                (ident, at, record)
            )
    return {
        template: merge_eval_tasks([records_eval_tasks(path, records, 0, Fields())], 0)
        for template, records in by_template.items()
    }


def _sni_variants(entry: SuiteEntry, max_instances: int) -> dict[str, list[_Variant]]:
    """SNI task files: their templates are our prompt templates; demonstrations their positive
    examples, then the instances past the evaluated ones."""
    templates = (SNI_DEFAULT_TEMPLATE,) if entry.templates == ALL_TEMPLATES else entry.templates
    unknown = [t for t in templates if t not in PROMPT_TEMPLATES]
    if unknown:
        raise EvalDataError(
            f"{_where(entry)}: templates {unknown} are not SNI prompt templates "
            f"({', '.join(PROMPT_TEMPLATES)})"
        )
    variants = {}
    for task in _matching(load_eval_tasks(entry.data, max_instances=0), entry, entry.data):
        rest = task.instances[max_instances or len(task.instances) :]
        pool = [(i, o, None) for i, o in task.positive_examples]
        pool += [(inst.input, inst.references[0], inst.id) for inst in rest]
        evaluated = dataclasses.replace(task, instances=task.instances[: max_instances or None])
        variants[task.name] = [_Variant(t, evaluated, tuple(pool)) for t in templates]
    return variants


def _load_variants(entry: SuiteEntry, max_instances: int) -> dict[str, list[_Variant]]:
    """task name -> its variants (one per template): one task, or those an entry's pattern matches."""
    found = _records_by_template(entry.data)
    if found is None:
        return _sni_variants(entry, max_instances)
    templates = tuple(found) if entry.templates == ALL_TEMPLATES else entry.templates
    missing = [t for t in templates if t not in found]
    if missing:
        raise EvalDataError(f"{_where(entry)}: no records of template(s) {missing} (it has {sorted(found)})")
    demonstrations = _records_by_template(entry.demonstrations) if entry.demonstrations else None
    variants: dict[str, list[_Variant]] = {}
    for template in templates:
        other = {t.name: t for t in (demonstrations or {}).get(template, [])}
        for task in _matching(found[template], entry, entry.data):
            if demonstrations is None:
                pool = tuple((inst.input, inst.references[0], inst.id) for inst in task.instances)
            else:  # demonstrations from other data are never the evaluated instance
                source = other.get(task.name)
                pool = (
                    tuple((inst.input, inst.references[0], None) for inst in source.instances)
                    if source
                    else ()
                )
            evaluated = dataclasses.replace(task, instances=task.instances[: max_instances or None])
            variants.setdefault(task.name, []).append(_Variant(template, evaluated, pool))
    return variants


def _demonstrations(variant: _Variant, instance, position: int, shots: int, seed, task_name: str):
    """The k demonstrations of one instance, never the instance itself. Task-level (SNI): one set per
    task, every positive example first when k exceeds them; instance-level: drawn per example."""
    pool = [(i, o) for i, o, ident in variant.pool if ident != instance.id]
    if not variant.task.is_sni:
        return draw_demonstrations(pool, shots, seed, task_name, variant.template, position)
    positives = len(variant.task.positive_examples)
    if shots <= positives:
        return draw_demonstrations(pool[:positives], shots, seed, task_name, variant.template)
    return pool[:positives] + draw_demonstrations(pool[positives:], shots - positives, seed, task_name)


def _entry_task(entry, index, variant, shots, suite, tokenizer, room_of, settings):
    """(the evaluation task of ready prompts for one entry, template and shot setting, {instance id:
    demonstrations kept}, demonstrations dropped to fit the context)."""
    task, dropped_total, instances, kept = variant.task, 0, [], {}

    def count_tokens(text):
        return len(tokenizer.encode(text, add_bos=settings.add_bos))

    for position, instance in enumerate(task.instances):
        demos = _demonstrations(variant, instance, position, shots, suite.seed, entry.task)
        if task.is_sni:  # task-level: after the definition

            def render(ds, instance=instance):
                return task_level_prompt(
                    variant.template, task.definition, instance.input, ds, settings.delimiter
                )
        else:  # instance-level: before the example

            def render(ds, instance=instance):
                return instance_level_prompt(instance.input, ds)

        options = (instance.options or task.labels or ()) if entry.mode == "rank" else ()
        if entry.mode == "rank" and not options:
            raise EvalDataError(f"{_where(entry)}: mode rank, but {instance.source} has no answer options")
        prompt, dropped = (
            fit_prompt(render, demos, count_tokens, room_of(options)) if demos else (render(()), 0)
        )
        dropped_total += dropped
        kept[instance.id] = len(demos) - dropped
        instances.append(
            EvalInstance(instance.id, prompt, instance.references, instance.source, tuple(options))
        )
    name = f"{index}/{variant.template}/{shots}"
    evaluated = EvalTask(name=name, category=entry.category, path=task.path, instances=tuple(instances))
    return evaluated, kept, dropped_total


def run_suite(
    model,
    params,
    tokenizer,
    suite: Suite,
    output_dir=None,
    settings: SuiteSettings = SuiteSettings(),
    *,
    mesh=None,
    rules=None,
    overwrite: bool = False,
    title: Optional[str] = None,
) -> EvalResult:
    """Every entry of `suite` at each of its shot settings and templates; the records and metrics
    (aggregate.py's figures, plus `overall`, `compilations`, truncation counts), written to
    `output_dir` when given (predictions.jsonl, metrics.json, report.md)."""
    start = time.perf_counter()
    if settings.max_new_tokens is None:
        settings = dataclasses.replace(settings, max_new_tokens=suite.max_new_tokens)
    positions = model.config.max_position_embeddings
    option_tokens = {}

    def room_of(options):
        if not options:
            return positions - settings.max_new_tokens
        for option in options:
            if option not in option_tokens:
                option_tokens[option] = len(tokenizer.encode(" " + option, add_bos=False))
        return positions - max(option_tokens[o] for o in options)

    tasks, labels, dropped = {"generate": [], "rank": []}, {}, 0
    seen: dict[str, str] = {}
    for index, entry in enumerate(suite.entries):
        if entry.lm_eval_task:
            continue
        for task_name, variants in _load_variants(entry, suite.max_instances).items():
            task_entry = dataclasses.replace(entry, task=task_name) if is_pattern(entry.task) else entry
            if seen.setdefault(task_entry.task, entry.task) != entry.task:
                raise EvalDataError(
                    f"{_where(entry)}: task {task_entry.task!r} is also entry {seen[task_entry.task]!r}"
                )
            for variant, shots in itertools.product(variants, entry.shots):
                task, kept, n = _entry_task(
                    task_entry, f"{index}/{task_name}", variant, shots, suite, tokenizer, room_of, settings
                )
                tasks[entry.mode].append(task)
                labels[task.name] = dict(entry=task_entry, template=variant.template, shots=shots, kept=kept)
                dropped += n
    records, stats = [], {"generation": {}, "ranking": {}}
    for mode, mode_tasks in tasks.items():
        if not mode_tasks:
            continue
        result = evaluate(
            model, params, tokenizer, mode_tasks, settings.for_mode(mode), mesh=mesh, rules=rules
        )
        key = "generation" if mode == "generate" else "ranking"
        stats[key] = result.metrics["settings"].get(key, {})
        for record in result.records:
            label = labels[record["task"]]
            record = _suite_record(record, label["entry"], label["template"], label["shots"])
            records.append({**record, "demonstrations": label["kept"][record["id"]]})
    lm_eval_entries = [entry for entry in suite.entries if entry.lm_eval_task]
    if lm_eval_entries:
        from optiml_jax.eval.suite_lm_eval import lm_eval_records  # optional dependency: lm_eval

        records += lm_eval_records(model, params, tokenizer, suite, lm_eval_entries, settings, mesh=mesh)
    metrics = {**aggregate_suite(records), "overall": mean_scores(records)}
    metrics["run"] = {
        "suite": suite.path,
        "entries": len(suite.entries),
        "compilations": sum(s.get("programs", 0) for s in stats.values()),
        "truncated_prompts": stats["generation"].get("truncated", 0),
        "dropped_demonstrations": dropped,
        "seconds": round(time.perf_counter() - start, 3),
        **stats,
    }
    result = EvalResult(records=records, metrics=metrics)
    if output_dir is not None:
        write_results(
            output_dir,
            result,
            overwrite=overwrite,
            report=suite_report(metrics, model.config, title or suite.name),
        )
    return result


def _suite_record(record: dict, entry: SuiteEntry, template: str, shots: int) -> dict:
    return {
        **record,
        "task": entry.task,
        "template": template,
        "shots": shots,
        "level": entry.level,
        "category": entry.category,
        "benchmark": entry.benchmark,
        "metric": entry.metric,
    }
