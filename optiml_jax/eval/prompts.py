"""Evaluation prompts for SNI tasks: ours (the training template with one fixed answer delimiter) or
Tk-Instruct's, zero-shot or with the task's first k positive examples.

`optiml` is `data/templates.format_sni`, the layout the model was fine-tuned on, with `delimiter`
(default "\\nOutput:") in place of the delimiter training samples per example:

    Instructions: {definition}

    Input: {example input}\\nOutput: {example output}        (k-shot only, k of them)

    Input: {input}\\nOutput:

`tk_instruct` is the "definition + positive examples" encoding of Tk-Instruct's evaluation
(yizhongw/Tk-Instruct `src/ni_collator.py`), where a field that does not end in punctuation gets a
period, and example blocks start with a space:

    Definition: {definition}.\\n\\n
     Positive Example 1 -\\nInput: {input}.\\n Output: {output}.\\n\\n
    Now complete the following example -\\nInput: {input}.\\nOutput:

Two deliberate differences from Tk-Instruct, both for a decoder-only model: its prompt ends in
"Output: " and ours without the space (a GPT-2 BPE attaches a word's leading space to the word, so a
trailing space in the prompt is a token the model never saw there), and a prompt too long for the
context is cut from the left (generation.py) instead of from the right, which would cut away the
instance. The definition is the task's whole `Definition` (SNI v2 definitions are one string).
"""

from __future__ import annotations

import string

from optiml_jax.data.templates import format_sni
from optiml_jax.eval.tasks import EvalInstance, EvalTask

PROMPT_TEMPLATES = ("optiml", "tk_instruct")
DEFAULT_DELIMITER = "\nOutput:"


def _with_period(text: str) -> str:
    return text if text and text[-1] in string.punctuation else text + "."


def tk_instruct_prompt(definition: str, input: str, exemplars=()) -> str:
    parts = [_with_period(f"Definition: {definition.strip()}") + "\n\n"]
    for k, (ex_input, ex_output) in enumerate(exemplars, start=1):
        parts.append(
            f" Positive Example {k} -\n"
            + _with_period(f"Input: {ex_input.strip()}")
            + "\n"
            + _with_period(f" Output: {ex_output.strip()}")
            + "\n\n"
        )
    parts.append(
        "Now complete the following example -\n" + _with_period(f"Input: {input.strip()}") + "\nOutput:"
    )
    return "".join(parts)


def build_prompt(
    task: EvalTask,
    instance: EvalInstance,
    *,
    template: str = "optiml",
    shots: int = 0,
    delimiter: str = DEFAULT_DELIMITER,
) -> str:
    """The prompt of one instance. JSONL instances are their own prompt (`src`, trailing spaces removed
    as training does); SNI instances get `template` with the task's first `shots` positive examples."""
    if template not in PROMPT_TEMPLATES:
        raise ValueError(f"template must be one of {', '.join(PROMPT_TEMPLATES)}, got {template!r}")
    if not task.is_sni:
        return instance.input.rstrip(" ")
    exemplars = task.positive_examples[:shots]
    if template == "tk_instruct":
        return tk_instruct_prompt(task.definition, instance.input, exemplars)
    return format_sni(task.definition, instance.input, "", exemplars, delimiter=delimiter)[0]
