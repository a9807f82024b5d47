"""Evaluation as OPT-IML reports it: SNI metrics (metrics.py), evaluation data with every reference
(tasks.py), prompt formats (prompts.py), bucketed data-parallel greedy generation (generation.py),
log-likelihood scoring and rank classification (scoring.py), the end-to-end run with its output files
(runner.py), the paper's suites (suite.py: files; shots.py: demonstrations; suite_run.py: running one;
aggregate.py: levels, benchmarks, selection score; suite_report.py, paper_figures.py: report.md;
train/suite_hook.py runs eval.suite in fine-tuning) and the lm-evaluation-harness model
(harness.py). `python -m optiml_jax.evaluate`
is the CLI."""

from optiml_jax.eval.metrics import METRICS, InstanceScorer, aggregate, normalize_answer
from optiml_jax.eval.prompts import PROMPT_TEMPLATES, build_prompt
from optiml_jax.eval.runner import (
    EvalResult,
    EvalSettings,
    evaluate,
    evaluate_generation,
    rescore,
    write_results,
)
from optiml_jax.eval.suite import Suite, SuiteError, load_suite
from optiml_jax.eval.suite_run import SuiteSettings, run_suite
from optiml_jax.eval.tasks import EvalDataError, EvalInstance, EvalTask, load_eval_tasks

__all__ = [
    "METRICS",
    "InstanceScorer",
    "aggregate",
    "normalize_answer",
    "PROMPT_TEMPLATES",
    "build_prompt",
    "EvalResult",
    "EvalSettings",
    "evaluate",
    "evaluate_generation",
    "rescore",
    "write_results",
    "EvalDataError",
    "EvalInstance",
    "EvalTask",
    "load_eval_tasks",
    "Suite",
    "SuiteError",
    "SuiteSettings",
    "load_suite",
    "run_suite",
]
