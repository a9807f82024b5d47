"""Generate text from a model: `optiml-generate --model DIR|HUB_ID --prompt TEXT [--prompt TEXT ...]`
(the same as `python -m optiml_jax.generate`); greedy unless --temperature > 0.

    optiml-generate --model runs/demo/final --prompt "What is the capital of USA?" --max-new-tokens 20

--prompt-file FILE holds the prompts in one of three forms:
  * FILE.jsonl: one JSON object per line, its "prompt" the prompt (any characters, newlines included);
  * prompts separated by lines holding only `---` (each prompt may span several lines);
  * otherwise one prompt per line (blank lines skipped).
Text output prints each prompt with its completion, and a line holding only `---` between two of
them (the separator --prompt-file reads); --json prints one JSON object per prompt instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

from optiml_jax.aot.decode import generate_aot
from optiml_jax.checkpoints.pretrained import load_pretrained
from optiml_jax.cli.common import EXIT_BAD_INPUT, EXIT_FAILURE, CLIError, Parser, report
from optiml_jax.config import DTYPES
from optiml_jax.generate import GenerationConfig, complete_texts, generate
from optiml_jax.tokenizer import PROMPT_ADD_BOS

# A line holding only this separates two prompts of a --prompt-file, and two outputs in text mode.
SEPARATOR = "---"


def _parse_args(argv):
    parser = Parser.from_doc("optiml-generate", __doc__)
    parser.add_argument("--model", required=True, help="model directory (HF layout or converted) or hub id")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument(
        "--prompt-file",
        help="prompts: a .jsonl of {\"prompt\": ...}, prompts separated by '---' lines, or one per line",
    )
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="HF's repetition penalty on tokens already in the prompt or output (1.0 = off)",
    )
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt")
    parser.add_argument(
        "--add-bos",
        action=argparse.BooleanOptionalAction,
        default=PROMPT_ADD_BOS,
        help="start prompts with </s> as transformers' OPT tokenizer does (default: no, as fine-tuning "
        "and optiml-evaluate encode them)",
    )
    parser.add_argument(
        "--aot",
        metavar="TARGET",
        help="compile decoding for TARGET (tpu:v4-8, gpu:1xh200, ...) here and report its memory per device; "
        "the model's architecture only is read (preset:NAME works); needs the aot-tpu / aot-gpu extra",
    )
    parser.add_argument("--batch-size", type=int, default=1, help="with --aot: the batch to compile for")
    parser.add_argument("--aot-report", metavar="FILE", help="with --aot: the report as JSON")
    args = parser.parse_args(argv)
    if args.aot:
        return args
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0 or not math.isfinite(args.temperature):
        raise CLIError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 0:
        raise CLIError(f"--top-k must be >= 0, got {args.top_k}")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise CLIError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.seed is not None and args.seed < 0:
        raise CLIError(f"--seed must be >= 0, got {args.seed}")
    if not args.repetition_penalty > 0 or not math.isfinite(args.repetition_penalty):
        raise CLIError(f"--repetition-penalty must be > 0, got {args.repetition_penalty}")
    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None or args.seed is not None):
        raise CLIError("--top-k, --top-p and --seed apply to sampling only; add --temperature > 0")
    if args.prompt and args.prompt_file:
        raise CLIError("give --prompt or --prompt-file, not both")
    if not args.prompt and not args.prompt_file:
        raise CLIError("give a --prompt or a --prompt-file")
    return args


def parse_prompt_file(text: str, name: str) -> list[str]:
    """The prompts of a --prompt-file's `text` (see the module doc for the three forms)."""
    if name.endswith(".jsonl"):
        prompts = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CLIError(f"--prompt-file {name}, line {number}: not JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise CLIError(f'--prompt-file {name}, line {number}: expected {{"prompt": "..."}}')
            prompts.append(record["prompt"])
        return prompts
    lines = text.splitlines()
    if any(line.strip() == SEPARATOR for line in lines):
        blocks, current = [], []
        for line in lines + [SEPARATOR]:
            if line.strip() == SEPARATOR:
                blocks.append("\n".join(current).strip("\n"))
                current = []
            else:
                current.append(line)
        return [block for block in blocks if block.strip()]
    return [line for line in lines if line.strip()]


def _read_prompts(args) -> list[str]:
    if not args.prompt_file:
        prompts = args.prompt
    else:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise CLIError(f"cannot read --prompt-file: {e.strerror}: {args.prompt_file}") from None
        except UnicodeDecodeError:
            raise CLIError(f"--prompt-file {args.prompt_file} is not UTF-8 text") from None
        prompts = parse_prompt_file(text, args.prompt_file)
        if not prompts:
            raise CLIError(f"--prompt-file {args.prompt_file} has no prompts (one per line)")
    if any(not p for p in prompts):
        raise CLIError("a prompt is empty")
    return prompts


def main(argv=None) -> int:
    try:
        args = _parse_args(argv)
        if args.aot:
            return generate_aot(
                args.model, args.aot, args.batch_size, args.dtype, args.max_new_tokens, args.aot_report
            )
        prompts = _read_prompts(args)
        config = GenerationConfig(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k or 0,
            top_p=1.0 if args.top_p is None else args.top_p,
            seed=args.seed or 0,
            repetition_penalty=args.repetition_penalty,
        )
        # unscanned: decoding runs the layers separately anyway (see decode_with_separate_layers)
        loaded = load_pretrained(args.model, dtype=args.dtype, scan_layers=False)
        if loaded.tokenizer is None:
            raise CLIError(f"{args.model} has no tokenizer files (vocab.json + merges.txt or tokenizer.json)")
        tokenizer = loaded.tokenizer
        config = dataclasses.replace(
            config, eos_token_id=loaded.config.eos_token_id, pad_token_id=loaded.config.pad_token_id
        )
        prompt_ids = tokenizer.encode_batch(prompts, add_bos=args.add_bos)
        out = generate(loaded.model, loaded.params, prompt_ids, config)
        completions = complete_texts(tokenizer, prompt_ids, out.token_ids())
    except (CLIError, ValueError, TypeError, KeyError, FileNotFoundError, NotADirectoryError) as e:
        # bad flags, a configuration (config.json, dtype) we cannot run, missing or damaged model files
        return report(e, EXIT_BAD_INPUT)
    except OSError as e:  # reading failed midway, the hub went away
        return report(e, EXIT_FAILURE)
    for index, (prompt, ids, new_ids, logprobs, completion) in enumerate(
        zip(prompts, prompt_ids, out.token_ids(), out.token_logprobs(), completions)
    ):
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt": prompt,
                        "completion": completion,
                        "prompt_ids": ids,
                        "token_ids": new_ids,
                        "logprobs": logprobs,
                    },
                    ensure_ascii=False,
                )
            )
        else:
            if index:
                print(SEPARATOR)
            print(prompt + completion)
    return 0


if __name__ == "__main__":
    sys.exit(main())
