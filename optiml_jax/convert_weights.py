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
final model, else its latest checkpoint). Errors, bad arguments included, print one line,
"error: ...", exit with status 1 and leave no output behind.
"""

from __future__ import annotations

import argparse
import os
import sys

from optiml_jax.config import DTYPES  # jax-free: --help stays fast


class UsageError(Exception):
    """A bad command line: one line and status 1, like every other error of this command."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the usage too, and exit with 2
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
            from optiml_jax.checkpoints.convert import convert

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
        return 130
    except (UsageError, ValueError, OSError, KeyError) as e:  # ours (all ValueError subclasses), I/O errors
        if os.environ.get("OPTIML_DEBUG"):
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
