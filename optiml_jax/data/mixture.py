"""OPT-IML's training mixture (data.mixture): fixed shares per benchmark with EPS inside each, plus extra
slices (reasoning data, pre-training text) with shares of their own.

    data:
      mixture:
        benchmarks: {promptsource: 45, flan: 20, sni: 25, crossfit: 4, exmix: 2, t5: 2, unifiedskg: 2}
        slices:
          - {name: reasoning, path: data/reasoning, share: 0.01}
          - {name: pretraining, path: data/pretraining.txt, share: 0.05, loss: all}

Two levels. Slice shares are fractions of the examples, taken first; the benchmarks share the rest in
proportion to their weights (normalised over the benchmarks present in data.train, read from each task's
`benchmark` column, data.fields.benchmark). Inside a benchmark or slice, p(task) ∝ min(n_task, data.eps)
as without a mixture. The result is one probability per task, so the stream is mixing.py's
MixtureStream with those probabilities, and keeps all its guarantees (pure function of seed, data and
settings; seekable; exact resume; the same batches for any process count).

A slice without `path` takes the tasks of the benchmark of its name in data.train (e.g. the bench's
reasoning tasks). A `loss: all` slice trains on every token of its examples (the paper's empty source);
plain text is read from a `text` column (JSONL, Parquet) or `.txt` lines unless the slice's `fields` say
otherwise. Slice tasks are named `SLICE/TASK` in the stream, so they never merge with benchmark tasks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

from optiml_jax.config import ConfigError
from optiml_jax.data.sources import Fields

LOSS_CHOICES = ("target", "all")
# A loss: all slice reads plain text: its `text` column, no prompt.
TEXT_FIELDS = Fields(src=None, tgt="text")
BENCHMARK_COLUMN = "benchmark"  # a built bench's column: read without a data.fields.benchmark mapping
KEY = "data.mixture"
TRAIN_GROUP = "train"  # data.train's tasks as one group, when data.mixture gives no benchmark weights


def check_section(value, known: list[str], key: str, example: str) -> None:
    """ConfigError naming `key` unless `value` is a mapping of `known` keys only."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key} must be a mapping like {{{example}}}, got {value!r}")
    unknown = sorted(map(str, set(value) - set(known)))
    if unknown:
        raise ConfigError(f"{key}: unknown key {unknown[0]!r} (known: {', '.join(known)})")


def _number(value, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if value < 0:
        raise ConfigError(f"{key}={value!r} is negative; shares and weights are >= 0")
    return float(value)


def _paths(value, key: str) -> Union[str, tuple[str, ...], None]:
    if value is None or isinstance(value, str) and value:
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise ConfigError(f"{key} must be a path or a list of paths, got {value!r}")


@dataclasses.dataclass(frozen=True)
class SliceConfig:
    """One extra slice: `share` of all examples, from `path` (None: data.train's benchmark `name`)."""

    name: str
    share: float
    path: Union[str, tuple[str, ...], None] = None
    loss: str = "target"
    fields: Optional[tuple[tuple[str, str], ...]] = None  # data.fields for this slice's files

    @property
    def whole_sequence(self) -> bool:
        return self.loss == "all"

    @property
    def field_map(self) -> Fields:
        if self.fields is not None:
            return Fields.from_mapping(dict(self.fields))
        return TEXT_FIELDS if self.whole_sequence else Fields()

    @classmethod
    def from_value(cls, value, key: str) -> "SliceConfig":
        check_section(
            value, [f.name for f in dataclasses.fields(cls)], key, "name: reasoning, path: ..., share: 0.01"
        )
        name = value.get("name")
        if not isinstance(name, str) or not name or "/" in name:
            raise ConfigError(f"{key}.name must be a non-empty name without '/', got {name!r}")
        if "share" not in value:
            raise ConfigError(f"{key}.share is missing (a fraction of all examples, e.g. 0.01)")
        loss = value.get("loss", "target")
        if loss not in LOSS_CHOICES:
            raise ConfigError(f"{key}.loss={loss!r} is not one of {', '.join(LOSS_CHOICES)}")
        fields = value.get("fields")
        if fields is not None:
            try:
                Fields.from_mapping(fields)
            except ValueError as e:
                raise ConfigError(f"{key}.fields: {e}") from None
            fields = tuple(sorted(fields.items()))
        return cls(
            name=name,
            share=_number(value["share"], f"{key}.share"),
            path=_paths(value.get("path"), f"{key}.path"),
            loss=loss,
            fields=fields,
        )

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"name": self.name, "share": self.share, "loss": self.loss}
        if self.path is not None:
            out["path"] = list(self.path) if isinstance(self.path, tuple) else self.path
        if self.fields is not None:
            out["fields"] = dict(self.fields)
        return out


