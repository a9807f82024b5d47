"""`optiml-bench mix-report --config CONFIG [key=value ...] --examples N --json FILE`: the realised shares
of a training config's mixture (optiml_jax/data/mixture_report.py). Apart from cli/bench.py so that a
bench build starts without JAX (its workers are forked)."""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

from optiml_jax.cli.common import EXIT_BAD_INPUT, EXIT_FAILURE, CLIError, Parser, report
from optiml_jax.config import ConfigError
from optiml_jax.data import DataConfig, DataError
from optiml_jax.data.mixture_report import mixture_report
from optiml_jax.fileio import write_text_atomic
from optiml_jax.paths import resolve_path
from optiml_jax.run_config import load_run_config
from optiml_jax.tokenizer import OPTTokenizer


def _resolved(data: DataConfig) -> DataConfig:
    """data.train / data.train_tasks as fine-tuning resolves them (a shipped asset's name works too)."""
    fix = {}
    for name in ("train", "train_tasks"):
        value = getattr(data, name)
        if value is not None:
            fix[name] = tuple(map(resolve_path, value)) if isinstance(value, tuple) else resolve_path(value)
    return dataclasses.replace(data, **fix)


def mix_report(argv: Sequence[str]) -> int:
    """`optiml-bench mix-report --config CONFIG [key=value ...] --examples N --json FILE`: the realised shares
    of the stream (data/mixture_report.py); exit 2 with one line for bad input, 1 for other failures."""
    parser = Parser(prog="optiml-bench mix-report", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="training config (a file or a shipped name)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as fine-tuning takes them")
    parser.add_argument("--examples", type=int, default=20000, help="draws from the start of the stream")
    parser.add_argument("--json", required=True, help="where to write the report")
    try:
        args = parser.parse_args(argv)
        cfg = load_run_config(args.config, args.overrides)
        cfg = dataclasses.replace(cfg, data=_resolved(cfg.data))
        shares = mixture_report(cfg, _tokenizer(cfg), args.examples)
    except (CLIError, ConfigError, DataError, FileNotFoundError) as e:
        return report(e, EXIT_BAD_INPUT)
    try:
        write_text_atomic(args.json, json.dumps(shares, indent=2) + "\n")
    except OSError as e:
        return report(OSError(f"{args.json}: cannot write ({e.strerror})"), EXIT_FAILURE)
    for section in ("benchmarks", "slices"):
        for name, row in shares[section].items():
            target = "-" if row["target_share"] is None else f"{row['target_share']:.2%}"
            print(
                f"{name:>16} target {target:>7}  realised {row['realised_share']:.2%} of examples, "
                f"{row['realised_token_share']:.2%} of loss tokens; {row['tasks']} tasks "
                f"({row['capped_tasks']} capped)"
            )
    print(f"demonstrations per example: {shares['demonstrations_per_example']:.3f}; written to {args.json}")
    return 0


def _tokenizer(cfg):
    """The run's tokenizer: cfg.tokenizer, else the model directory's (a preset model needs cfg.tokenizer)."""
    if cfg.tokenizer is not None:
        return OPTTokenizer.from_pretrained(resolve_path(cfg.tokenizer))
    if cfg.model.startswith("preset:"):
        raise ConfigError(f"tokenizer is not set and model {cfg.model} has no tokenizer files")
    return OPTTokenizer.from_pretrained(resolve_path(cfg.model))
