"""ExMix (10 source repositories, no one public layout): each task's examples as Parquet/JSONL rows,
`inputs` / `targets` by default (another mapping: the registry's collections.exmix.columns); a file
holds one task (its stem names it) unless a task column is mapped."""

from optiml_jax.bench.collections import generic

DEFAULT_COLUMNS = {"input": "inputs", "output": "targets"}


def read(path, columns: dict, known=frozenset()):
    return generic.read_collection("exmix", path, {**DEFAULT_COLUMNS, **columns})