@dataclasses.dataclass(frozen=True)
class MixtureConfig:
    """data.mixture: benchmark weights (name, weight) in the order given, and the extra slices."""

    benchmarks: tuple[tuple[str, float], ...] = ()
    slices: tuple[SliceConfig, ...] = ()

    @classmethod
    def from_value(cls, value, key: str = KEY) -> "MixtureConfig":
        """From the YAML mapping; ConfigError naming the key of a bad value."""
        if isinstance(value, cls):
            return value
        check_section(value, ["benchmarks", "slices"], key, "benchmarks: {sni: 25, ...}, slices: [...]")
        weights = value.get("benchmarks") or {}
        if not isinstance(weights, Mapping):
            raise ConfigError(f"{key}.benchmarks must map benchmark names to weights, got {weights!r}")
        benchmarks = tuple((str(n), _number(w, f"{key}.benchmarks.{n}")) for n, w in weights.items())
        if benchmarks and not sum(w for _, w in benchmarks) > 0:
            raise ConfigError(f"{key}.benchmarks: every weight is 0; give at least one a positive weight")
        slices = value.get("slices") or []
        if not isinstance(slices, (list, tuple)):
            raise ConfigError(f"{key}.slices must be a list of {{name, path, share}} mappings")
        slices = tuple(SliceConfig.from_value(s, f"{key}.slices[{k}]") for k, s in enumerate(slices))
        names = [s.name for s in slices]
        for s in slices:
            if names.count(s.name) > 1 or s.name in dict(benchmarks):
                raise ConfigError(f"{key}.slices: the name {s.name!r} is used twice (slices, benchmarks)")
        total = sum(s.share for s in slices)
        if total > 1 + 1e-9:
            raise ConfigError(f"{key}.slices: the shares add up to {total:g}, over 1 in total")
        if total >= 1 - 1e-9 and sum(w for _, w in benchmarks) > 0:
            raise ConfigError(f"{key}.slices: the shares add up to 1, leaving nothing to the benchmarks")
        if not benchmarks and not slices:
            raise ConfigError(f"{key} is empty: give benchmarks weights and/or slices")
        return cls(benchmarks, slices)

    @property
    def reads_benchmarks(self) -> bool:
        """Whether data.train's tasks are grouped by benchmark (weights, or a slice taking one)."""
        return bool(self.benchmarks) or any(s.path is None for s in self.slices)

    def to_dict(self) -> dict:
        return {"benchmarks": dict(self.benchmarks), "slices": [s.to_dict() for s in self.slices]}


class WholeSequence:
    """An example trained on every token (a `loss: all` slice): packing.tokenize_examples reads
    `whole_sequence`; everything else (src, tgt, task, source) is the example's."""

    whole_sequence = True

    def __init__(self, example: Any):
        self.example = example

    def __getattr__(self, name: str):
        if name == "example":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.example, name)


class WholeSequenceTask(Sequence):
    """A task's examples, each as a WholeSequence."""

    def __init__(self, examples: Sequence):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):
        return WholeSequence(self.examples[i])


@dataclasses.dataclass
class Group:
    """One benchmark or slice of the mixture: its target share of examples and its tasks (stream names)."""

    name: str
    kind: str  # "benchmark" or "slice"
    share: float
    tasks: list[str] = dataclasses.field(default_factory=list)
    capped_tasks: int = 0  # tasks with more than data.eps examples (EPS caps them)


@dataclasses.dataclass
class MixturePlan:
    """The tasks to mix (stream name -> examples), their probabilities and the group each belongs to."""

    tasks: dict[str, Sequence]
    probs: dict[str, float]
    groups: dict[str, Group]  # by group name, benchmarks first (config order), then slices
    group_of: dict[str, str]  # stream task name -> group name
    whole_sequence: set[str]  # stream task names trained on every token


def benchmark_of(examples: Sequence) -> Optional[str]:
    return getattr(examples, "benchmark", None)


