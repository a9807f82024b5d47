"""k-shot demonstrations as OPT-IML evaluates with them (paper §2.4, §4.1).

* Drawn with a fixed seed from the task's own examples: an SNI task's positive examples (then, when
  k exceeds them, its instances past the evaluated ones), or for records (instance-level prompts) the
  task's other records of the same template, never the evaluated instance itself.
* Placed where the instruction type says: after the definition for task-level instructions (SNI, the
  reasoning tasks), through the SNI prompt templates of prompts.py; before the example for
  instance-level ones (FLAN, PromptSource), each demonstration its prompt, a space and its answer,
  separated by the MetaICL separator the paper uses ("\\n\\n\\n").
* A prompt over the context loses whole demonstrations from the left (the first one first) before
  generation.py would cut the instance itself; `fit_prompt` says how many it dropped, and the suite
  reports the count.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

from optiml_jax.data.templates import format_sni
from optiml_jax.eval.prompts import tk_instruct_prompt

Demonstration = tuple[str, str]  # (input or prompt, answer)
INSTANCE_SEPARATOR = "\n\n\n"


def draw_demonstrations(pool: Sequence[Demonstration], k: int, *seed_parts) -> list[Demonstration]:
    """k demonstrations of `pool` (fewer when it is smaller), the same for the same seed parts on every
    machine (random.Random of a string is not salted per process)."""
    if k <= 0 or not pool:
        return []
    rng = random.Random(":".join(str(part) for part in seed_parts))
    return [pool[i] for i in sorted(rng.sample(range(len(pool)), min(k, len(pool))))]


def task_level_prompt(
    template: str, definition: str, input: str, demonstrations: Sequence[Demonstration], delimiter: str
) -> str:
    """An SNI prompt: the definition, the demonstrations, then the instance."""
    if template == "tk_instruct":
        return tk_instruct_prompt(definition, input, demonstrations)
    return format_sni(definition, input, "", demonstrations, delimiter=delimiter)[0]


def instance_level_prompt(prompt: str, demonstrations: Sequence[Demonstration]) -> str:
    """A ready prompt (FLAN, PromptSource, a bench record) after its demonstrations."""
    blocks = [f"{demo_prompt.rstrip(' ')} {answer.strip()}" for demo_prompt, answer in demonstrations]
    return INSTANCE_SEPARATOR.join([*blocks, prompt.rstrip(" ")])


def fit_prompt(
    render: Callable[[Sequence[Demonstration]], str],
    demonstrations: Sequence[Demonstration],
    count_tokens: Callable[[str], int],
    room: int,
) -> tuple[str, int]:
    """(prompt, demonstrations dropped): the prompt `render` makes of the demonstrations, the leftmost
    ones dropped until it fits in `room` tokens (a prompt still too long without any is left to
    generation's left truncation)."""
    demonstrations = list(demonstrations)
    for dropped in range(len(demonstrations) + 1):
        prompt = render(demonstrations[dropped:])
        if dropped == len(demonstrations) or count_tokens(prompt) <= room:
            return prompt, dropped
    raise AssertionError("unreachable")
