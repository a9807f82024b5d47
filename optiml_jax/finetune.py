"""Fine-tune OPT / OPT-IML: `optiml-finetune --config FILE.yaml|NAME [key.path=value ...]` (installed
with the package; the same as `python -m optiml_jax.finetune`).

Without --config the demo (`--config demo`, configs/demo.yaml) runs: a tiny model on the SNI sample
shipped in data/sni. NAME is a config shipped in the package (demo, optiml-1.3b, optiml-30b); a
relative path that does not exist from the working directory is looked up there too
(optiml_jax/assets/), so the shipped configs run from any directory.
Running again with the same workdir resumes from its latest checkpoint (exactly: same data order,
dropout and optimizer state); a config that would change the result is refused, naming the keys,
unless --overwrite starts afresh. SIGTERM saves a checkpoint and exits. On several hosts run the same
command on every host: --distributed (jax.distributed.initialize() detects TPU pods, SLURM and Open
MPI), or --coordinator/--num-processes/--process-id explicitly elsewhere. Only process 0 logs.

A configuration or data error (a mesh that does not fit the devices, a batch they do not divide, a
dtype outside float32/bfloat16/float16 included) prints one line on stderr and exits with status 2,
before anything is compiled; a run that cannot fit in memory or cannot continue (non-finite steps)
prints the reason and exits with status 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

EXIT_CONFIG_ERROR = 2


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m optiml_jax.finetune",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    parser.add_argument(
        "--coordinator",
        default=None,
        help="host:port of process 0 for jax.distributed.initialize (multi-host)",
    )
    parser.add_argument("--num-processes", type=int, default=None, help="number of processes (hosts)")
    parser.add_argument("--process-id", type=int, default=None, help="this process's index")
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() with auto-detection (TPU pod, SLURM, Open MPI)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in a workdir holding another run (its checkpoints, metrics and final "
        "model are deleted)",
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


def init_distributed(args: argparse.Namespace) -> None:
    """Multi-host setup before any other JAX call. Explicit flags win; --distributed (or a multi-host
    TPU / SLURM / Open MPI environment, which JAX detects) uses auto-detection."""
    import jax

    explicit = {
        "coordinator_address": args.coordinator,
        "num_processes": args.num_processes,
        "process_id": args.process_id,
    }
    if not args.distributed and all(v is None for v in explicit.values()):
        return
    # Host (CPU) devices need a collectives implementation to span processes; GPU/TPU ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if any(v is not None for v in explicit.values()):
        jax.distributed.initialize(**{k: v for k, v in explicit.items() if v is not None})
    else:
        jax.distributed.initialize()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from optiml_jax.config import ConfigError
    from optiml_jax.run_config import load_run_config

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = load_run_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.aot:
        from optiml_jax.aot.train import finetune_aot  # imported with --aot only: start-up cost

        return finetune_aot(cfg, args.aot, args.aot_report)

    init_distributed(args)
    import jax

    if jax.process_index() != 0:  # logs come from process 0; the others report only problems
        logging.getLogger().setLevel(logging.WARNING)
    from optiml_jax.data import DataError
    from optiml_jax.train import TrainingError, train_and_evaluate
    from optiml_jax.train.memory import InsufficientMemoryError

    try:
        result = train_and_evaluate(cfg, progress=not args.no_progress, overwrite=args.overwrite)
    except (ConfigError, DataError, FileNotFoundError, NotADirectoryError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except (TrainingError, InsufficientMemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    if jax.process_index() == 0:
        if result.interrupted:
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
                from optiml_jax.eval.runner import progress_table

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


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split("\n"))


if __name__ == "__main__":
    sys.exit(main())
