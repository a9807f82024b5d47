"""The hub form `hf:NAME[:SPLIT]`: a hub dataset, written once as a local Parquet file (data/hub.py)
and then read as Parquet, for training and evaluation alike. Detected by its prefix only; it is not a
value of data.format."""

from __future__ import annotations

from pathlib import Path

from optiml_jax.data import hub
from optiml_jax.data.formats.base import EvalTask, Format, get_format, register
from optiml_jax.data.sources import DataError, Fields


@register
class HubFormat(Format):
    name = "hf"
    described = "hf:NAME[:SPLIT]"
    selectable = False
    reads_as = "parquet"

    def claims(self, path) -> bool:
        return hub.is_hub_path(path)

    def files(self, path, split_file=None) -> list[Path]:
        if split_file is not None:
            raise DataError(f"{split_file}: a split file selects SNI task files; {path} is a hub dataset")
        return [hub.materialise(path)]

    def listed(self, path, file: Path) -> str:
        # A hub dataset's local copy may lie in another cache directory on each host: its version counts.
        return f"{path}@{file.parent.name}"

    def eval_tasks(self, path, split_file, max_instances: int, fields: Fields) -> list[EvalTask]:
        (file,) = self.files(path, split_file)
        return get_format(self.reads_as).eval_tasks(file, None, max_instances, fields)
