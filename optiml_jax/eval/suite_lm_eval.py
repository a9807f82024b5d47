"""A suite's `lm_eval:TASK` entries: lm-evaluation-harness's own task (its prompt, its demonstrations) run
with our model (optiml_jax/eval/harness.py, wrapped around the model in memory) at each of the entry's shot
counts, each sample a record of predictions.jsonl. Accuracy is lm_eval's `acc`, exact match its
`exact_match`, in percent; a group task (mmlu) gives the samples of all its subtasks. Local task YAMLs
come from the suite's `lm_eval_include` directory.

Importing this module needs lm_eval (pip install -e '.[eval]'); suite_run imports it only for a suite
with lm_eval entries."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Sequence

import lm_eval
from lm_eval.tasks import TaskManager

from optiml_jax.eval.harness import OptimlJaxLM
from optiml_jax.eval.suite import Suite, SuiteEntry
from optiml_jax.sharding import MeshConfig, make_mesh

LM_EVAL_TEMPLATE = "lm_eval"  # the template of lm_eval records: the task's own prompt
SAMPLE_METRICS = {"accuracy": ("acc", "acc"), "exact_match": ("exact_match", "exact_match")}


@contextmanager
def _inside(directory):
    """lm_eval's local YAMLs name their data files relative to the working directory."""
    if directory is None:
        yield
        return
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(cwd)


def task_manager(include, tasks: Sequence[str]) -> TaskManager:
    """lm_eval's task index: the suite's local YAMLs alone when they define every task (indexing
    lm_eval's own thousands of YAMLs takes seconds), else lm_eval's tasks as well."""
    if include:
        local = TaskManager(include_path=include, include_defaults=False)
        if all(task in local.all_tasks for task in tasks):
            return local
    return TaskManager(include_path=include) if include else TaskManager()


def run_lm_eval(lm, task: str, shots: int, manager: TaskManager, include, seed: int) -> dict:
    """lm_eval's results with per-sample logs of one task at `shots` demonstrations."""
    with _inside(include):
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=[task],
            num_fewshot=shots,
            task_manager=manager,
            log_samples=True,
            random_seed=seed,
            fewshot_random_seed=seed,
        )


def lm_eval_records(
    model, params, tokenizer, suite: Suite, entries: Sequence[SuiteEntry], settings, *, mesh=None
) -> list[dict]:
    lm = OptimlJaxLM.from_model(
        model, params, tokenizer, mesh=mesh or make_mesh(MeshConfig()), batch_size=settings.batch_size
    )
    manager = task_manager(suite.lm_eval_include, [entry.lm_eval_task for entry in entries])
    records = []
    for entry in entries:
        sample_key, record_key = SAMPLE_METRICS[entry.metric]
        for shots in entry.shots:
            results = run_lm_eval(lm, entry.lm_eval_task, shots, manager, suite.lm_eval_include, suite.seed)
            for subtask, samples in results["samples"].items():
                for sample in samples:
                    records.append(
                        {
                            "task": entry.task,
                            "id": f"{subtask}:{sample['doc_id']}",
                            "template": LM_EVAL_TEMPLATE,
                            "shots": shots,
                            "level": entry.level,
                            "category": entry.category,
                            "benchmark": entry.benchmark,
                            "metric": entry.metric,
                            "references": [str(sample.get("target"))],
                            "prediction": str(sample.get("filtered_resps")),
                            record_key: 100.0 * float(sample[sample_key]),
                        }
                    )
    return records
