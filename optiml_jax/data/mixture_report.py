"""What the configured training mixture really draws (`optiml-bench mix-report`, optiml_jax/cli/bench.py):
the first N examples of the stream a fine-tune with this config would train on, counted per benchmark and
slice: {"benchmarks": {NAME: {"target_share", "realised_share", "realised_token_share", "tasks",
"capped_tasks"}}, "slices": {NAME: {same keys}}, "demonstrations_per_example": x}. Shares are fractions
of 1: realised_share of the examples drawn, realised_token_share of their loss tokens (after the cut to
train.seq_len). Without data.mixture the groups are data.train's benchmarks (when its rows name them)
under plain EPS, with target_share null: what EPS alone would give.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from optiml_jax.config import ConfigError
from optiml_jax.data import build_train_loader
from optiml_jax.data.mixture import TRAIN_GROUP, benchmark_of
from optiml_jax.data.packing import fit_to_length, loss_tokens, tokenize_examples

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
        for group, tokenized in zip(groups, tokenize_examples(batch, tokenizer, cfg.data.add_bos)):
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
