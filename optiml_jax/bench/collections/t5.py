"""T5's seqio tasks, dumped as Parquet/JSONL `inputs` / `targets` rows (seqio's feature names), one
file per task (wmt14_ende_train.jsonl ...) unless the registry maps a task column
(collections.t5.columns)."""

from optiml_jax.bench.collections import generic

DEFAULT_COLUMNS = {"input": "inputs", "output": "targets"}


def read(path, columns: dict, known=frozenset()):
    return generic.read_collection("t5", path, {**DEFAULT_COLUMNS, **columns})
