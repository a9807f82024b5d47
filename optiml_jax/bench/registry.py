"""The task registry (`--registry FILE.yaml`): for every task the collections do not describe themselves,
its category, data sources, instruction (keyword-only collections) and templates to drop (spec §3):

    categories: [...]       # optional: the category names (taxonomy) beyond those of the tasks here
    source_aliases:         # optional: other spellings of a data source (SNI's task files write theirs)
      squad_v1: [squad1.1]
    collections:            # optional: the column mapping of a Parquet/JSONL collection
      exmix: {columns: {task: task, input: inputs, output: targets}}
    tasks:
      crossfit_copa: {category: Cause Effect Classification, sources: [copa], instruction: "..."}

Names are the benchmark's qualified task names (tasks.qualified_name). An SNI task listed here has its
category and sources replaced (the paper unified categories by hand across collections). Sources are
compared after tasks.normalise_source; an alias stands for its canonical id everywhere (consolidation,
de-duplication, the manifest), so one dataset spelled two ways is still one data source."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import yaml

from optiml_jax.bench.tasks import BENCHMARKS, BenchError, normalise_source

TASK_KEYS = ("category", "sources", "instruction", "drop_templates", "note")
COLUMN_KEYS = ("task", "input", "output", "options", "template")
TOP_KEYS = ("tasks", "collections", "categories", "source_aliases")


@dataclasses.dataclass(frozen=True)
class TaskEntry:
    category: Optional[str] = None
    sources: tuple[str, ...] = ()
    instruction: Optional[str] = None
    drop_templates: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Registry:
    tasks: dict
    columns: dict  # benchmark -> {our key: column}
    path: str = ""
    taxonomy: tuple[str, ...] = ()
    aliases: dict = dataclasses.field(default_factory=dict)  # normalised alias -> canonical id

    def canonical_sources(self, sources) -> tuple[str, ...]:
        """`sources` with every alias replaced by its canonical id (order kept, repeats dropped)."""
        return tuple(dict.fromkeys(self.aliases.get(normalise_source(s), s) for s in sources))

    def categories(self) -> set[str]:
        """Every category the registry knows: its `categories` list and its tasks'."""
        return set(self.taxonomy) | {entry.category for entry in self.tasks.values() if entry.category}


def read_yaml_mapping(path, what: str) -> dict:
    """A YAML file holding a mapping, or a BenchError naming the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BenchError(f"{path}: {what} file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BenchError(f"{path}: cannot read the {what} file ({e})") from None
    except yaml.YAMLError as e:
        raise BenchError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise BenchError(f"{path}: the {what} file must hold a mapping, got {type(data).__name__}")
    return data


def _strings(value, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise BenchError(f"{where}: must be a list of non-empty strings, got {value!r}")
    return tuple(value)


def _entry(name: str, value, where: str) -> TaskEntry:
    if not isinstance(value, dict):
        raise BenchError(f"{where}: must be a mapping of {', '.join(TASK_KEYS)}, got {value!r}")
    unknown = sorted(map(str, set(value) - set(TASK_KEYS)))
    if unknown:
        raise BenchError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(TASK_KEYS)})")
    for key in ("category", "instruction"):
        if value.get(key) is not None and not (isinstance(value[key], str) and value[key].strip()):
            raise BenchError(f"{where}.{key}: must be a non-empty string, got {value[key]!r}")
    return TaskEntry(
        category=value.get("category"),
        sources=_strings(value.get("sources"), f"{where}.sources"),
        instruction=value.get("instruction"),
        drop_templates=_strings(value.get("drop_templates"), f"{where}.drop_templates"),
    )


def load_registry(path) -> Registry:
    data = read_yaml_mapping(path, "registry")
    unknown = sorted(map(str, set(data) - set(TOP_KEYS)))
    if unknown:
        raise BenchError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(TOP_KEYS)})")
    tasks = data.get("tasks") or {}
    if not isinstance(tasks, dict):
        raise BenchError(f"{path}: tasks must map task names to entries")
    entries = {str(name): _entry(str(name), value, f"{path}: tasks.{name}") for name, value in tasks.items()}
    columns = {}
    for benchmark, settings in (data.get("collections") or {}).items():
        where = f"{path}: collections.{benchmark}"
        if benchmark not in BENCHMARKS:
            raise BenchError(f"{where}: unknown collection (known: {', '.join(BENCHMARKS)})")
        mapping = (settings or {}).get("columns") if isinstance(settings, dict) else None
        if not isinstance(mapping, dict) or set(settings) - {"columns"}:
            raise BenchError(f"{where}: expected {{columns: {{{', '.join(COLUMN_KEYS)}: COLUMN}}}}")
        bad = sorted(map(str, set(mapping) - set(COLUMN_KEYS)))
        if bad:
            raise BenchError(f"{where}.columns: unknown key {bad[0]!r} (known: {', '.join(COLUMN_KEYS)})")
        columns[benchmark] = {str(k): str(v) for k, v in mapping.items()}
    taxonomy = _strings(data.get("categories"), f"{path}: categories")
    aliases = _aliases(data.get("source_aliases") or {}, f"{path}: source_aliases")
    return Registry(tasks=entries, columns=columns, path=str(path), taxonomy=taxonomy, aliases=aliases)


def _aliases(value, where: str) -> dict:
    """{normalised alias: canonical id}; an alias claimed by two ids is an error naming both."""
    if not isinstance(value, dict):
        raise BenchError(f"{where}: must map a source id to its other spellings, got {value!r}")
    aliases: dict[str, str] = {}
    for canonical, spellings in value.items():
        canonical = str(canonical)
        for spelling in _strings(spellings, f"{where}.{canonical}"):
            key = normalise_source(spelling)
            if aliases.get(key, canonical) != canonical:
                both = f"{aliases[key]!r} and {canonical!r}"
                raise BenchError(f"{where}: {spelling!r} is an alias of both {both}")
            if key != normalise_source(canonical):
                aliases[key] = canonical
    return aliases
