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
import logging
import sys
from typing import Optional, Sequence

from optiml_jax.bench.build import DROP_CHOICES, BenchSettings, WorkerDied, build_bench
from optiml_jax.bench.tasks import BENCHMARKS, BenchError
from optiml_jax.cli.common import EXIT_BAD_INPUT, EXIT_FAILURE, CLIError, Parser, report
from optiml_jax.config import ASSETS_DIR
from optiml_jax.fileio import OutputDirError

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
        # fork safety: run_config brings in the evaluation stack and with it JAX, whose threads a build's
        # forked workers must not inherit, so only mix-report imports it
        from optiml_jax.cli.mix_report import mix_report

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
    except (OSError, WorkerDied) as e:
        return report(e, EXIT_FAILURE)
    print(
        f"wrote {args.output}: {result.train_examples:,} train and {result.eval_examples:,} evaluation "
        f"examples, {len(result.overlap)} overlapping pairs (report.md) in {result.timings['build']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
