"""The chain-of-thought reasoning datasets (GSM8K, StrategyQA, AQuA, ...): one Parquet/JSONL file per
dataset, `input` (the question) and `output` (rationale then answer) by default; a task-level
instruction per task comes from the registry, prompted as SNI's definitions are."""

from optiml_jax.bench.collections import generic

DEFAULT_COLUMNS = {"input": "input", "output": "output"}


def read(path, columns: dict, known=frozenset()):
    return generic.read_collection("reasoning", path, {**DEFAULT_COLUMNS, **columns})