def plan_mixture(
    mixture: MixtureConfig, tasks: Mapping[str, Sequence], slice_tasks: Mapping[str, Mapping], eps: int
) -> MixturePlan:
    """The two-level plan over data.train's `tasks` (each TaskRecords knows its benchmark) and each slice's
    tasks read from its path (`slice_tasks`: slice name -> tasks). ConfigError names the key of a weight
    that does not fit the data (a benchmark named but absent, tasks without a benchmark weight)."""
    by_benchmark: dict[str, dict[str, Sequence]] = {}
    for name, examples in tasks.items():
        by_benchmark.setdefault(benchmark_of(examples), {})[name] = examples
    weights = dict(mixture.benchmarks)
    pulled = {s.name for s in mixture.slices if s.path is None}
    _check_benchmarks(weights, pulled, by_benchmark)
    if not weights:  # slices only: the rest of data.train is one group, EPS over its tasks
        weights = {TRAIN_GROUP: 1.0}
        rest = (
            examples for b, found in by_benchmark.items() if b not in pulled for examples in found.items()
        )
        by_benchmark[TRAIN_GROUP] = dict(rest)
    remaining = 1.0 - sum(s.share for s in mixture.slices)
    total_weight = sum(w for b, w in weights.items() if w > 0)
    plan = MixturePlan({}, {}, {}, {}, set())
    for benchmark, weight in weights.items():
        if weight > 0:
            _add_group(
                plan,
                Group(benchmark, "benchmark", remaining * weight / total_weight),
                by_benchmark[benchmark],
                eps,
                prefix="",
            )
    for s in mixture.slices:
        found = by_benchmark[s.name] if s.path is None else slice_tasks[s.name]
        if s.whole_sequence:
            found = {name: WholeSequenceTask(examples) for name, examples in found.items()}
        _add_group(
            plan,
            Group(s.name, "slice", s.share),
            found,
            eps,
            prefix="" if s.path is None else f"{s.name}/",
            whole=s.whole_sequence,
        )
    return plan


def _check_benchmarks(weights: dict, pulled: set, by_benchmark: dict) -> None:
    present = sorted(b for b in by_benchmark if b is not None)
    for benchmark in [*weights, *pulled]:
        if benchmark not in by_benchmark:
            key = f"{KEY}.benchmarks.{benchmark}" if benchmark in weights else f"{KEY}.slices ({benchmark})"
            raise ConfigError(
                f"{key}: data.train has no task of benchmark {benchmark!r} (its benchmarks: "
                f"{', '.join(present) or 'none'}; read from data.fields.benchmark, default column "
                f"{BENCHMARK_COLUMN!r})"
            )
    if weights and None in by_benchmark:
        task = sorted(by_benchmark[None])[0]
        raise ConfigError(
            f"{KEY}.benchmarks: task {task!r} of data.train has no benchmark (data.fields.benchmark "
            f"names the column holding it)"
        )
    unweighted = sorted(set(present) - set(weights) - pulled)
    if weights and unweighted:
        raise ConfigError(
            f"{KEY}.benchmarks: data.train has tasks of benchmark {unweighted[0]!r} with no weight; give "
            f"it one (0 leaves its tasks out)"
        )


def _add_group(plan: MixturePlan, group: Group, tasks: Mapping, eps: int, prefix: str, whole=False) -> None:
    usable = {prefix + name: examples for name, examples in sorted(tasks.items()) if len(examples)}
    capped = {name: min(len(examples), eps) for name, examples in usable.items()}
    total = sum(capped.values())
    if not total:
        raise ConfigError(f"{KEY}: {group.kind} {group.name!r} has no usable examples")
    for name, examples in usable.items():
        plan.tasks[name] = examples
        plan.probs[name] = group.share * capped[name] / total
        plan.group_of[name] = group.name
        if whole:
            plan.whole_sequence.add(name)
    group.tasks = list(usable)
    group.capped_tasks = sum(len(examples) > eps for examples in usable.values())
    plan.groups[group.name] = group


def group_counts(plan: MixturePlan, task_counts: Mapping[str, int]) -> dict[str, int]:
    """Examples drawn per group from the stream's per-task counts (MixtureStream.task_counts)."""
    out = dict.fromkeys(plan.groups, 0)
    for name, count in task_counts.items():
        out[plan.group_of[name]] += count
    return out


def share_scalars(counts: Mapping[str, int]) -> dict[str, float]:
    """{"mixture/NAME": realised share of examples} for the training log, from mixture_counts()."""
    total = sum(counts.values())
    return {f"mixture/{name}": count / total for name, count in counts.items()} if total else {}
