"""Instruction-tuning data: readers, templates, EPS mixing, packing and host-sharded batch loaders.

Public API:
    DataConfig                       the `data:` section of the training config
    Fields                           data.fields: which JSONL key / Parquet column holds src, tgt,
                                     task, definition
    build_loaders(cfg, tok)          -> (TrainLoader, EvalLoader or None), each data file read once
    build_train_loader(cfg, tok)     -> TrainLoader (infinite, resumable: get_state / set_state)
    build_eval_loader(cfg, tok)      -> EvalLoader or None (one pass per `iter()`)
    read_tasks, SkipStats, DataError, Example
    TaskRecords, Shard                a task's examples, read from disk on demand; a process's reading share
    split_holdout                    data.eval_holdout: held-out instances of the training tasks
    MixtureConfig                    data.mixture: benchmark weights over EPS, extra slices (mixture.py)
    DemonstrationsConfig             data.demonstrations: MetaICL demonstrations (demonstrations.py)

Each batch is a dict of numpy arrays of this process's rows, [local_batch, seq_len]:
input_ids, targets, segment_ids, positions (int32) and loss_mask (float32); see packing.py.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Optional, Union

import numpy as np

from optiml_jax.config import ConfigError
from optiml_jax.data import templates
from optiml_jax.data.demonstrations import DemonstrationsConfig
from optiml_jax.data.formats import AUTO, format_choices
from optiml_jax.data.formats.sni import read_sni_task
from optiml_jax.data.holdout import holdout_problem, split_holdout
from optiml_jax.data.loader import AllGather, EvalLoader, RowLayout, TrainLoader
from optiml_jax.data.mixing import MixtureStream, mixing_weights
from optiml_jax.data.mixture import BENCHMARK_COLUMN, MixtureConfig, plan_mixture
from optiml_jax.data.packing import (
    BATCH_KEYS,
    OVERLONG_CHOICES,
    Packer,
    PackStats,
    TokenizedExample,
    row_arrays,
    tokenize_examples,
)
from optiml_jax.data.records import Shard, TaskRecords, read_jsonl, read_tasks
from optiml_jax.data.sources import (
    FIELD_NAMES,
    ON_ERROR_CHOICES,
    DataError,
    Example,
    Fields,
    SkipStats,
)
from optiml_jax.data.templates import TEMPLATES
from optiml_jax.tokenizer import PROMPT_ADD_BOS

logger = logging.getLogger(__name__)

Paths = Union[str, tuple[str, ...], None]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """`train`/`eval`: a file or directory (or a list of them); `.json` = SNI task files, `.jsonl` =
    metaseq src/tgt lines, `.parquet` = tables (a directory: every such file under it); `hf:NAME[:SPLIT]`
    = a hub dataset through `datasets` (formats/hub.py). `fields`: which key / column of JSONL and Parquet
    records holds our `src`, `tgt`, `task` and `definition` (see sources.Fields), e.g. {src: inputs,
    tgt: targets, task: task_name}; unset = `src` and `tgt`, one task per file.
    `train_tasks`/`eval_tasks`: optional split files (one task name per line, e.g.
    data/sni/splits/default/train_tasks.txt) restricting which SNI tasks are read.

    `eval_holdout`: instead of a separate `eval` set, withhold the last N examples (an int) or the last
    fraction (a float in (0, 1)) of every training task from training and evaluate on them: OPT-IML's
    "fully supervised" setting, held-out instances of seen tasks (see holdout.py). Exclusive with `eval`
    and `eval_tasks`.

    `mixture`: OPT-IML's two-level mixture over data.train (benchmark weights over EPS, extra slices;
    mixture.py); `demonstrations`: MetaICL demonstrations in training prompts (demonstrations.py). Both
    off (None) by default."""

    train: Paths = None
    eval: Paths = None
    format: str = "auto"
    eps: int = 4096
    template: str = "zero_shot"
    num_shots: int = 0
    overlong: str = "truncate"
    on_error: str = "skip"
    train_tasks: Optional[str] = None
    eval_tasks: Optional[str] = None
    eval_holdout: Union[int, float, None] = None
    # our name -> column; stored as (name, column) pairs in FIELD_NAMES order, so the config stays hashable
    fields: Union[tuple[tuple[str, str], ...], dict, None] = None
    # OPT-IML's two-level mixture and MetaICL demonstrations (mixture.py, demonstrations.py); None: off
    mixture: Union[MixtureConfig, dict, None] = None
    demonstrations: Union[DemonstrationsConfig, dict, None] = None
    # `</s>` before every prompt (transformers' OPT tokenization); default: none, as metaseq's OPT-IML
    # fine-tuning data (tokenizer.PROMPT_ADD_BOS, docs/evaluation.md "Prompt convention")
    add_bos: bool = PROMPT_ADD_BOS

    def __post_init__(self):
        for name in ("train", "eval"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            if isinstance(value, list):
                value = tuple(os.fspath(v) if isinstance(v, os.PathLike) else v for v in value)
            object.__setattr__(self, name, value)
        if self.mixture is not None:
            object.__setattr__(self, "mixture", MixtureConfig.from_value(self.mixture))
        if self.demonstrations is not None:
            object.__setattr__(self, "demonstrations", DemonstrationsConfig.from_value(self.demonstrations))
        self.validate()
        if self.fields is not None:
            given = _as_mapping(self.fields)
            object.__setattr__(self, "fields", tuple((k, given[k]) for k in FIELD_NAMES if k in given))

    @property
    def field_map(self) -> Fields:
        """data.fields as data.eval is read: a benchmark column is only data.train's concern."""
        return dataclasses.replace(Fields.from_mapping(_as_mapping(self.fields)), benchmark=None)

    @property
    def train_fields(self) -> Fields:
        """data.fields for data.train: with data.mixture's benchmark weights (or a slice taking a
        benchmark) the benchmark is read from a built bench's `benchmark` column unless data.fields maps
        it (eval files need no such column)."""
        fields = Fields.from_mapping(_as_mapping(self.fields))
        if fields.benchmark is None and self.mixture is not None and self.mixture.reads_benchmarks:
            fields = dataclasses.replace(fields, benchmark=BENCHMARK_COLUMN)
        return fields

    def validate(self) -> None:
        if not isinstance(self.add_bos, bool):
            raise ConfigError(f"data.add_bos must be true or false, got {self.add_bos!r}")
        for name in ("train", "eval"):
            value = getattr(self, name)
            items = value if isinstance(value, tuple) else (value,)
            if value is not None and (not items or not all(isinstance(v, str) and v for v in items)):
                raise ConfigError(f"data.{name} must be a path or a list of paths, got {value!r}")
        for name in ("train_tasks", "eval_tasks"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value):
                raise ConfigError(f"data.{name} must be the path of a split file, got {value!r}")
        for name, choices in (
            ("format", format_choices()),
            ("template", TEMPLATES),
            ("overlong", OVERLONG_CHOICES),
            ("on_error", ON_ERROR_CHOICES),
        ):
            if getattr(self, name) not in choices:
                raise ConfigError(f"data.{name}={getattr(self, name)!r} is not one of {', '.join(choices)}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, int) or self.eps < 1:
            raise ConfigError(
                f"data.eps must be a positive integer (examples per task cap), got {self.eps!r}"
            )
        if isinstance(self.num_shots, bool) or not isinstance(self.num_shots, int) or self.num_shots < 0:
            raise ConfigError(f"data.num_shots must be a non-negative integer, got {self.num_shots!r}")
        if self.template == "few_shot" and self.num_shots == 0:
            raise ConfigError("data.template='few_shot' needs data.num_shots >= 1")
        if self.template == "zero_shot" and self.num_shots != 0:
            raise ConfigError(
                f"data.num_shots={self.num_shots} is only used with data.template='few_shot'; "
                f"set the template or num_shots: 0"
            )
        try:
            Fields.from_mapping(_as_mapping(self.fields))
        except ValueError as e:
            raise ConfigError(f"data.fields: {e}") from None
        problem = holdout_problem(self.eval_holdout)
        if problem:
            raise ConfigError(f"data.eval_holdout {problem}")
        if self.eval_holdout is not None:
            for name in ("eval", "eval_tasks"):
                if getattr(self, name) is not None:
                    raise ConfigError(
                        f"data.eval_holdout and data.{name} are both set: the eval set is either "
                        f"held-out instances of the training tasks (eval_holdout) or separate "
                        f"data (eval, eval_tasks); remove one"
                    )
            if self.train is None:
                raise ConfigError(
                    "data.eval_holdout needs data.train: it holds out instances of the training tasks"
                )

    @classmethod
    def from_dict(cls, data: dict, source: str = "data") -> "DataConfig":
        """From the `data:` mapping of a YAML config; `source` names it in errors."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ConfigError(
                f"{source}: unknown data key(s): {', '.join(map(str, unknown))} "
                f"(known: {', '.join(sorted(fields))})"
            )
        try:
            return cls(**data)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for name in ("train", "eval"):
            if isinstance(out[name], tuple):
                out[name] = list(out[name])
        out["fields"] = _as_mapping(self.fields)
        for name in ("mixture", "demonstrations"):
            value = getattr(self, name)
            out[name] = None if value is None else value.to_dict()
        return out


def _as_mapping(fields):
    """data.fields as a mapping: the stored (name, column) pairs made a dict again; anything else as it is
    (for Fields.from_mapping to judge)."""
    if isinstance(fields, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in fields):
        return dict(fields)
    return fields


def _data_config(cfg: Any) -> DataConfig:
    if isinstance(cfg, DataConfig):
        return cfg
    data = getattr(cfg, "data", None)
    if isinstance(data, DataConfig):
        return data
    if isinstance(data, dict):
        return DataConfig.from_dict(data)
    raise ConfigError(f"expected a DataConfig or a config with a .data DataConfig, got {type(cfg).__name__}")


def _setting(value, cfg: Any, path: str):
    """An explicit argument, else `cfg.<path>` (e.g. "train.batch_size"), else a clear error."""
    if value is not None:
        return value
    obj = cfg
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ConfigError(f"{path} is not set: pass it to the data loader or give a config that has it")
    return obj


def _processes(process_index: Optional[int], process_count: Optional[int]) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only when the caller leaves it to us; the data code is otherwise numpy-only

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return process_index, process_count


def _jax_allgather(local: np.ndarray) -> np.ndarray:
    """[process_count, n] int64 from every process's int64 [n], through JAX's collectives. Sent as int32
    pairs: JAX without x64 would silently narrow int64 stream positions."""
    from jax.experimental import multihost_utils

    halves = np.ascontiguousarray(np.asarray(local, np.int64)).view(np.int32)
    gathered = np.asarray(multihost_utils.process_allgather(halves))
    return np.ascontiguousarray(gathered.reshape(-1, halves.size)).view(np.int64)


def _default_allgather(process_count: int) -> Optional[AllGather]:
    """JAX's allgather when this really is one of `process_count` JAX processes (None otherwise: a
    loader built for a simulated process count iterates, but cannot gather its state)."""
    if process_count == 1:
        return None
    import jax

    return _jax_allgather if jax.process_count() == process_count else None


def _read(
    data: DataConfig, paths, split_file, seed: int, shard: Shard, fields: Optional[Fields] = None
) -> tuple[dict, SkipStats]:
    # Every process ends up with the same tasks and skip counts; only the first logs the skips.
    stats = SkipStats(data.on_error, log=shard.index == 0)
    tasks = read_tasks(
        paths,
        stats,
        format=data.format,
        split_file=split_file,
        template=data.template,
        num_shots=data.num_shots,
        seed=seed,
        shard=shard,
        fields=fields or data.field_map,
    )
    if not tasks:
        first = f"; first: {stats.first_message}" if stats.first_message else ""
        raise DataError(f"{paths}: no usable examples (skipped: {stats.as_dict()}){first}")
    return tasks, stats


def _log_holdout(data: DataConfig, held_out: dict) -> None:
    logger.info(
        "eval set: the last %s of every training task (data.eval_holdout=%r): %d examples of %d tasks",
        data.eval_holdout if isinstance(data.eval_holdout, int) else f"{data.eval_holdout:.0%}",
        data.eval_holdout,
        sum(map(len, held_out.values())),
        len(held_out),
    )


def build_loaders(
    cfg: Any,
    tokenizer,
    *,
    seed: Optional[int] = None,
    batch_size: Optional[int] = None,
    eval_batch_size: Optional[int] = None,
    seq_len: Optional[int] = None,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    state: Optional[dict] = None,
    allgather: Optional[AllGather] = None,
    train: bool = True,
    eval: bool = True,
) -> tuple[Optional[TrainLoader], Optional[EvalLoader]]:
    """(train loader, eval loader) from `cfg` (a DataConfig, or the training config: `.data`, `.seed`,
    `.train.batch_size` = global batch in sequences, `.train.seq_len`), reading each file once: with
    data.eval_holdout both come from one read of the training files. Arguments override the config
    (`eval_batch_size` defaults to `batch_size`); process index/count default to JAX's, `allgather`
    (for get_state and stats) to JAX's collectives. `train`/`eval=False` skips building that one;
    the eval loader is None when there is no eval set. `loader.stats()` reports what the readers
    skipped and how packing went."""
    data = _data_config(cfg)
    if train and data.train is None:
        raise ConfigError("data.train is not set")
    want_eval = eval and (data.eval is not None or data.eval_holdout is not None)
    if not train and not want_eval:
        return None, None
    seed = _setting(seed, cfg, "seed")
    batch_size = _setting(batch_size, cfg, "train.batch_size")
    seq_len = _setting(seq_len, cfg, "train.seq_len")
    process_index, process_count = _processes(process_index, process_count)
    allgather = allgather or _default_allgather(process_count)
    # Each process reads its share of the files at start-up and records on demand (see records.py).
    shard = Shard(process_index, process_count, allgather)
    train_tasks = train_stats = eval_tasks = eval_stats = None
    if data.eval_holdout is not None:  # one read of the training files gives both
        train_tasks, train_stats = _read(data, data.train, data.train_tasks, seed, shard, data.train_fields)
        train_tasks, eval_tasks = split_holdout(train_tasks, data.eval_holdout)
        eval_stats = train_stats  # the skips of the files it came from
        if want_eval:
            _log_holdout(data, eval_tasks)
    else:
        if train:
            train_tasks, train_stats = _read(
                data, data.train, data.train_tasks, seed, shard, data.train_fields
            )
        if want_eval:
            eval_tasks, eval_stats = _read(data, data.eval, data.eval_tasks, seed, shard)
    train_loader = eval_loader = None
    # both loaders lay the same rows out over the processes that read the files
    layout = RowLayout(seq_len, data.overlong, data.add_bos, shard)
    if train:
        plan = _mixture_plan(data, train_tasks, train_stats, seed, shard)
        train_loader = TrainLoader(
            train_tasks,
            tokenizer,
            global_batch_size=batch_size,
            eps=data.eps,
            seed=seed,
            state=state,
            skip_stats=train_stats,
            holdout=data.eval_holdout,
            plan=plan,
            demonstrations=data.demonstrations,
            layout=layout,
        )
    if want_eval:
        eval_loader = EvalLoader(
            eval_tasks,
            tokenizer,
            global_batch_size=eval_batch_size or batch_size,
            skip_stats=eval_stats,
            layout=layout,
        )
    return train_loader, eval_loader


def _mixture_plan(data: DataConfig, tasks: dict, stats: SkipStats, seed: int, shard: Shard):
    """data.mixture's plan over the training tasks and its slices (each slice path read once, its skips
    counted with the training files'); None without data.mixture."""
    if data.mixture is None:
        return None
    slice_tasks = {}
    # A slice's files are detected by their own suffix (data.format and the SNI templates are data.train's)
    as_detected = dataclasses.replace(data, format=AUTO, template="zero_shot", num_shots=0)
    for piece in data.mixture.slices:
        if piece.path is not None:
            found, their_stats = _read(as_detected, piece.path, None, seed, shard, piece.field_map)
            stats.counts.update(their_stats.counts)
            slice_tasks[piece.name] = found
    return plan_mixture(data.mixture, tasks, slice_tasks, data.eps)


