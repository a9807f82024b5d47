"""The words of the benchmark (spec §1) as types: an example, a task as read from a collection, and the
one error type every bad input raises (the CLI prints it as one line and exits 2)."""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Optional

BENCHMARKS = ("sni", "promptsource", "flan", "crossfit", "exmix", "t5", "unifiedskg", "reasoning")
# How each collection's instructions are worded (Table 1's "instruction type"), which decides its prompt
# form (prompts.py): task-level = one definition per task, instance-level = each example is a ready
# prompt, keywords = a hand-written instruction from the registry goes before the input.
INSTRUCTION_TYPES = {
    "sni": "task",
    "reasoning": "task",
    "promptsource": "instance",
    "flan": "instance",
    "crossfit": "keywords",
    "exmix": "keywords",
    "t5": "keywords",
    "unifiedskg": "keywords",
}
LEVELS = ("train", "fully_held_out", "partially_supervised", "fully_supervised")
_SNI_NAME = re.compile(r"^task\d+_")


class BenchError(ValueError):
    """Bad input (a collection path, registry, split file, task name): the message names the file, key
    or value; the CLI prints it as one line and exits 2."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One way of prompting one instance: `input` is the instance's input (the whole prompt for
    instance-level collections), `references` every accepted output (the first is trained on)."""

    input: str
    references: tuple[str, ...]
    options: tuple[str, ...] = ()
    template: str = ""


# An instance: its alternative prompts (one per template of a multi-template task, else one).
Instance = tuple[Example, ...]


@dataclasses.dataclass
class Task:
    """A task as a collection holds it. `load()` reads its instances in the collection's order (lazily:
    a large build holds only the evaluation side and one train task per worker in memory); `definition`
    is SNI's own instruction; category and sources come from the task file (SNI) or the registry."""

    name: str
    benchmark: str
    load: Callable[[], list[Instance]]
    category: Optional[str] = None
    sources: tuple[str, ...] = ()
    definition: Optional[str] = None
    instruction: Optional[str] = None
    drop_templates: tuple[str, ...] = ()


def qualified_name(benchmark: str, local: str) -> str:
    """The benchmark-wide task name: SNI's own `taskNNN_...` file stem, else `{benchmark}_{local}` (the
    same dataset, e.g. COPA, is a task of several collections)."""
    return local if benchmark == "sni" else f"{benchmark}_{local}"


def benchmark_of(name: str) -> Optional[str]:
    """The collection a qualified task name belongs to (None: not one of ours)."""
    if _SNI_NAME.match(name):
        return "sni"
    for benchmark in sorted(BENCHMARKS, key=len, reverse=True):
        if name.startswith(f"{benchmark}_"):
            return benchmark
    return None


def normalise_source(source: str) -> str:
    """Data-source names as compared across collections: case, spaces, dashes, dots and underscores
    ignored (SNI writes `triviaqa` and `cosmosqa`, the hub `trivia_qa` and `Cosmos QA`); spellings that
    differ beyond that are the registry's source_aliases."""
    return re.sub(r"[\s\-_.]+", "", source.strip().lower())
