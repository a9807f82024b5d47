"""Fine-tune OPT / OPT-IML: `optiml-finetune --config FILE.yaml|NAME [key.path=value ...]` (installed
with the package; the same as `python -m optiml_jax.finetune`).

Without --config the demo (`--config demo`, configs/demo.yaml) runs: a tiny model on the SNI sample
shipped in data/sni. NAME is a config shipped in the package (demo, optiml-1.3b, optiml-30b); a
relative path that does not exist from the working directory is looked up there too
(optiml_jax/assets/), so the shipped configs run from any directory.
Running again with the same workdir resumes from its latest checkpoint (exactly: same data order,
dropout and optimizer state); a config that would change the result is refused, naming the keys,
unless --overwrite starts afresh; a run that already finished there is left as it is. SIGTERM and the
first Ctrl-C save a checkpoint and exit (a second Ctrl-C exits at once). A workdir holding files a run
did not write is refused unless --overwrite, and a run never deletes them. On several hosts run the same
command on every host: --distributed (jax.distributed.initialize() detects TPU pods, SLURM and Open
MPI), or --coordinator/--num-processes/--process-id explicitly elsewhere. Only process 0 logs.

A configuration or data error (a mesh that does not fit the devices, a batch they do not divide, a
dtype outside float32/bfloat16/float16 included) prints one line on stderr and exits with status 2,
before anything is compiled; a run that cannot fit in memory or cannot continue (non-finite steps, a
full disk) prints the reason and exits with status 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

import jax

from optiml_jax.aot.train import finetune_aot
from optiml_jax.checkpoints.mapping import WeightsError
from optiml_jax.checkpoints.model_format import CheckpointError
from optiml_jax.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    CLIError,
    Parser,
    add_distributed_flags,
    init_distributed,
    report,
    set_up_logging,
)
from optiml_jax.config import ConfigError
from optiml_jax.data import DataError
from optiml_jax.eval.runner import progress_table
from optiml_jax.eval.suite import SuiteError
from optiml_jax.fileio import OutputDirError
from optiml_jax.model.attention import AttentionError
from optiml_jax.run_config import load_run_config
from optiml_jax.train import TrainingError, train_and_evaluate
from optiml_jax.train.memory import InsufficientMemoryError


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = Parser.from_doc("optiml-finetune", __doc__)
    parser.add_argument(
        "--config",
        default=None,
        help="run config YAML, or the name of a shipped one: demo (the default), optiml-1.3b, optiml-30b",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key.path=value",
        help="config overrides, e.g. train.max_steps=100 optim.lr=3e-5 mesh.fsdp=8",
    )
    add_distributed_flags(parser)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in a workdir holding another run (what that run wrote is deleted), or beside "
        "files a run did not write (they are kept)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--aot",
        metavar="TARGET",
        default=None,
        help="compile the train step for TARGET (tpu:v4-64, gpu:8xa100-80, ...) on this host and report "
        "its memory per device; nothing is trained (needs the aot-tpu / aot-gpu extra)",
    )
    parser.add_argument("--aot-report", metavar="FILE", default=None, help="with --aot: the report as JSON")
    # intermixed: overrides may come before or after the flags (`--overwrite train.max_steps=10`)
    return parser.parse_intermixed_args(argv)


# Before training, every error type of the project is a ValueError (ConfigError, DataError,
# CheckpointError, SuiteError, OutputDirError, AttentionError, ...): bad input, like a path that is not
# there. Once the run is going, only the project's own input errors are: another ValueError there is a
# bug, and keeps its traceback. TrainingError and InsufficientMemoryError are RuntimeErrors: the input
# was fine, the run could not go on.
MISSING_PATH = (FileNotFoundError, NotADirectoryError, IsADirectoryError)
BAD_INPUT = (CLIError, ValueError, *MISSING_PATH)
BAD_INPUT_IN_RUN = (
    CLIError,
    ConfigError,
    DataError,
    CheckpointError,
    SuiteError,
    OutputDirError,
    AttentionError,
    WeightsError,
    *MISSING_PATH,
)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = parse_args(argv)
        set_up_logging()
        cfg = load_run_config(args.config, args.overrides)
        if args.aot:
            return finetune_aot(cfg, args.aot, args.aot_report)
    except BAD_INPUT as e:
        return report(e, EXIT_BAD_INPUT)

    init_distributed(args)
    if jax.process_index() != 0:  # logs come from process 0; the others report only problems
        logging.getLogger().setLevel(logging.WARNING)
    try:
        result = train_and_evaluate(cfg, progress=not args.no_progress, overwrite=args.overwrite)
    except BAD_INPUT_IN_RUN as e:
        return report(e, EXIT_BAD_INPUT)
    except (TrainingError, InsufficientMemoryError) as e:
        return report(e, EXIT_FAILURE)
    except OSError as e:  # reading or writing failed: a full disk, a lost mount; the input may be fine
        return report(e, EXIT_FAILURE)
    except KeyboardInterrupt:  # Ctrl-C before the steps began (during them it stops the run cleanly)
        print("interrupted before training began; nothing was saved", file=sys.stderr)
        return EXIT_INTERRUPTED

    if jax.process_index() == 0:
        if result.already_finished:
            print(f"nothing to do: {cfg.workdir} holds a run that finished at step {result.step}")
        elif result.interrupted:
            print(f"stopped at step {result.step}; run the same command again to resume from {cfg.workdir}")
        else:
            evals = ", ".join(f"{step}: {loss:.3f}" for step, loss in sorted(result.eval_losses.items()))
            print(
                f"done: step {result.step}, workdir {cfg.workdir}"
                + (f"; eval loss by step {{{evals}}}" if evals else "")
            )
            if result.final_dir:
                print(f"final model: {result.final_dir}")
            if result.task_metrics:
                print(
                    "\nheld-out tasks at the first and last evaluated steps, in percent: exact match "
                    "(EM) and "
                    f"ROUGE-L (RL), or for ranked tasks acc and acc_norm (predictions and report.md in "
                    f"{cfg.workdir}/eval/<step>/):"
                )
                print(progress_table(result.task_metrics))
            for prompt, reference, generation in result.samples:
                tail = prompt[-300:].replace("\n", "\n    ")
                print(
                    f"\n--- eval prompt (last 300 chars):\n    ...{tail}\n"
                    f"--- reference: {reference!r}\n--- model:     {generation!r}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
