"""Prompt templates: an SNI task (definition, exemplars) + one instance -> (src, tgt).

OPT-IML casts every task into "instructions (+input)" -> "output" (opt_formats.md §5.3). For SNI we use
its task-level layout; zero-shot (the paper trains without demonstrations):

    Instructions: {definition}

    Input: {input}{delimiter}

and k-shot, with the first k positive examples between the instructions and the instance (where the
paper puts demonstrations for task-level instructions):

    Instructions: {definition}

    Input: {exemplar 1 input}{delimiter} {exemplar 1 output}

    Input: {exemplar 2 input}{delimiter} {exemplar 2 output}

    Input: {input}{delimiter}

In training the delimiter is one of the paper's eight answer delimiters, sampled uniformly per example
(evaluation passes one fixed delimiter instead, see optiml_jax/eval/prompts.py), and it is
only inserted where the text before it does not already end with ":" (e.g. an input that ends with
"Search result URL:" gets none). One delimiter is drawn per example and used for its exemplars too, so
a prompt is self-consistent. The packer joins src and tgt with a single space, so a prompt never ends
in whitespace here. Fields are stripped of surrounding whitespace (SNI inputs often end in " " or
"\\n").
"""

from __future__ import annotations

import random
from typing import Optional, Sequence

ANSWER_DELIMITERS = (
    "\nAnswer:",
    " Answer:",
    "\nA:",
    " A:",
    "\nOutput:",
    " Output:",
    "\nanswer:",
    "\noutput:",
)
TEMPLATES = ("zero_shot", "few_shot")


def sample_delimiter(seed: int, task: str, index: int) -> str:
    """The delimiter for example `index` of `task`: uniform, and a pure function of its arguments.

    `random.Random` seeded with a string hashes it with SHA-512, so the choice is the same in every
    process and every run (unlike `hash()`, which is salted per process)."""
    return random.Random(f"optiml_jax.delimiter:{seed}:{task}:{index}").choice(ANSWER_DELIMITERS)


def add_delimiter(prompt: str, delimiter: str) -> str:
    prompt = prompt.rstrip()
    return prompt if prompt.endswith(":") else prompt + delimiter


def format_sni(
    definition: str,
    input: str,
    output: str,
    exemplars: Sequence[tuple[str, str]] = (),
    *,
    seed: int = 0,
    task: str = "",
    index: int = 0,
    delimiter: Optional[str] = None,
) -> tuple[str, str]:
    """(src, tgt) for one SNI instance; `exemplars` are (input, output) pairs (empty = zero-shot).
    `delimiter` fixes the answer delimiter; by default it is sampled from (seed, task, index).

    Asking for more shots than a task has positive examples gives as many as it has (SNI tasks have
    at least 2 in the full release; the shared sample keeps exactly 2)."""
    if delimiter is None:
        delimiter = sample_delimiter(seed, task, index)
    parts = [f"Instructions: {definition.strip()}"]
    for ex_input, ex_output in exemplars:
        parts.append(add_delimiter(f"Input: {ex_input.strip()}", delimiter) + " " + ex_output.strip())
    parts.append(add_delimiter(f"Input: {input.strip()}", delimiter))
    return "\n\n".join(parts), output.strip()
