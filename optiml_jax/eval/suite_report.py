"""report.md of a suite: the paper's Table 16 shape (levels, then their categories, cells "0-shot / 5-shot"),
then per benchmark, per task, the paper's figures beside ours when the model has a released size
(paper_figures.py), and the run's counts."""

from __future__ import annotations

import json
from typing import Mapping

from optiml_jax.eval.paper_figures import paper_figures, released_size
from optiml_jax.eval.suite import LEVELS

LEVEL_TITLES = {
    "fully_held_out": "fully held-out",
    "partially_supervised": "partially supervised",
    "fully_supervised": "fully supervised",
}


def _cell(by_shot: Mapping[str, float], shots: list[str]) -> str:
    return " / ".join(f"{by_shot[k]:.1f}" if k in by_shot else "-" for k in shots)


def _header(first: list[str], shots: list[str]) -> list[str]:
    label = " / ".join(f"{k}-shot" for k in shots)
    return ["| " + " | ".join([*first, label]) + " |", "|" + "---|" * len(first) + "---:|"]


def suite_report(metrics: dict, config=None, title: str = "Suite") -> str:
    shots = sorted({k for by_shot in metrics["per_task"].values() for k in by_shot}, key=int)
    selection = metrics.get("selection_score")
    lines = [f"# {title}", ""]
    lines.append(
        f"Selection score: {selection:.2f} (the mean over level/category groups of their 0-shot and 5-shot "
        "figures, summarisation 0-shot only)."
        if selection is not None
        else "Selection score: - (no 0-shot or 5-shot figures)."
    )
    lines += ["", "## Per level and category (as the paper's Table 16)", "", *_header(["", ""], shots)]
    nested = metrics["per_level_category"]
    for level in [lv for lv in LEVELS if lv in nested] + [lv for lv in nested if lv not in LEVELS]:
        lines.append(
            f"| **{LEVEL_TITLES.get(level, level)}** | | {_cell(metrics['per_level'][level], shots)} |"
        )
        lines += [
            f"| | {category} | {_cell(by_shot, shots)} |" for category, by_shot in nested[level].items()
        ]
    lines.append(f"| **all categories** | | {_cell(metrics['per_shot'], shots)} |")
    lines += ["", "## Per benchmark", "", *_header(["benchmark"], shots)]
    lines += [f"| {name} | {_cell(by_shot, shots)} |" for name, by_shot in metrics["per_benchmark"].items()]
    lines += ["", "## Per task (mean over templates)", ""]
    lines += _header(["task", "benchmark", "level", "category", "metric", "templates"], shots)
    for task, by_shot in metrics["per_task"].items():
        info = metrics["tasks"][task]
        templates = max(len(t) for t in metrics["per_template"][task].values())
        lines.append(
            f"| {task} | {info['benchmark']} | {info['level']} | {info['category']} | {info['metric']} "
            f"| {templates} | {_cell(by_shot, shots)} |"
        )
    figures = paper_figures(config)
    shown = {
        name: models
        for name, models in figures.items()
        if name in metrics["per_benchmark"] or name in metrics["per_task"]
    }
    if shown:
        lines += ["", f"## Beside the paper ({released_size(config)} models)", ""]
        lines += ["| benchmark / task | model | shots: figure |", "|---|---|---|"]
        for name, models in shown.items():
            ours = metrics["per_benchmark"].get(name) or metrics["per_task"].get(name)
            lines.append(
                f"| {name} | this model | " + ", ".join(f"{k}: {v:.1f}" for k, v in ours.items()) + " |"
            )
            for model, values in models.items():
                lines.append(
                    f"| {name} | {model} | " + ", ".join(f"{k}: {v:.1f}" for k, v in values.items()) + " |"
                )
    lines += ["", "## Run", "", "```json", json.dumps(metrics.get("run", {}), indent=2), "```"]
    return "\n".join(lines) + "\n"


def suite_summary(metrics: dict) -> str:
    """The selection score and the per-level figures, for the terminal."""
    shots = sorted(metrics["per_shot"], key=int)
    selection = metrics.get("selection_score")
    lines = [f"{'level':<24} " + " / ".join(f"{k}-shot" for k in shots)]
    lines += [f"{level:<24} {_cell(by_shot, shots)}" for level, by_shot in metrics["per_level"].items()]
    lines.append(f"{'all categories':<24} {_cell(metrics['per_shot'], shots)}")
    lines.append(f"selection score: {'-' if selection is None else f'{selection:.2f}'}")
    lines.append(f"compilations: {metrics['run']['compilations']}")
    return "\n".join(lines)
