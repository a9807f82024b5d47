"""`optiml-bench`: OPT-IML Bench from the collections (`build`, optiml_jax/bench/), and what a training
config's mixture draws (`mix-report`, optiml_jax/data/mixture_report.py).

    optiml-bench build --collection sni=natural-instructions/tasks --collection flan=flan/ \\
        [--registry configs/bench/registry.yaml] [--split configs/bench/optiml.yaml] --output data/optiml
    optiml-bench mix-report --config optiml-1.3b [key=value ...] --examples 20000 --json mix.json

Bad input (a collection path, registry, split file, task name, config key) is one line on stderr and
exit 2; a failure while building (disk full, a worker killed) exit 1."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from optiml_jax.bench.build import DROP_CHOICES, BenchSettings, build_bench
from optiml_jax.bench.tasks import BENCHMARKS, BenchError
from optiml_jax.cli.common import EXIT_BAD_INPUT, EXIT_FAILURE, CLIError, Parser, report
from optiml_jax.config import ASSETS_DIR, ConfigError
from optiml_jax.data import DataConfig, DataError
from optiml_jax.data.mixture_report import mixture_report
from optiml_jax.fileio import OutputDirError
from optiml_jax.paths import resolve_path
from optiml_jax.run_config import load_run_config
from optiml_jax.tokenizer import OPTTokenizer

# The shipped registry and split file (configs/bench/, shipped in the wheel as assets/configs/bench/).
CONFIGS = ASSETS_DIR / "configs" / "bench"


def _collection(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not path or name not in BENCHMARKS:
        raise BenchError(
            f"--collection {text!r}: expected NAME=PATH with NAME one of {', '.join(BENCHMARKS)}"
        )
    return name, path


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = Parser(prog="optiml-bench", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build train/dev/test from the collections")
    # parsed by mix_report (main dispatches to it first); listed here for --help
    commands.add_parser(
        "mix-report", help="the realised shares of a training config's mixture", add_help=False
    )
    build.error = parser.error
    add = build.add_argument
    add("--collection", action="append", required=True, metavar="NAME=PATH", help="once per collection")
    add("--registry", default=str(CONFIGS / "registry.yaml"), help="task categories, sources, instructions")
    add("--split", default=str(CONFIGS / "optiml.yaml"), help="held-out categories and tasks, dev tasks")
    add("--output", required=True, help="the bench directory (written atomically)")
    add("--overwrite", action="store_true", help="replace an existing --output")
    add("--seed", type=int, default=0)
    add("--max-per-task", type=int, default=100_000, help="examples kept per task (random draw)")
    add("--max-per-task-flan", type=int, default=30_000, help="the same, for FLAN tasks")
    add("--max-dev-per-task", type=int, default=250, help="dev examples per task")
    add("--overlap-threshold", type=float, default=0.01, help="report pairs over this 13-gram fraction")
    add("--drop-overlapping", choices=DROP_CHOICES, default="none", help="remove the train task of each pair")
    add("--workers", type=int, default=None, help="processes (default: every core)")
    add("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    collections = dict(_collection(text) for text in args.collection)
    if len(collections) != len(args.collection):
        raise BenchError("--collection: a collection is given twice")
    args.collections = collections
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["mix-report"]:
        return mix_report(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args = parse_args(argv)
        # every setting has the flag of its name (--max-per-task -> max_per_task)
        settings = BenchSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchSettings)})
        result = build_bench(
            args.collections, args.registry, args.split, args.output, settings, args.overwrite, not args.quiet
        )
    except (CLIError, BenchError, OutputDirError, ValueError) as e:  # ValueError: the readers' DataError too
        return report(e, EXIT_BAD_INPUT)
    except OSError as e:
        return report(e, EXIT_FAILURE)
    print(
        f"wrote {args.output}: {result.train_examples:,} train and {result.eval_examples:,} evaluation "
        f"examples, {len(result.overlap)} overlapping pairs (report.md) in {result.timings['build']:.0f} s"
    )
    return 0


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
        Path(args.json).write_text(json.dumps(shares, indent=2) + "\n", encoding="utf-8")
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


if __name__ == "__main__":
    sys.exit(main())
