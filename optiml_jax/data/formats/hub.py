"""`hf:NAME[:SPLIT]` data paths: a hub dataset, loaded through `datasets` and written once as a local
Parquet file, which is then read like any other Parquet file (formats/parquet.py), for training and evaluation
alike: each process its share of the row groups, skips counted with their rows, exact resume.
Detected by its prefix only; it is not a value of data.format.

The file goes under the `datasets` cache (`HF_DATASETS_CACHE`), in `optiml_jax_parquet/NAME/SPLIT-KEY/`,
where KEY names the version of the data (the `datasets` cache files it came from, or for a dataset held
in memory, the file's content): a later run, or another process on the same host, reuses it, and a new
version of the dataset gets a new file. It is named after the dataset, so without data.fields.task its
rows are one task of that name. `datasets` is an optional dependency (the `hub` extra), imported only
here and only for such a path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

from optiml_jax.data.formats.base import EvalTask, Format, get_format, register
from optiml_jax.data.sources import DataError, Fields

PREFIX = "hf:"
# Rows per row group of the written file. A batch row reads one whole group (of the mapped columns)
# for one example, so small groups make random access cheap; 1000 text rows is ~1 MB.
ROWS_PER_GROUP = 1000
LOCAL_ALTERNATIVE = "download the files and set data.train to a local .parquet/.jsonl path"


def is_hub_path(path) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


def parse(spec: str) -> tuple[str, str]:
    """(NAME, SPLIT) of `hf:NAME[:SPLIT]`; SPLIT defaults to "train" and may be a slice ("train[:1000]")."""
    name, _, split = spec[len(PREFIX) :].partition(":")
    if not name:
        raise DataError(
            f"{spec}: expected hf:NAME or hf:NAME:SPLIT (e.g. hf:Muennighoff/natural-instructions:train)"
        )
    return name, split or "train"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.replace("/", "__"))


def _load(spec: str, name: str, split: str):
    try:
        import datasets  # the optional `hub` extra, only for an hf: path
    except ImportError:
        raise DataError(
            f"{spec}: loading a hub dataset needs the `datasets` package, which is not installed "
            f"(pip install 'optiml-jax[hub]'); or {LOCAL_ALTERNATIVE}"
        ) from None
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - offline, unknown name or split, network: all end the same way
        reason = (str(e).strip().splitlines() or [""])[0][:300]
        raise DataError(
            f"{spec}: datasets.load_dataset({name!r}, split={split!r}) failed ({type(e).__name__}: "
            f"{reason}); {LOCAL_ALTERNATIVE}"
        ) from None
    if not isinstance(dataset, datasets.Dataset):
        raise DataError(
            f"{spec}: datasets.load_dataset gave a {type(dataset).__name__}, not one split; "
            f"{LOCAL_ALTERNATIVE}"
        )
    return dataset, Path(datasets.config.HF_DATASETS_CACHE)


def materialise(spec: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local Parquet file of `spec` (`hf:NAME[:SPLIT]`), written on first use; a DataError naming
    what failed and the local-file alternative when `datasets` is missing, offline or cannot load it."""
    name, split = parse(spec)
    dataset, default_root = _load(spec, name, split)
    root = Path(cache_dir) if cache_dir is not None else default_root
    folder = root / "optiml_jax_parquet" / _safe(name)
    filename = f"{_safe(name.rsplit('/', 1)[-1])}.parquet"
    sources = [f["filename"] for f in dataset.cache_files]
    key = None
    if sources:  # read from the datasets cache: its files name the version
        key = hashlib.sha256(json.dumps([name, split, sources, dataset.num_rows]).encode()).hexdigest()[:16]
        target = folder / f"{_safe(split)}-{key}" / filename
        if target.is_file():
            return target
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # Written under a temporary name and renamed, so a reader (another process) never sees half a file.
        handle, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".parquet")
        os.close(handle)
        dataset.to_parquet(tmp, batch_size=ROWS_PER_GROUP)
        key = key or _file_digest(tmp)
        target = folder / f"{_safe(split)}-{key}" / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_file():  # another process wrote the same version meanwhile
            os.unlink(tmp)
        else:
            os.replace(tmp, target)
    except OSError as e:
        raise DataError(f"{spec}: cannot write its Parquet copy under {folder} ({e.strerror or e})") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


@register
class HubFormat(Format):
    name = "hf"
    described = "hf:NAME[:SPLIT]"
    selectable = False
    reads_as = "parquet"

    def claims(self, path) -> bool:
        return is_hub_path(path)

    def files(self, path, split_file=None) -> list[Path]:
        if split_file is not None:
            raise DataError(f"{split_file}: a split file selects SNI task files; {path} is a hub dataset")
        return [materialise(path)]

    def listed(self, path, file: Path) -> str:
        # A hub dataset's local copy may lie in another cache directory on each host: its version counts.
        return f"{path}@{file.parent.name}"

    def eval_tasks(self, path, split_file, max_instances: int, fields: Fields) -> list[EvalTask]:
        (file,) = self.files(path, split_file)
        return get_format(self.reads_as).eval_tasks(file, None, max_instances, fields)
