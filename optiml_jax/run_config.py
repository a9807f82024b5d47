"""The fine-tuning run configuration: a YAML file (plus `key.path=value` overrides) validated into
dataclasses.

    cfg = load_run_config("demo", ["train.max_steps=3", "optim.lr=1e-4"])

Every section is a frozen dataclass; an unknown key or a value of the wrong type or range raises
ConfigError naming the key (`train.max_stpes`, `optim.lr`), so a typo never silently falls back to a
default. Override values are parsed as YAML scalars (`3`, `1e-4`, `true`, `null`, `[a, b]`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from optiml_jax.config import ASSETS_DIR, DTYPES, HEAD_POSITIONS, ConfigError
from optiml_jax.data import DataConfig, Fields
from optiml_jax.data.formats import format_choices
from optiml_jax.eval.prompts import PROMPT_TEMPLATES
from optiml_jax.model.kernels import IMPLEMENTATIONS
from optiml_jax.model.remat import REMAT_POLICIES
from optiml_jax.paths import resolve_path
from optiml_jax.sharding import MeshConfig

# The shipped run configs: `--config NAME` is CONFIGS_DIR/NAME.yaml; `python -m optiml_jax.finetune`
# without --config runs the demo.
CONFIGS_DIR = ASSETS_DIR / "configs"
DEMO_CONFIG = CONFIGS_DIR / "demo.yaml"
HOLDOUT = "holdout"  # eval.tasks.data: the held-out instances of data.eval_holdout
SCHEDULES = ("linear", "cosine", "constant")


@dataclasses.dataclass(frozen=True)
class TrainSection:
    max_steps: int = 1000
    batch_size: int = 8  # global, in packed sequences of seq_len tokens
    seq_len: int = 512
    grad_accum_steps: int = 1  # microbatches per step (lax.scan inside the step); batch_size must divide
    compute_dtype: str = "float32"  # activations/matmuls; params and Adam state stay float32
    param_dtype: str = "float32"  # master weights
    remat_policy: str = "none"  # model.REMAT_POLICIES
    scan_layers: bool = True
    # The attention kernel (model/kernels IMPLEMENTATIONS): auto = per platform and dtype (CPU:
    # blockwise; GPU bfloat16/float16: cuDNN; TPU: splash), logged with the reason at start.
    attention: str = "auto"
    # Where the LM head and loss run: "weighted" = only positions with loss (a prompt's positions have
    # none; loss.py gathers the others), "all" = every position. Same loss and gradients either way.
    head_positions: str = "weighted"
    dropout: Optional[float] = None  # null: the model config's value (OPT: 0.1)
    attention_dropout: Optional[float] = None  # null: the model config's value
    embed_dropout: bool = True  # metaseq/OPT-IML also drop out the input embeddings, at `dropout`
    max_nonfinite_in_a_row: int = 10  # skipped (non-finite) updates in a row before the run stops
    log_every_steps: int = 10
    peak_flops_per_device: float = 0.0  # for MFU; 0 = measure a large matmul in compute_dtype at start
    # Device memory the start-up check (memory.check_fits) compares the estimate with; 0 = the device's own
    # limit (host RAM / local devices on CPU). The OPTIML_JAX_MEMORY_LIMIT_GIB environment variable overrides.
    memory_limit_gib: float = 0.0
    # Which parameters train: a regular expression searched in each "/"-joined parameter path
    # ("decoder/embed_tokens/embedding"); null = all (train/trainable.py).
    trainable: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class OptimSection:
    lr: float = 5e-5  # peak
    warmup_steps: int = 60  # linear from 0
    schedule: str = "linear"  # after warmup: linear (to end_lr_ratio * lr at max_steps), cosine, constant
    end_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    # metaseq's Adam default; OPT-IML does not state one (opt_formats.md 5.4). Decoupled (AdamW), never
    # applied to biases, LayerNorm or (1-D) parameters.
    weight_decay: float = 0.0
    clip_norm: float = 1.0  # global gradient norm; 0 = no clipping


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    every_steps: int = 500  # 0 = only at the end (and on SIGTERM)
    keep: int = 2  # most recent checkpoints kept
    async_save: bool = True
    save_final: bool = True  # workdir/final in our converted-model format


@dataclasses.dataclass(frozen=True)
class EvalTasksSection:
    """Held-out task metrics (exact match, ROUGE-L) of greedy answers, at every evaluation (optiml_jax/eval/).
    The keys are `python -m optiml_jax.evaluate`'s flags."""

    data: str = HOLDOUT  # SNI task file(s) or JSONL; "holdout" = the data.eval_holdout instances
    split: Optional[str] = None  # split file listing the tasks of `data` (SNI)
    format: str = "auto"  # auto or a registered data format (data/formats/): sni, jsonl, parquet
    fields: Optional[str] = (
        None  # JSONL keys / Parquet columns, as evaluate's --fields: src=inputs,tgt=targets
    )
    max_instances: int = 100  # first N instances of each task (SNI's protocol); 0 = all
    shots: int = 0  # the task's first K positive examples in the prompt
    template: str = "optiml"  # optiml (the training template, fixed delimiter) or tk_instruct
    delimiter: str = "\nOutput:"
    max_new_tokens: int = 256
    batch_size: Optional[int] = None  # null = eval.batch_size, else train.batch_size
    stop: tuple[str, ...] = ()  # answers are cut before the first of these strings
    mode: str = "auto"  # auto (rank tasks with options, generate the rest), generate, rank
    max_options: int = 10  # mode rank: SNI tasks with at most this many distinct outputs are ranked

    def __post_init__(self):
        if self.template not in PROMPT_TEMPLATES:
            raise ConfigError(f"template={self.template!r} is not one of {', '.join(PROMPT_TEMPLATES)}")
        if self.mode not in ("auto", "generate", "rank"):
            raise ConfigError(f"mode={self.mode!r} is not one of auto, generate, rank")
        if self.max_options < 2:
            raise ConfigError(f"max_options must be >= 2, got {self.max_options}")
        if self.format not in format_choices():
            raise ConfigError(f"format={self.format!r} is not one of {', '.join(format_choices())}")
        try:
            Fields.from_text(self.fields)
        except ValueError as e:
            raise ConfigError(f"fields: {e}") from None
        for name, low in (("max_instances", 0), ("shots", 0), ("max_new_tokens", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclasses.dataclass(frozen=True)
class EvalSection:
    every_steps: int = 500  # 0 = only at the end
    batch_size: Optional[int] = None  # null = train.batch_size
    max_batches: int = 0  # 0 = the whole eval set
    num_samples: int = 2  # greedy generations printed for held-out prompts at the end
    sample_max_new_tokens: int = 32
    tasks: Optional[EvalTasksSection] = None  # null = loss only
    suite: Optional[str] = None  # a suite file (configs/eval/): selection score, best/ (train/suite_hook.py)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: str = ""  # converted checkpoint dir, HF dir or hub id, or "preset:NAME" (random init)
    tokenizer: Optional[str] = None  # null = the model directory's tokenizer
    workdir: str = "runs/default"
    seed: int = 1234
    data: DataConfig = DataConfig()
    train: TrainSection = TrainSection()
    optim: OptimSection = OptimSection()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointSection = CheckpointSection()
    eval: EvalSection = EvalSection()

    @property
    def eval_batch_size(self) -> int:
        """eval.batch_size, or train.batch_size when it is null."""
        return self.eval.batch_size or self.train.batch_size

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["data"] = self.data.to_dict()
        if out["eval"]["tasks"] is not None:  # YAML has lists, not tuples
            out["eval"]["tasks"]["stop"] = list(out["eval"]["tasks"]["stop"])
        return out


SECTIONS = {
    "train": TrainSection,
    "optim": OptimSection,
    "mesh": MeshConfig,
    "checkpoint": CheckpointSection,
    "eval": EvalSection,
}


# ---------------------------------------------------------------------- parsing
def _check_type(name: str, value: Any, annotation: Any) -> Any:
    """`value` coerced to the annotated type (ints are accepted for floats), else ConfigError."""
    if isinstance(annotation, str):
        annotation = {
            "int": int,
            "float": float,
            "str": str,
            "bool": bool,
            "Optional[int]": Optional[int],
            "Optional[float]": Optional[float],
            "Optional[str]": Optional[str],
        }[annotation]
    optional = typing.get_origin(annotation) is typing.Union and type(None) in typing.get_args(annotation)
    if optional:
        if value is None:
            return None
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str) and value:
            return value
        raise ConfigError(f"{name} must be a non-empty string, got {value!r}")
    if typing.get_origin(annotation) is tuple:  # tuple[str, ...]: a list of strings, or one string
        items = [value] if isinstance(value, str) else value
        if isinstance(items, (list, tuple)) and all(isinstance(v, str) and v for v in items):
            return tuple(items)
        raise ConfigError(f"{name} must be a list of non-empty strings, got {value!r}")
    if dataclasses.is_dataclass(annotation):
        return _section(annotation, value, name)
    return value


def _section(cls, data: Any, prefix: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix} must be a mapping of keys to values, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}.{unknown[0]} (known {prefix} keys: {', '.join(fields)})"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {key: _check_type(f"{prefix}.{key}", value, hints[key]) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except (ConfigError, ValueError) as e:
        raise ConfigError(f"{prefix}: {e}") from None


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(cfg: RunConfig) -> None:
    """Range and consistency checks across sections (types were checked while parsing)."""
    t, o, c, e = cfg.train, cfg.optim, cfg.checkpoint, cfg.eval
    _require(bool(cfg.model), "model is not set (a checkpoint directory, a hub id or preset:NAME)")
    # Checkpoints, metrics and the final model are written with plain file I/O: object storage must be
    # mounted.
    _require(
        "://" not in cfg.workdir,
        f"workdir={cfg.workdir!r}: a URL is not supported; use a filesystem path "
        "every host can write (local disk for one host; NFS, Lustre or a bucket mounted with gcsfuse)",
    )
    for name in ("max_steps", "batch_size", "seq_len", "grad_accum_steps", "log_every_steps"):
        _require(getattr(t, name) >= 1, f"train.{name} must be >= 1, got {getattr(t, name)}")
    _require(
        t.batch_size % t.grad_accum_steps == 0,
        f"train.batch_size={t.batch_size} is not divisible by train.grad_accum_steps={t.grad_accum_steps}",
    )
    _require(
        t.compute_dtype in DTYPES,
        f"train.compute_dtype={t.compute_dtype!r} is not one of {', '.join(DTYPES)}",
    )
    _require(
        t.param_dtype in DTYPES, f"train.param_dtype={t.param_dtype!r} is not one of {', '.join(DTYPES)}"
    )
    if t.trainable is not None:
        try:
            re.compile(t.trainable)
        except re.error as e:
            raise ConfigError(f"train.trainable={t.trainable!r} is not a regular expression ({e})") from None
    _require(
        t.remat_policy in REMAT_POLICIES,
        f"train.remat_policy={t.remat_policy!r} is not one of {', '.join(REMAT_POLICIES)}",
    )
    _require(
        t.attention in IMPLEMENTATIONS,
        f"train.attention={t.attention!r} is not one of {', '.join(IMPLEMENTATIONS)}",
    )
    _require(
        t.head_positions in HEAD_POSITIONS,
        f"train.head_positions={t.head_positions!r} is not one of {', '.join(HEAD_POSITIONS)}",
    )
    for name in ("dropout", "attention_dropout"):
        value = getattr(t, name)
        _require(value is None or 0.0 <= value < 1.0, f"train.{name} must be in [0, 1) or null, got {value}")
    _require(
        t.max_nonfinite_in_a_row >= 1,
        f"train.max_nonfinite_in_a_row must be >= 1, got {t.max_nonfinite_in_a_row}",
    )
    _require(t.peak_flops_per_device >= 0, "train.peak_flops_per_device must be >= 0")
    _require(
        t.memory_limit_gib >= 0,
        f"train.memory_limit_gib must be >= 0 (0 = the device's), got {t.memory_limit_gib}",
    )
    _require(o.lr > 0, f"optim.lr must be positive, got {o.lr}")
    _require(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    _require(o.schedule in SCHEDULES, f"optim.schedule={o.schedule!r} is not one of {', '.join(SCHEDULES)}")
    _require(0.0 <= o.end_lr_ratio <= 1.0, f"optim.end_lr_ratio must be in [0, 1], got {o.end_lr_ratio}")
    for name in ("b1", "b2"):
        _require(0.0 <= getattr(o, name) < 1.0, f"optim.{name} must be in [0, 1), got {getattr(o, name)}")
    _require(o.eps > 0, f"optim.eps must be positive, got {o.eps}")
    _require(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    _require(o.clip_norm >= 0, f"optim.clip_norm must be >= 0 (0 = no clipping), got {o.clip_norm}")
    _require(c.every_steps >= 0, f"checkpoint.every_steps must be >= 0, got {c.every_steps}")
    _require(c.keep >= 1, f"checkpoint.keep must be >= 1, got {c.keep}")
    _require(e.every_steps >= 0, f"eval.every_steps must be >= 0, got {e.every_steps}")
    _require(e.batch_size is None or e.batch_size >= 1, f"eval.batch_size must be >= 1, got {e.batch_size}")
    for name in ("max_batches", "num_samples", "sample_max_new_tokens"):
        _require(getattr(e, name) >= 0, f"eval.{name} must be >= 0, got {getattr(e, name)}")
    if e.tasks is not None and e.tasks.data == HOLDOUT:
        _require(
            cfg.data.eval_holdout is not None,
            "eval.tasks.data=holdout evaluates the instances held out by "
            "data.eval_holdout, which is not set; set it, or give eval.tasks.data a path of tasks",
        )
        _require(
            e.tasks.split is None,
            "eval.tasks.split selects tasks of a path; eval.tasks.data=holdout has none",
        )
    try:
        cfg.mesh.resolve(max(1, abs(cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.tensor)))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def from_dict(data: Any, source: str = "config") -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(map(str, data)) - known)
    if unknown:
        raise ConfigError(
            f"unknown config key {unknown[0]} (known top-level keys: {', '.join(sorted(known))})"
        )
    kwargs: dict[str, Any] = {}
    for key in ("model", "tokenizer", "workdir"):
        if key in data:
            value = data[key]
            _require(
                value is None and key == "tokenizer" or isinstance(value, str) and value != "",
                f"{key} must be a non-empty string, got {value!r}",
            )
            kwargs[key] = value
    if "seed" in data:
        kwargs["seed"] = _check_type("seed", data["seed"], int)
    if "data" in data:
        try:
            kwargs["data"] = DataConfig.from_dict(data["data"] or {}, source="data")
        except ConfigError as e:
            message = str(e)
            raise ConfigError(
                message.replace("data: unknown data key(s): ", "unknown config key data.")
            ) from None
    for name, cls in SECTIONS.items():
        if name in data:
            kwargs[name] = _section(cls, data[name], name)
    cfg = RunConfig(**kwargs)
    validate(cfg)
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.max_steps=3` -> (["train", "max_steps"], 3); the value is a YAML scalar or list."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} is not key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    data = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
            node[part] = child = dict(child)
            node = child
        node[path[-1]] = value
    return data


def load_run_config(path: Optional[str | os.PathLike] = None, overrides: Sequence[str] = ()) -> RunConfig:
    """The YAML file at `path` (see `config_path`; the demo config when None) with `overrides` applied,
    validated. Its relative model/tokenizer/data paths are resolved when used (`resolve_path`).
    """
    given, path = path, config_path(path) if path is not None else DEMO_CONFIG
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        shipped = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")))
        raise ConfigError(
            f"config file {given} not found (the shipped configs, by name: {shipped})"
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    data = apply_overrides(data, overrides)
    return from_dict(data, source=str(path))


# ---------------------------------------------------------------------- resume compatibility
# Keys that may differ between the run that wrote a workdir's checkpoints and the run resuming from them:
# they change cadence, logging, evaluation, layout or memory, not the trained parameters. (max_steps is
# allowed to extend or shorten a run; note that the linear/cosine decay is over the NEW max_steps from the
# resumed step on.) A key matches when it equals one of these or starts with one followed by ".".
RESUME_SAFE_KEYS = (
    "workdir",
    "train.max_steps",
    "train.log_every_steps",
    "train.peak_flops_per_device",
    "train.max_nonfinite_in_a_row",
    "train.memory_limit_gib",
    "train.remat_policy",
    "train.attention",
    "train.head_positions",
    "mesh",
    "checkpoint",
    "eval",
    "data.eval",
    "data.eval_tasks",
    "data.on_error",
)


def flatten_config(data: Any, prefix: str = "") -> dict:
    """{"train.max_steps": 4, ...} from a nested to_dict(); lists become tuples."""
    out = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten_config(value, f"{prefix}{key}."))
        return out
    out[prefix[:-1]] = tuple(data) if isinstance(data, list) else data
    return out


def resume_safe(key: str) -> bool:
    return any(key == safe or key.startswith(safe + ".") for safe in RESUME_SAFE_KEYS)


def resume_conflicts(saved: dict, current: dict) -> list[str]:
    """Keys (dotted) whose values differ between a saved and the current config (to_dict() form) and
    that change the result of a resumed run: "train.seq_len: 64 -> 128"."""
    old, new = flatten_config(saved), flatten_config(current)
    defaults = flatten_config(RunConfig(model="x").to_dict())

    def is_default(key, value):
        return key in defaults and defaults[key] == value

    conflicts = []
    for key in sorted(set(old) | set(new)):
        if resume_safe(key):
            continue
        if key not in new and key in old and is_default(key, old[key]):
            continue  # a key a newer version added, at its default
        if key not in old and is_default(key, new.get(key)):
            continue
        if old.get(key, "<unset>") != new.get(key, "<unset>"):
            conflicts.append(f"{key}: {old.get(key, '<unset>')!r} -> {new.get(key, '<unset>')!r}")
    return conflicts


def config_path(value: str | os.PathLike) -> Path:
    """--config: a file (as `resolve_path` finds it), or a shipped config by name (`demo`, `optiml-1.3b`)."""
    path = Path(resolve_path(str(value)))
    if not path.exists() and path.parent == Path(".") and path.suffix not in (".yaml", ".yml"):
        return CONFIGS_DIR / f"{path.name}.yaml"
    return path


__all__ = [
    "RunConfig",
    "TrainSection",
    "OptimSection",
    "CheckpointSection",
    "EvalSection",
    "MeshConfig",
    "DataConfig",
    "load_run_config",
    "from_dict",
    "apply_overrides",
    "parse_override",
    "resolve_path",
    "config_path",
    "CONFIGS_DIR",
    "DEMO_CONFIG",
    "RESUME_SAFE_KEYS",
    "resume_conflicts",
    "flatten_config",
]
