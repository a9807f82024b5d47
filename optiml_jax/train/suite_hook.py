"""eval.suite in fine-tuning: the suite at every evaluation step, its selection score and per-level figures
logged (TensorBoard and metrics.jsonl), and `best/`, the model of the highest selection score so far, as
the paper picks its checkpoint (§4.1). best/ is a model directory like final/ (so `optiml-convert
--to-hf --input RUN/best` exports it), written atomically; its marker (optiml_jax.json) records the
step, score and suite, so a resumed run keeps comparing against it (a resumed run with another eval.suite
replaces it: different suites' scores do not compare)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import jax

from optiml_jax.checkpoints.model_format import is_converted_checkpoint, read_marker, save_model
from optiml_jax.eval.suite import load_suite
from optiml_jax.eval.suite_run import SuiteSettings, run_suite
from optiml_jax.paths import resolve_path

log = logging.getLogger(__name__)
BEST_DIR = "best"


def suite_scalars(metrics: dict, prefix: str = "suite") -> dict[str, float]:
    """The selection score, and each level's and the whole suite's figure per shot setting."""
    out = {
        f"{prefix}/{level}/{shots}shot": v
        for level, by in metrics["per_level"].items()
        for shots, v in by.items()
    }
    out.update({f"{prefix}/all/{shots}shot": v for shots, v in metrics["per_shot"].items()})
    if metrics["selection_score"] is not None:
        out[f"{prefix}/selection_score"] = metrics["selection_score"]
    out[f"{prefix}/compilations"] = metrics["run"]["compilations"]
    return out


def best_score(workdir: Path, suite_path: str) -> Optional[float]:
    """The selection score of the run's best/ model when it was chosen on the suite at `suite_path`; None
    when the run has none yet, or when best/ was chosen on another suite (a resumed run whose eval.suite
    changed: the scores of different suites do not compare, so the next selection score replaces it)."""
    best = Path(workdir) / BEST_DIR
    if not is_converted_checkpoint(best):
        return None
    marker = read_marker(best)
    chosen_on = marker.get("suite")
    # resolved on both sides: the marker's may be relative (written before markers held absolute paths),
    # and one side may name the file through a link
    if chosen_on is None or os.path.realpath(chosen_on) != os.path.realpath(suite_path):
        log.warning(
            "%s/ was chosen on the suite %s, not on %s: the next selection score replaces it",
            best,
            chosen_on,
            suite_path,
        )
        return None
    return marker.get("selection_score")


def evaluate_suite_at_step(
    model, params, tokenizer, suite_path, workdir: Path, step: int, writer, opt_config, settings, mesh, rules
) -> dict:
    """The suite at `step`: workdir/eval/suite/<step>/ (predictions.jsonl, metrics.json, report.md),
    scalars to `writer`, and best/ replaced when the selection score beats it (every process calls
    this: the model is written collectively)."""
    suite = load_suite(suite_path)
    output = Path(workdir) / "eval" / "suite" / str(step) if jax.process_index() == 0 else None
    title = f"{suite.name} at step {step}"
    metrics = run_suite(
        model, params, tokenizer, suite, output, settings, mesh=mesh, rules=rules, overwrite=True, title=title
    ).metrics
    writer.write(step, suite_scalars(metrics))
    score, previous = metrics["selection_score"], best_score(workdir, suite.path)
    if score is not None and (previous is None or score > previous):
        # absolute, so a run resumed from another directory still recognises its suite
        marker = {"step": step, "selection_score": score, "suite": os.path.abspath(suite.path)}
        save_model(
            Path(workdir) / BEST_DIR, opt_config, params, tokenizer, overwrite=True, extra_marker=marker
        )
        log.info("step %d: selection score %.2f beats %s: wrote %s/", step, score, previous, BEST_DIR)
    return metrics


def check_suite(cfg) -> None:
    """A run config's eval.suite, read and checked (SuiteError naming every bad entry) when it has one."""
    if cfg.eval.suite:
        load_suite(resolve_path(cfg.eval.suite))


def suite_settings(cfg) -> SuiteSettings:
    """How a run config's eval.suite is answered: its prompts encoded as its training data is
    (data.add_bos), as eval.tasks' are."""
    return SuiteSettings(batch_size=cfg.eval_batch_size, add_bos=cfg.data.add_bos)


def suite_hook(run, step: int) -> dict:
    """eval.suite at an evaluation step: registered by run_hooks.default_hooks (`run`: context.Run)."""
    eval_cfg = run.cfg.eval
    settings = suite_settings(run.cfg)
    metrics = evaluate_suite_at_step(
        run.model,
        run.state.params,
        run.tokenizer,
        resolve_path(eval_cfg.suite),
        run.workdir,
        step,
        run.writer,
        run.opt_config,
        settings,
        run.mesh,
        run.rules,
    )
    selection = metrics["selection_score"]
    run.report(f"step {step}: suite selection score {'-' if selection is None else f'{selection:.2f}'}")
    return metrics
