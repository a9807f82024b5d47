"""Suite files: the evaluation suites of OPT-IML (paper §4.1, Tables 9-16) as data a user can edit.

A suite file is YAML, a list of entries or a mapping with `entries` and optional `name`, `seed` (of the
demonstrations, default 0), `max_instances` (per task and template, default 100, SNI's protocol; 0 =
all), `max_new_tokens` (default 256, the paper's; optiml-evaluate's --max-new-tokens overrides it) and
`lm_eval_include` (a directory of lm-evaluation-harness task YAMLs, for local tasks). Entry:

    - task: cb                        # the task's name in its data (a file with one task may differ)
      data: bench/dev                 # any path the format registry reads, or lm_eval:TASK
      benchmark: promptsource
      category: textual_entailment
      level: fully_held_out           # fully_held_out | partially_supervised | fully_supervised
      metric: accuracy                # rougeL | exact_match | accuracy
      mode: rank                      # generate | rank (ranked over the record's options / task labels)
      shots: [0, 5]
      templates: all                  # or a list: record `template` values; optiml, tk_instruct for SNI
      demonstrations: bench/train     # optional: where k-shot demonstrations come from (default: data)

Relative paths are relative to the suite file; `$VAR` / `${VAR}` in a path is the environment
variable (the shipped suites read a built bench at `$OPTIML_BENCH`). A task
name with glob characters (`task: "*"`) stands for every task of the data that matches it and has the
entry's category (records carrying a `category`), each one a task of the suite.

Every bad entry is one line of the SuiteError, `FILE: entry N (TASK): 'key' ...`, all of them at once,
before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional, Union

import yaml

from optiml_jax.eval.tasks import DEFAULT_MAX_INSTANCES

LEVELS = ("fully_held_out", "partially_supervised", "fully_supervised")
SUITE_METRICS = ("rougeL", "exact_match", "accuracy")
SUITE_MODES = ("generate", "rank")
ALL_TEMPLATES = "all"
LM_EVAL_PREFIX = "lm_eval:"
REQUIRED_KEYS = ("task", "data", "benchmark", "category", "level", "metric", "mode")
OPTIONAL_KEYS = ("shots", "templates", "demonstrations")
SUITE_KEYS = ("name", "seed", "max_instances", "max_new_tokens", "lm_eval_include", "entries")
DEFAULT_MAX_NEW_TOKENS = 256  # the paper's: greedy to </s> or 256 tokens


class SuiteError(ValueError):
    """A bad suite file: one line per bad entry or key."""


@dataclasses.dataclass(frozen=True)
class SuiteEntry:
    task: str
    data: str  # a resolved path, or lm_eval:TASK
    benchmark: str
    category: str
    level: str
    metric: str  # SUITE_METRICS
    mode: str  # SUITE_MODES
    shots: tuple[int, ...] = (0,)
    templates: Union[str, tuple[str, ...]] = ALL_TEMPLATES
    demonstrations: Optional[str] = None  # a resolved path; None = the entry's own data

    @property
    def lm_eval_task(self) -> Optional[str]:
        return self.data[len(LM_EVAL_PREFIX) :] if self.data.startswith(LM_EVAL_PREFIX) else None


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    path: str
    entries: tuple[SuiteEntry, ...]
    seed: int = 0
    max_instances: int = DEFAULT_MAX_INSTANCES
    lm_eval_include: Optional[str] = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS

    @property
    def shot_settings(self) -> tuple[int, ...]:
        return tuple(sorted({k for entry in self.entries for k in entry.shots}))


def is_pattern(task: str) -> bool:
    """A task name with glob characters stands for every matching task of the entry's category."""
    return any(c in task for c in "*?[")


