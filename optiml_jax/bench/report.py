"""report.md: our counts per collection and per split beside the paper's Table 1 (spec §2), the tasks
removed and why, and the overlapping pairs."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

# Table 1 of the paper (v1): (clusters, tasks, examples, prompts per task).
PAPER_TABLE1 = {
    "sni": ("Super-NaturalInstructions v2.6", 76, 1613, "12.4M", 1.0),
    "promptsource": ("PromptSource", 51, 280, "12.8M", 5.7),
    "crossfit": ("CrossFit", 32, 159, "7.1M", 1.0),
    "flan": ("FLAN", 12, 70, "4.4M", 8.5),
    "exmix": ("ExMix", 10, 14, "0.5M", 1.0),
    "t5": ("T5", 9, "36 (7 kept)", "1.9M", 1.0),
    "unifiedskg": ("UnifiedSKG", 7, 21, "0.8M", 1.0),
    "reasoning": ("Reasoning (chain of thought)", 1, 14, "0.4M", 1.0),
    "train": ("OPT-IML Bench train", 93, 1545, "17.9M", 1.7),
    "dev": ("dev", "7-9", 35, "145K", 2.9),
    "test": ("test", 10, 87, "321K", 4.6),
}


def _row(name, clusters, tasks, examples, templates, paper) -> str:
    _, p_clusters, p_tasks, p_examples, p_prompts = paper
    prompts = f"{templates / tasks:.1f}" if tasks else "-"
    return (
        f"| {name} | {clusters} ({p_clusters}) | {tasks} ({p_tasks}) | {examples:,} ({p_examples}) "
        f"| {prompts} ({p_prompts}) |"
    )


def write_report(path: Path, manifest: dict, overlap: list) -> None:
    tasks = manifest["tasks"]
    lines = [
        "# OPT-IML Bench build",
        "",
        "Ours, with the paper's Table 1 figure in brackets. Examples per collection count every kept",
        "example (train and evaluation); prompts / task is the number of distinct templates per task.",
        "",
        "| collection | clusters | tasks | examples | prompts / task |",
        "|---|---|---|---|---|",
    ]
    groups = defaultdict(list)
    for name, info in tasks.items():
        if info["split"] != "removed":
            groups[info["benchmark"]].append(name)
            for split, count in info["examples_by_split"].items():
                if count:
                    groups[split].append(name)
    for key in PAPER_TABLE1:
        names = groups.get(key, [])
        split = key if key in ("train", "dev", "test") else None
        examples = sum(tasks[n]["examples_by_split"][split] if split else tasks[n]["examples"] for n in names)
        templates = sum(max(tasks[n].get("templates", 1), 1) for n in names)
        clusters = len({tasks[n]["category"] for n in names})
        lines.append(_row(PAPER_TABLE1[key][0], clusters, len(names), examples, templates, PAPER_TABLE1[key]))
    removed = {n: i["removed_reason"] for n, i in tasks.items() if i["split"] == "removed"}
    lines += ["", f"## Removed tasks ({len(removed)})", ""]
    lines += [f"- `{n}`: {reason}" for n, reason in sorted(removed.items())] or ["none"]
    threshold = manifest["settings"]["overlap_threshold"]
    lines += ["", f"## 13-gram overlap over {threshold:.0%} ({len(overlap)} pairs)", ""]
    if overlap:
        lines += ["| train task | evaluation task | fraction |", "|---|---|---|"]
        lines += [f"| {p['train_task']} | {p['eval_task']} | {p['fraction']:.3f} |" for p in overlap]
    else:
        lines.append("none")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
