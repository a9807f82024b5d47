"""What the configured training mixture really draws (`optiml-bench mix-report`): the first N examples of
the stream a fine-tune with this config would train on, counted per benchmark and slice.

    optiml-bench mix-report --config CONFIG [key=value ...] --examples N --json FILE

writes {"benchmarks": {NAME: {"target_share", "realised_share", "realised_token_share", "tasks",
"capped_tasks"}}, "slices": {NAME: {same keys}}, "demonstrations_per_example": x}. Shares are fractions
of 1: realised_share of the examples drawn, realised_token_share of their loss tokens (after the cut to
train.seq_len). Without data.mixture the groups are data.train's benchmarks (when its rows name them)
under plain EPS, with target_share null: what EPS alone would give.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

from optiml_jax.config import ConfigError
from optiml_jax.data import DataConfig, DataError, build_train_loader
from optiml_jax.data.mixture import TRAIN_GROUP, benchmark_of
from optiml_jax.data.packing import fit_to_length, loss_tokens, tokenize_examples
from optiml_jax.run_config import load_run_config, resolve_path
from optiml_jax.tokenizer import OPTTokenizer

EXIT_BAD_INPUT, EXIT_FAILED = 2, 1
TOKENIZE_CHUNK = 512


def mixture_report(cfg: Any, tokenizer, examples: int) -> dict:
    """The report of the first `examples` draws of the stream `cfg` (a RunConfig: .data, .seed,
    .train.seq_len) configures, tokenised with `tokenizer` (loss tokens as the packer counts them)."""
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        raise ConfigError(f"--examples must be a positive integer, got {examples!r}")
    seq_len = cfg.train.seq_len
    loader = build_train_loader(
        cfg.data, tokenizer, seed=cfg.seed, batch_size=1, seq_len=seq_len, process_index=0, process_count=1
    )
    stream, plan = loader.mixture, loader.plan
    if plan is not None:
        group_of = plan.group_of
    else:
        group_of = {
            n: benchmark_of(stream.task_examples(k)) or TRAIN_GROUP for k, n in enumerate(stream.names)
        }
    drawn, tokens, demos = Counter(), Counter(), 0
    for start in range(0, examples, TOKENIZE_CHUNK):
        batch, groups = [], []
        for _ in range(min(TOKENIZE_CHUNK, examples - start)):
            index, task, j = stream.advance()
            example = loader.stream_example(index, task, j)
            demos += getattr(example, "demonstrations", 0)
            batch.append(example)
            groups.append(group_of[stream.names[task]])
        for group, tokenized in zip(groups, tokenize_examples(batch, tokenizer)):
            fitted = fit_to_length(tokenized, seq_len, cfg.data.overlong)
            drawn[group] += 1
            tokens[group] += loss_tokens(fitted) if fitted is not None else 0
    out: dict = {"benchmarks": {}, "slices": {}}
    total_tokens = max(sum(tokens.values()), 1)
    for name in plan.groups if plan is not None else sorted(set(group_of.values())):
        group = plan.groups[name] if plan is not None else None
        members = group.tasks if group else [t for t, g in group_of.items() if g == name]
        capped = group.capped_tasks if group else sum(_size(stream, t) > stream.eps for t in members)
        section = "slices" if group is not None and group.kind == "slice" else "benchmarks"
        out[section][name] = {
            "target_share": group.share if group else None,
            "realised_share": drawn[name] / examples,
            "realised_token_share": tokens[name] / total_tokens,
            "tasks": len(members),
            "capped_tasks": capped,
        }
    out["demonstrations_per_example"] = demos / examples
    return out


def _size(stream, name: str) -> int:
    return int(stream.sizes[stream.names.index(name)])


def _resolved(data: DataConfig) -> DataConfig:
    """data.train / data.train_tasks as fine-tuning resolves them (a shipped asset's name works too)."""
    fix = {}
    for name in ("train", "train_tasks"):
        value = getattr(data, name)
        if value is not None:
            fix[name] = tuple(map(resolve_path, value)) if isinstance(value, tuple) else resolve_path(value)
    return dataclasses.replace(data, **fix)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(message)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`optiml-bench mix-report`: exit 2 with one line for bad input (config, data), 1 for other failures."""
    parser = _Parser(prog="optiml-bench mix-report", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="training config (a file or a shipped name)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as fine-tuning takes them")
    parser.add_argument("--examples", type=int, default=20000, help="draws from the start of the stream")
    parser.add_argument("--json", required=True, help="where to write the report")
    try:
        args = parser.parse_args(argv)
        cfg = load_run_config(args.config, args.overrides)
        cfg = dataclasses.replace(cfg, data=_resolved(cfg.data))
        report = mixture_report(cfg, _tokenizer(cfg), args.examples)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        print(f"error: {args.json}: cannot write ({e.strerror})", file=sys.stderr)
        return EXIT_FAILED
    for section in ("benchmarks", "slices"):
        for name, row in report[section].items():
            target = "-" if row["target_share"] is None else f"{row['target_share']:.2%}"
            print(
                f"{name:>16} target {target:>7}  realised {row['realised_share']:.2%} of examples, "
                f"{row['realised_token_share']:.2%} of loss tokens; {row['tasks']} tasks "
                f"({row['capped_tasks']} capped)"
            )
    print(f"demonstrations per example: {report['demonstrations_per_example']:.3f}; written to {args.json}")
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
