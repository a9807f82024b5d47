"""Convert OPT / OPT-IML weights into an optiml_jax model directory, or back to Hugging Face.

    optiml-convert --input PATH --output DIR [--dtype float32|bfloat16|float16]
        [--config PRESET|config.json] [--tokenizer DIR] [--format hf|metaseq] [--overwrite]
    optiml-convert --to-hf --input DIR|RUN|RUN/checkpoints/STEP --output HFDIR [--max-shard-size 5GB]

(`python -m optiml_jax.convert_weights` and `python tools/convert_weights.py` are the same command.)
PATH is a Hugging Face OPT directory or weight file (pytorch_model.bin, model.safetensors, sharded
with *.index.json), or a metaseq checkpoint: one consolidated .pt file, or model-parallel parts
*model_part-K.pt (FSDP-flattened or not, raw *-model_part-K-shardN.pt shards too), given as the
directory or any one part file. With --to-hf, --input is one of our model directories (converted, or
a run's final model), a training checkpoint (RUN/checkpoints/STEP) or a fine-tuning workdir RUN (its
final model, else its latest checkpoint). Errors print one line, "error: ...", and leave no output
behind; the exit status is 2 for bad input (flags, a missing or damaged checkpoint), 1 for a failure
while writing (a full disk), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys

from optiml_jax.cli.common import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED, CLIError, Parser, report
from optiml_jax.config import DTYPES  # jax-free: --help stays fast


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="optiml-convert",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--input", required=True, help="checkpoint file or directory")
    parser.add_argument("--output", required=True, help="output directory (created atomically)")
    parser.add_argument(
        "--to-hf",
        action="store_true",
        help="export to Hugging Face format: one of our model directories, a training checkpoint "
        "(RUN/checkpoints/STEP) or a run's workdir (its final model, else latest checkpoint)",
    )
    parser.add_argument("--format", choices=("hf", "metaseq"), help="input format (default: detected)")
    parser.add_argument(
        "--dtype", choices=DTYPES, help="stored dtype (default: float32; with --to-hf: as stored)"
    )
    parser.add_argument(
        "--config",
        help="preset (e.g. 1.3b, opt-iml-max-30b) or config.json, when the checkpoint does not say enough",
    )
    parser.add_argument("--tokenizer", help="directory with the tokenizer files to ship with the model")
    parser.add_argument("--max-shard-size", default="5GB", help="with --to-hf: largest safetensors file")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.to_hf:
            # start-up cost: the checkpoint modules import jax and orbax, which --help does not need
            from optiml_jax.checkpoints.export import export_hf

            out = export_hf(
                args.input,
                args.output,
                max_shard_size=args.max_shard_size,
                dtype=args.dtype,
                overwrite=args.overwrite,
            )
            print(f"exported {args.input} -> {out} (Hugging Face format)")
        else:
            from optiml_jax.checkpoints.convert import convert  # start-up cost, as export_hf above

            summary = convert(
                args.input,
                args.output,
                dtype=args.dtype or "float32",
                config=args.config,
                tokenizer=args.tokenizer,
                overwrite=args.overwrite,
                fmt=args.format,
                progress=not args.no_progress and sys.stderr.isatty(),
            )
            print(summary)
    except KeyboardInterrupt:
        print("error: interrupted (no output written)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CLIError, ValueError, KeyError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        if os.environ.get("OPTIML_DEBUG"):
            raise
        return report(e, EXIT_BAD_INPUT)  # flags, or ours (all ValueError subclasses): a bad checkpoint
    except OSError as e:  # reading or writing failed: a full disk, a lost mount
        if os.environ.get("OPTIML_DEBUG"):
            raise
        return report(e, EXIT_FAILURE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
