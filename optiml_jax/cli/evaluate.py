"""Evaluate a model on held-out tasks as OPT-IML reports it: greedy answers scored by exact match and ROUGE-L,
or rank classification over answer options (accuracy).

    optiml-evaluate --model DIR|HUB_ID --data natural-instructions/tasks \\
        --split natural-instructions/splits/default/test_tasks.txt --output runs/eval-sni

writes OUTPUT/predictions.jsonl (one line per instance: task, id, category, prompt, prediction,
references and its scores), OUTPUT/metrics.json (overall, per category, per task, settings; percent)
and OUTPUT/report.md (the same as tables), all at once when the run has finished. `--predictions FILE`
re-scores an existing predictions file without a model. The scores are the official SNI ones (see
optiml_jax/eval/metrics.py); `--template tk_instruct --shots 2` gives Tk-Instruct's "definition + 2
positive examples" prompts. A JSONL record with an "options" list (and its answer as "tgt" or "label",
an index) is ranked: every option is scored by its log-likelihood after the prompt (as " " + option),
and acc / acc_norm (log-likelihood per character) report whether the likeliest option is right;
`--mode rank` ranks SNI tasks over their distinct outputs too. In --delimiter and --stop, "\\n" and
"\\t" stand for newline and tab.

Bad input (no task matching the split file, an instance without references, an unreadable model, an
existing output directory without --overwrite) prints one line on stderr and exits with status 2; a
read or write that fails on its own (a full disk) prints one line and exits with status 1.
On several hosts run the same command on every host with --distributed (or --coordinator ...), as
for fine-tuning; every host reads the data, process 0 writes the output.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Optional, Sequence

import jax

from optiml_jax.checkpoints.pretrained import load_pretrained
from optiml_jax.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    CLIError,
    Parser,
    add_distributed_flags,
    init_distributed,
    mesh_flag,
    report,
    set_up_logging,
)
from optiml_jax.config import DTYPES
from optiml_jax.data import Fields
from optiml_jax.data.formats import format_choices
from optiml_jax.eval.generation import data_parallel_size
from optiml_jax.eval.prompts import DEFAULT_DELIMITER, PROMPT_TEMPLATES
from optiml_jax.eval.runner import MODES, EvalSettings, evaluate, rescore, summary_table, write_results
from optiml_jax.eval.suite import SuiteError, load_suite
from optiml_jax.eval.suite_report import suite_summary
from optiml_jax.eval.suite_run import SuiteSettings, run_suite
from optiml_jax.eval.tasks import DEFAULT_MAX_INSTANCES, load_eval_tasks
from optiml_jax.fileio import check_output_dir
from optiml_jax.model.kernels import IMPLEMENTATIONS
from optiml_jax.paths import resolve_path, shipped_data
from optiml_jax.sharding import make_mesh
from optiml_jax.tokenizer import PROMPT_ADD_BOS, OPTTokenizer

# Flags of a single evaluation that a suite file decides for each entry: given with --suite they would
# change nothing, so they are refused rather than ignored (flag -> where the suite says it).
SUITE_DECIDES = {
    "--shots": "set per entry by the suite ('shots')",
    "--template": "set per entry by the suite ('templates')",
    "--mode": "set per entry by the suite ('mode')",
    "--max-instances": "set by the suite file ('max_instances')",
    "--max-options": "a suite's rank entries take SNI tasks of up to 10 labels",
    "--format": "each entry's data is read in the format of its path",
    "--fields": "each entry's data is read in the format of its path",
}


# Flags --predictions has no use for: it re-scores the file's predictions as they are.
RESCORE_UNUSED = (
    "--model",
    "--tokenizer",
    "--data",
    "--split",
    "--suite",
    "--format",
    "--fields",
    "--max-instances",
    "--shots",
    "--template",
    "--mode",
    "--max-options",
    "--delimiter",
    "--stop",
    "--max-new-tokens",
    "--batch-size",
    "--dtype",
    "--attention",
    "--mesh",
    "--add-bos",
)


def _given(parser, args, flag: str) -> bool:
    """Whether `flag` was set to something other than its default."""
    dest = flag[2:].replace("-", "_")
    return getattr(args, dest) != parser.get_default(dest)


def _unescape(text: str) -> str:
    return text.replace("\\n", "\n").replace("\\t", "\t")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = Parser.from_doc("optiml-evaluate", __doc__)
    parser.add_argument("--model", help="model directory (Hugging Face or converted) or hub id")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    parser.add_argument(
        "--data",
        help="SNI task file or directory of task*.json, a JSONL or Parquet file or directory (a built "
        "bench's test/), or sni-sample (the shipped SNI sample)",
    )
    parser.add_argument(
        "--split", help="split file listing the tasks to evaluate (e.g. splits/default/test_tasks.txt)"
    )
    parser.add_argument("--format", default="auto", choices=format_choices())
    parser.add_argument(
        "--fields",
        help="which JSONL key / Parquet column holds src, tgt, task, definition, as data.fields does "
        "for training: e.g. src=inputs,tgt=targets",
    )
    parser.add_argument(
        "--max-instances",
        type=int,
        default=DEFAULT_MAX_INSTANCES,
        help=f"first N instances of each task (default {DEFAULT_MAX_INSTANCES}, SNI's; 0 = all)",
    )
    parser.add_argument(
        "--shots", type=int, default=0, help="the task's first K positive examples in the prompt"
    )
    parser.add_argument("--template", default="optiml", choices=PROMPT_TEMPLATES)
    parser.add_argument(
        "--mode",
        default="auto",
        choices=MODES,
        help="auto: rank the tasks whose records list options, generate the rest; rank: also rank "
        "SNI tasks over their distinct outputs; generate: generate everything",
    )
    parser.add_argument(
        "--max-options",
        type=int,
        default=10,
        help="--mode rank: an SNI task with more distinct outputs is skipped (default 10)",
    )
    parser.add_argument(
        "--delimiter",
        default=DEFAULT_DELIMITER.replace("\n", "\\n"),
        help="answer cue of the optiml template (default %(default)s)",
    )
    parser.add_argument(
        "--stop", action="append", default=[], help="cut answers before this string (repeatable)"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        help="default 256 (with --suite: the suite file's, 256 unless it sets one)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="prompts per generation batch (default: 8 per data-parallel device)",
    )
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument(
        "--attention",
        default="auto",
        choices=IMPLEMENTATIONS,
        help="attention kernel of the scoring passes (default auto: per platform and dtype)",
    )
    parser.add_argument(
        "--mesh", default="data=-1", help="mesh axis sizes, as in fine-tuning (default data=-1)"
    )
    parser.add_argument(
        "--add-bos",
        action=argparse.BooleanOptionalAction,
        default=PROMPT_ADD_BOS,
        help="start prompts with </s> as transformers' OPT tokenizer does (default: no, as fine-tuning "
        "data and optiml-generate)",
    )
    parser.add_argument(
        "--suite",
        help="a suite file (configs/eval/*.yaml): every entry at each of its shot settings and templates, "
        "aggregated as the paper does (optiml_jax/eval/suite.py)",
    )
    parser.add_argument("--predictions", help="re-score this predictions.jsonl instead of running a model")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--no-progress", action="store_true")
    add_distributed_flags(parser)
    args = parser.parse_args(argv)
    if args.predictions:
        # re-scoring reads the file alone: any model, data or generation flag given would be ignored
        extra = [flag for flag in RESCORE_UNUSED if _given(parser, args, flag)]
        if extra:
            raise CLIError(f"--predictions re-scores a file; {', '.join(extra)} would be unused")
    elif args.suite and (args.data or args.split):
        raise CLIError("--suite names each entry's data; --data and --split would be unused")
    elif not args.model or not (args.data or args.suite):
        raise CLIError("give --model and --data or --suite (or --predictions FILE to re-score)")
    if args.suite:
        for flag, reason in SUITE_DECIDES.items():
            if _given(parser, args, flag):
                raise CLIError(f"{flag}: {reason}; not used with --suite")
    for flag, value, low in (
        ("--max-instances", args.max_instances, 0),
        ("--shots", args.shots, 0),
        ("--max-new-tokens", args.max_new_tokens, 1),
        ("--batch-size", args.batch_size, 1),
        ("--max-options", args.max_options, 2),
    ):
        if value is not None and value < low:
            raise CLIError(f"{flag} must be >= {low}, got {value}")
    if args.max_new_tokens is None and not args.suite:
        args.max_new_tokens = 256
    args.delimiter = _unescape(args.delimiter)
    args.stop = tuple(_unescape(s) for s in args.stop)
    if any(not s for s in args.stop):
        raise CLIError("--stop needs a non-empty string")
    args.mesh = mesh_flag(args.mesh)
    try:
        args.fields = Fields.from_text(args.fields)
    except ValueError as e:
        raise CLIError(f"--fields: {e}") from None
    return args


def _load_model(args, mesh):
    """(the loaded model, its tokenizer) of --model / --tokenizer."""
    # Decoding on CPU runs unscanned layers anyway (generate.decode_with_separate_layers).
    loaded = load_pretrained(
        args.model,
        dtype=args.dtype,
        scan_layers=jax.default_backend() != "cpu",
        mesh=mesh,
        attention=args.attention,
        load_tokenizer=args.tokenizer is None,
    )
    tokenizer = OPTTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else loaded.tokenizer
    if tokenizer is None:
        raise CLIError(f"{args.model} has no tokenizer files; pass --tokenizer DIR")
    return loaded, tokenizer


def _mesh(args):
    try:  # the configuration first: it fails in a second, before any data or model is read
        return make_mesh(args.mesh)
    except ValueError as e:
        raise CLIError(f"--mesh: {e}") from None


def _batch_size(args, mesh) -> int:
    """--batch-size, checked against the mesh (every data-parallel device gets the same rows), or its
    default of 8 per data-parallel device."""
    if args.batch_size and args.batch_size % data_parallel_size(mesh):
        raise CLIError(
            f"--batch-size {args.batch_size} is not divisible by the mesh's data-parallel devices "
            f"(data x fsdp = {data_parallel_size(mesh)})"
        )
    return args.batch_size or 8 * data_parallel_size(mesh)


def _evaluate_suite(args, write_to):
    """--suite: the suite file checked first (every bad entry, before any model is read), then run."""
    suite = load_suite(resolve_path(args.suite))  # a shipped suite (configs/eval/) from any directory
    mesh = _mesh(args)
    settings = SuiteSettings(
        max_new_tokens=args.max_new_tokens,
        batch_size=_batch_size(args, mesh),
        delimiter=args.delimiter,
        add_bos=args.add_bos,
        stop=args.stop,
    )
    loaded, tokenizer = _load_model(args, mesh)
    return run_suite(
        loaded.model, loaded.params, tokenizer, suite, write_to, settings, mesh=mesh, overwrite=args.overwrite
    )


def _evaluate_model(args):
    mesh = _mesh(args)
    batch_size = _batch_size(args, mesh)  # before the data is read: the flags fail in a second
    args.data, args.split = shipped_data(args.data, args.split)
    tasks = load_eval_tasks(args.data, args.split, args.max_instances, args.format, args.fields)
    # every setting but the batch has the flag of its name (--max-new-tokens -> max_new_tokens)
    names = [f.name for f in dataclasses.fields(EvalSettings) if f.name != "batch_size"]
    settings = EvalSettings(batch_size=batch_size, **{name: getattr(args, name) for name in names})
    loaded, tokenizer = _load_model(args, mesh)
    log = logging.getLogger("optiml_jax.evaluate")
    log.info("%d tasks, %d instances; %s", len(tasks), sum(len(t.instances) for t in tasks), settings)
    result = evaluate(
        loaded.model, loaded.params, tokenizer, tasks, settings, mesh=mesh, progress=not args.no_progress
    )
    result.metrics["settings"].update(
        model=str(args.model),
        data=str(args.data),
        split=args.split,
        max_instances=args.max_instances,
        dtype=args.dtype,
    )
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    set_up_logging()
    try:
        args = parse_args(argv)
        check_output_dir(args.output, args.overwrite)  # before hours of generation, not after
        if args.predictions:
            result, is_main = rescore(args.predictions), True
        else:
            init_distributed(args)
            is_main = jax.process_index() == 0
            if args.suite:  # run_suite writes its own report
                result = _evaluate_suite(args, args.output if is_main else None)
            else:
                result = _evaluate_model(args)
        if is_main and not args.suite:
            write_results(args.output, result, overwrite=args.overwrite)
    except SuiteError as e:  # one line per bad entry
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (CLIError, ValueError, KeyError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        return report(e, EXIT_BAD_INPUT)  # bad flags, data, model files, config...
    except OSError as e:  # reading or writing failed: a full disk, a lost mount; the input may be fine
        return report(e, EXIT_FAILURE)
    if is_main and args.suite:
        print(suite_summary(result.metrics))
    elif is_main:
        print(summary_table(result.metrics))
        print(f"wrote {args.output}/predictions.jsonl, metrics.json, report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
