"""What every command shares: the exit codes, the error type and its one-line `error: ...` printing,
the multi-host flags and start, the --mesh flag, and the console logging.

Exit codes, the same in every command (README, "Exit codes"):
    0  done
    1  a runtime failure (out of memory, non-finite training steps, a download that failed mid-way)
    2  bad input or configuration: a flag, a config key, a missing or damaged file, a model that
       cannot run here; always before anything is written
"""

from __future__ import annotations

import argparse
import logging
import sys

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # the shell's 128 + SIGINT: Ctrl-C before there was anything to save


class CLIError(Exception):
    """Bad command-line input: one line on stderr, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse that raises CLIError instead of printing the usage and exiting, so a bad flag is one
    `error: ...` line like every other bad input."""

    def error(self, message):
        raise CLIError(message)

    @classmethod
    def from_doc(cls, prog: str, doc: str) -> "Parser":
        """A command's parser whose --help is its module docstring: the first paragraph above the flags,
        the rest (examples, exit codes) below them, as written."""
        description, epilog = doc.split("\n\n", 1)
        return cls(
            prog=prog,
            description=description,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )


def one_line(error: BaseException) -> str:
    """The error's message on one line (the type's name when it has none)."""
    return " ".join(str(error).split()) or type(error).__name__


def report(error: BaseException, status: int) -> int:
    """Prints `error: MESSAGE` on stderr and returns `status`, for `return report(e, EXIT_BAD_INPUT)`.

    The command ends here, so what is still pending is abandoned: Orbax's other reads of a damaged
    checkpoint fail too, and Python reports them when they are collected ("Exception ignored in
    <coroutine ...>", asyncio's "Future exception was never retrieved"), each with TensorStore's spec
    dump. The one line above already says what is wrong."""
    # one write, newline included: a reader thread's output must not land inside the line
    sys.stderr.write(f"error: {one_line(error)}\n")
    sys.stderr.flush()
    sys.unraisablehook = _drop_unraisable
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    return status


def _drop_unraisable(unraisable) -> None:
    del unraisable


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--coordinator", default=None, help="host:port of process 0 for jax.distributed.initialize"
    )
    parser.add_argument("--num-processes", type=int, default=None, help="number of processes (hosts)")
    parser.add_argument("--process-id", type=int, default=None, help="this process's index")
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() with auto-detection (TPU pod, SLURM, Open MPI)",
    )


def init_distributed(args: argparse.Namespace) -> None:
    """Multi-host setup before any other JAX call. Explicit flags win; --distributed (or a multi-host
    TPU / SLURM / Open MPI environment, which JAX detects) uses auto-detection."""
    import jax  # start-up cost: `--help` and argument errors answer without importing jax

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


def mesh_flag(text: str):
    """--mesh "data=-1,tensor=2" as a sharding.MeshConfig; CLIError naming the text when it is not one."""
    # start-up cost: sharding imports jax, which flag errors and --help do not need
    from optiml_jax.sharding import MeshConfig

    try:
        return MeshConfig.parse(text)
    except ValueError as e:
        raise CLIError(str(e)) from None


def set_up_logging() -> None:
    """INFO lines of our loggers on stderr, the libraries' chatter at WARNING. Only the root logger gets
    a handler: one added to a package logger as well would print every line twice."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
