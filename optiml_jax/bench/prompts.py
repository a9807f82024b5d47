"""The bipartite prompt of each collection (spec §5): instructions with the input, then the output;
when the instructions do not end with ":", one of the paper's eight delimiters drawn per example (seeded:
data/templates.py's sample_delimiter, as fine-tuning's SNI prompts draw it).

    task-level (SNI, reasoning)   "Instructions: {definition}\\n\\nInput: {input}{delimiter}"
    keywords (CrossFit, ExMix,    "{registry instruction}\\n\\n{input}{delimiter}"
      T5, UnifiedSKG)
    instance-level (FLAN, P3)     "{the template's prompt}{delimiter}"
"""

from __future__ import annotations

from optiml_jax.bench.consolidate import draw_template
from optiml_jax.bench.tasks import INSTRUCTION_TYPES, Instance, Task
from optiml_jax.data.templates import add_delimiter, format_sni, sample_delimiter


def prompt(task: Task, input_text: str, seed: int, index: int) -> str:
    kind = INSTRUCTION_TYPES[task.benchmark]
    if kind == "task":
        return format_sni(
            task.instruction or task.definition or "", input_text, "", seed=seed, task=task.name, index=index
        )[0]
    delimiter = sample_delimiter(seed, task.name, index)
    if kind == "keywords":
        return add_delimiter(f"{(task.instruction or '').strip()}\n\n{input_text.strip()}", delimiter)
    return add_delimiter(input_text, delimiter)


def task_rows(task: Task, instances: list[tuple[int, Instance]], seed: int, level: str) -> list[dict]:
    """The output rows of a task's (index, instance) pairs: one prompt each, all references kept."""
    rows = []
    for index, alternatives in instances:
        example = draw_template(alternatives, seed, task.name, index)
        rows.append(
            {
                "task": task.name,
                "benchmark": task.benchmark,
                "category": task.category,
                "level": level,
                "src": prompt(task, example.input, seed, index),
                "tgt": example.references[0].strip(),
                "references": [r.strip() for r in example.references],
                "options": list(example.options),
                "template": example.template,
            }
        )
    return rows