def build_train_loader(cfg: Any, tokenizer, **kwargs) -> TrainLoader:
    """The train loader of `build_loaders` (same arguments), without reading any eval-only files; with
    data.eval_holdout the held-out instances are left out."""
    return build_loaders(cfg, tokenizer, eval=False, **kwargs)[0]


def build_eval_loader(cfg: Any, tokenizer, **kwargs) -> Optional[EvalLoader]:
    """The eval loader of `build_loaders` (same arguments): over data.eval, or over the held-out
    instances of the training tasks with data.eval_holdout; None when neither is set."""
    return build_loaders(cfg, tokenizer, train=False, **kwargs)[1]


__all__ = [
    "BATCH_KEYS",
    "DataConfig",
    "DataError",
    "DemonstrationsConfig",
    "EvalLoader",
    "Example",
    "Fields",
    "MixtureConfig",
    "MixtureStream",
    "PackStats",
    "RowLayout",
    "Packer",
    "Shard",
    "SkipStats",
    "TaskRecords",
    "TokenizedExample",
    "TrainLoader",
    "build_eval_loader",
    "build_loaders",
    "build_train_loader",
    "mixing_weights",
    "read_jsonl",
    "read_sni_task",
    "read_tasks",
    "row_arrays",
    "split_holdout",
    "templates",
    "tokenize_examples",
]