def _is_count(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _entry_problems(raw, where: str, base: Path) -> tuple[list[str], Optional[SuiteEntry]]:
    """(one line per problem, the entry when there are none)."""
    if not isinstance(raw, dict):
        return [f"{where}: must be a mapping of {', '.join(REQUIRED_KEYS)}, got {raw!r:.60}"], None
    problems = [f"{where}: unknown key {key!r}" for key in raw if key not in REQUIRED_KEYS + OPTIONAL_KEYS]
    problems += [f"{where}: missing key {key!r}" for key in REQUIRED_KEYS if key not in raw]
    for key in ("task", "data", "benchmark", "category"):
        if key in raw and (not isinstance(raw[key], str) or not raw[key].strip()):
            problems.append(f"{where}: {key!r} must be a non-empty string, got {raw[key]!r:.60}")
    for key, allowed in (("level", LEVELS), ("metric", SUITE_METRICS), ("mode", SUITE_MODES)):
        if key in raw and raw[key] not in allowed:
            problems.append(f"{where}: {key!r} must be one of {', '.join(allowed)}, got {raw[key]!r:.60}")
    shots = raw.get("shots", [0])
    if not isinstance(shots, list) or not shots or not all(_is_count(k) for k in shots):
        problems.append(f"{where}: 'shots' must be a non-empty list of integers >= 0, got {shots!r:.60}")
    elif len(set(shots)) != len(shots):
        problems.append(f"{where}: 'shots' lists a shot count twice: {shots!r}")
    templates = raw.get("templates", ALL_TEMPLATES)
    if templates != ALL_TEMPLATES and (
        not isinstance(templates, list)
        or not templates
        or not all(isinstance(t, str) and t for t in templates)
        or len(set(templates)) != len(templates)
    ):
        problems.append(
            f"{where}: 'templates' must be {ALL_TEMPLATES!r} or a list of distinct template names, "
            f"got {templates!r:.60}"
        )
    data, demonstrations = raw.get("data"), raw.get("demonstrations")
    paths = {}
    for key, value in (("data", data), ("demonstrations", demonstrations)):
        if not isinstance(value, str) or not value or value.startswith(LM_EVAL_PREFIX) or ":" in value[:3]:
            paths[key] = value  # lm_eval:TASK, hf:NAME (checked when read) or a bad value reported above
            continue
        path = Path(os.path.expandvars(value)).expanduser()
        paths[key] = str(path if path.is_absolute() else base / path)
        if "$" in str(path):
            problems.append(f"{where}: {key!r} {value!r} names an environment variable that is not set")
        elif not Path(paths[key]).exists():
            problems.append(f"{where}: {key!r} {value!r}: no such file or directory")
    if demonstrations is not None and not isinstance(demonstrations, str):
        problems.append(f"{where}: 'demonstrations' must be a path, got {demonstrations!r:.60}")
    if isinstance(data, str) and data.startswith(LM_EVAL_PREFIX):
        if not data[len(LM_EVAL_PREFIX) :]:
            problems.append(f"{where}: 'data' lm_eval: needs a task name (lm_eval:TASK)")
        if raw.get("metric") == "rougeL":
            problems.append(f"{where}: lm_eval tasks report accuracy or exact_match, not rougeL")
        if templates != ALL_TEMPLATES or demonstrations is not None:
            problems.append(f"{where}: lm_eval tasks bring their own prompt and demonstrations")
    if raw.get("mode") == "rank" and raw.get("metric") not in (None, "accuracy"):
        problems.append(f"{where}: mode rank reports accuracy, got metric {raw.get('metric')!r}")
    if problems:
        return problems, None
    return [], SuiteEntry(
        task=raw["task"],
        data=paths["data"],
        benchmark=raw["benchmark"],
        category=raw["category"],
        level=raw["level"],
        metric=raw["metric"],
        mode=raw["mode"],
        shots=tuple(shots),
        templates=ALL_TEMPLATES if templates == ALL_TEMPLATES else tuple(templates),
        demonstrations=paths["demonstrations"],
    )


def load_suite(path: str | Path) -> Suite:
    """The suite of a YAML file; SuiteError (every problem, one line each) when it is bad."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SuiteError(f"{path}: cannot read the suite file ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise SuiteError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    settings = {"entries": raw} if isinstance(raw, list) else raw
    if not isinstance(settings, dict) or not isinstance(settings.get("entries"), list):
        raise SuiteError(f"{path}: a suite is a list of entries, or a mapping with an 'entries' list")
    problems = [f"{path}: unknown key {key!r}" for key in settings if key not in SUITE_KEYS]
    seed, max_instances = settings.get("seed", 0), settings.get("max_instances", DEFAULT_MAX_INSTANCES)
    if not _is_count(seed):
        problems.append(f"{path}: 'seed' must be an integer >= 0, got {seed!r:.40}")
    if not _is_count(max_instances):
        problems.append(
            f"{path}: 'max_instances' must be an integer >= 0 (0 = all), got {max_instances!r:.40}"
        )
    max_new_tokens = settings.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if not _is_count(max_new_tokens, 1):
        problems.append(f"{path}: 'max_new_tokens' must be an integer >= 1, got {max_new_tokens!r:.40}")
    include = settings.get("lm_eval_include")
    if include is not None:
        include = Path(include).expanduser()
        include = str(include if include.is_absolute() else path.parent / include)
        if not Path(include).is_dir():
            problems.append(f"{path}: 'lm_eval_include' {settings['lm_eval_include']!r} is not a directory")
    entries, seen = [], {}
    for index, raw_entry in enumerate(settings["entries"]):
        name = raw_entry.get("task") if isinstance(raw_entry, dict) else None
        where = f"{path}: entry {index}" + (f" ({name})" if isinstance(name, str) else "")
        entry_problems, entry = _entry_problems(raw_entry, where, path.parent)
        problems += entry_problems
        if entry is not None:
            if entry.task in seen and not is_pattern(entry.task):
                problems.append(f"{where}: task {entry.task!r} is already entry {seen[entry.task]}")
            seen.setdefault(entry.task, index)
            entries.append(entry)
    if not settings["entries"]:
        problems.append(f"{path}: the suite has no entries")
    if problems:
        raise SuiteError("\n".join(problems))
    return Suite(
        name=str(settings.get("name") or path.stem),
        path=str(path),
        entries=tuple(entries),
        seed=seed,
        max_instances=max_instances,
        lm_eval_include=include,
        max_new_tokens=max_new_tokens,
    )
