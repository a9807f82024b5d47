"""Converting an OPT / OPT-IML checkpoint (Hugging Face or metaseq) into our format, in bounded memory.

The input is read one tensor at a time (torch_pickle / hf_checkpoint read each tensor's bytes only
when its turn comes). Each tensor is mapped to our layout and written into its slot of a staged,
headerless file per output array (stacked layers: layer i is a slice of one file), then the staged
files are streamed into the Orbax checkpoint block by block. Peak memory is about one merged tensor
plus one write block, whatever the model size; disk needs the model twice while converting.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from optiml_jax.checkpoints import hf as hf_checkpoint
from optiml_jax.checkpoints import metaseq
from optiml_jax.checkpoints import model_format as checkpoint
from optiml_jax.checkpoints.mapping import TensorChecker, stacked_location
from optiml_jax.checkpoints.streamed import StreamedArray
from optiml_jax.config import DTYPES, OPTConfig, as_dtype
from optiml_jax.fileio import atomic_output_dir, check_output_dir
from optiml_jax.tokenizer import OPTTokenizer

FORMATS = ("hf", "metaseq")
STAGE_BLOCK_BYTES = 8 << 20


@dataclasses.dataclass
class Source:
    """An opened input: its config, its files, and a stream of (HF key, array, file) triples."""

    format: str
    config: OPTConfig
    files: list
    tensors: Iterator
    tokenizer_dir: Optional[Path]


@dataclasses.dataclass
class ConversionSummary:
    output: Path
    input_format: str
    num_files: int
    num_tensors: int
    num_params: int
    dtype: str
    bytes: int  # of the params checkpoint on disk
    seconds: float
    tokenizer: bool

    def __str__(self) -> str:
        return (
            f"converted {self.input_format} checkpoint ({self.num_files} file(s), {self.num_tensors} "
            "tensors) "
            f"-> {self.output}: {self.num_params:,} parameters, {self.dtype}, "
            f"{self.bytes / 2**20:,.1f} MiB, {self.seconds:.1f} s"
            + ("" if self.tokenizer else " (no tokenizer files: pass --tokenizer DIR)")
        )


# ---------------------------------------------------------------------------------------- detection
def detect_format(path: str | Path) -> str:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_file():
        name = path.name
        if name.endswith((".safetensors", ".index.json", ".bin")):
            return "hf"
        if name.endswith(".pt"):
            return "metaseq"
        raise ValueError(
            f"{path}: cannot tell the checkpoint format from the file name; pass --format hf|metaseq"
        )
    if (path / "config.json").is_file() or any((path / f).is_file() for f in hf_checkpoint.WEIGHT_FILES):
        return "hf"
    if any(path.glob("*.pt")):
        return "metaseq"
    raise FileNotFoundError(
        f"{path}: no checkpoint found (looked for {', '.join(hf_checkpoint.WEIGHT_FILES)} "
        f"and metaseq *.pt files)"
    )


def load_config_arg(config) -> Optional[OPTConfig]:
    """--config: a preset name ("1.3b", "opt-iml-max-30b"), a config.json / YAML file, or an OPTConfig."""
    if config is None or isinstance(config, OPTConfig):
        return config
    return OPTConfig.from_preset(str(config))


def _has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer.json").is_file() or (
        (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()
    )


def open_source(path: str | Path, fmt: Optional[str] = None, config=None) -> Source:
    path = Path(path)
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    override = load_config_arg(config)
    directory = path if path.is_dir() else path.parent
    tokenizer_dir = directory if _has_tokenizer(directory) else None
    if fmt == "hf":
        files = _hf_files(path)
        if override is None:
            config_file = directory / "config.json"
            if not config_file.is_file():
                raise FileNotFoundError(f"{config_file}: missing; pass --config PRESET|config.json")
            override = OPTConfig.from_json_file(config_file)

        def hf_tensors():
            for file in files:
                for key, array in hf_checkpoint.iter_tensors(file):
                    yield key, array, str(file)

        return Source("hf", override, files, hf_tensors(), tokenizer_dir)
    parts = metaseq.open_checkpoint(path)
    config = metaseq.infer_config(parts, override)
    files = [f for part in parts for f in part.files]
    return Source("metaseq", config, files, metaseq.iter_hf_tensors(parts), tokenizer_dir)


def _hf_files(path: Path) -> list:
    if path.is_dir():
        return hf_checkpoint.find_weight_files(path)
    if path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise hf_checkpoint.CheckpointFormatError(f"{path}: not a valid weight index ({e})") from None
        files = [path.parent / f for f in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{path} lists shard(s) that do not exist: {', '.join(missing)}")
        return files
    return [path]


# ---------------------------------------------------------------------------------------- staging
@dataclasses.dataclass
class _Slot:
    file: Path
    shape: tuple  # of the stored array (stacked: leading layer axis)
    layer: Optional[int]  # slice of a stacked array, or None for a whole array


class ParamStager:
    """Places HF tensors, one at a time, into staged files laid out as our stacked params."""

    def __init__(self, config: OPTConfig, dtype, directory: Path):
        self.config = config
        self.dtype = np.dtype(dtype)
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.checker = TensorChecker(config)
        self.specs = self.checker.specs
        self.arrays: dict[tuple, tuple] = {}  # stored path -> (file, shape)
        self.slots: dict[str, _Slot] = {}
        layers = config.num_hidden_layers
        for spec in self.specs.values():
            flax_shape = tuple(spec.to_flax(np.empty(spec.hf_shape, np.uint8)).shape)
            stored, layer = stacked_location(spec.path)
            shape = flax_shape if layer is None else (layers,) + flax_shape
            if stored not in self.arrays:
                file = directory / (".".join(stored) + ".raw")
                with open(file, "wb") as f:
                    f.truncate(math.prod(shape) * self.dtype.itemsize)
                self.arrays[stored] = (file, shape)
            self.slots[spec.hf_key] = _Slot(self.arrays[stored][0], shape, layer)
        self.bytes_read = 0

    def add(self, raw_key: str, array: np.ndarray, source: str) -> None:
        spec = self.checker.check(raw_key, array.shape, source)
        if spec is None:
            return
        key = spec.hf_key
        self.bytes_read += array.nbytes
        slot = self.slots[key]
        if spec.to_flax.__name__ != "_identity":  # transposes: per-layer tensors, converted whole
            array = np.ascontiguousarray(spec.to_flax(array))
        offset = 0 if slot.layer is None else slot.layer * array.size * self.dtype.itemsize
        # Cast and write in row blocks, so a dtype change of the (large) embedding table costs one
        # block of memory, not a second copy of the table.
        rows = max(1, STAGE_BLOCK_BYTES // max(1, array[:1].size * self.dtype.itemsize)) if array.ndim else 1
        flat = array.reshape(array.shape[0], -1) if array.ndim else array.reshape(1, 1)
        with open(slot.file, "r+b") as f:
            f.seek(offset)
            for start in range(0, flat.shape[0], rows):
                block = np.ascontiguousarray(flat[start : start + rows], dtype=self.dtype)
                f.write(memoryview(block.reshape(-1).view(np.uint8)))

    def params(self) -> dict:
        """The staged tree of StreamedArrays (after every tensor was added)."""
        self.checker.check_complete("the checkpoint")
        tree: dict = {}
        for stored, (file, shape) in self.arrays.items():
            node = tree
            for key in stored[:-1]:
                node = node.setdefault(key, {})
            node[stored[-1]] = StreamedArray.from_raw_file(file, shape, self.dtype)
        return tree


# ---------------------------------------------------------------------------------------- convert
def convert(
    input_path,
    output_dir,
    *,
    dtype: str = "float32",
    config=None,
    tokenizer=None,
    overwrite: bool = False,
    fmt: Optional[str] = None,
    progress: bool = True,
) -> ConversionSummary:
    """Converts a checkpoint into an optiml_jax model directory (atomically: all or nothing)."""
    start = time.perf_counter()
    if str(dtype) not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    np_dtype = as_dtype(dtype)
    output_dir = check_output_dir(output_dir, overwrite)  # fail before reading anything
    tokenizer_obj = _load_tokenizer(tokenizer) if tokenizer is not None else None
    source = open_source(input_path, fmt, config)
    if tokenizer_obj is None and source.tokenizer_dir is not None:
        tokenizer_obj = _load_tokenizer(source.tokenizer_dir)
    with atomic_output_dir(output_dir, overwrite) as tmp:
        staging = tmp / ".staging"
        stager = ParamStager(source.config, np_dtype, staging)
        count = 0
        with _progress(progress, len(stager.specs), "reading", "tensor") as bar:
            current = None
            for key, array, file in source.tensors:
                if file != current and bar is not None:
                    current = file
                    bar.set_postfix_str(Path(file.split(" ")[0]).name)
                stager.add(key, array, file)
                del array
                count += 1
                if bar is not None:
                    bar.update(1)
        params = stager.params()
        total = checkpoint.num_params(params)
        with _progress(progress, checkpoint.num_bytes(params), "writing", "B") as bar:
            if bar is not None:
                params = _report_reads(params, bar)
            checkpoint.write_params(tmp / checkpoint.PARAMS_DIR, params)
        shutil.rmtree(staging)
        checkpoint.finish_model_dir(
            tmp, source.config, np_dtype, total, tokenizer_obj, {"converted_from": source.format}
        )
        size = sum(p.stat().st_size for p in (tmp / checkpoint.PARAMS_DIR).rglob("*") if p.is_file())
    return ConversionSummary(
        output_dir,
        source.format,
        len(source.files),
        count,
        total,
        np_dtype.name,
        size,
        time.perf_counter() - start,
        tokenizer_obj is not None,
    )


def _report_reads(params: dict, bar) -> dict:
    """The same StreamedArrays, advancing `bar` by the bytes of each block as it is written."""
    import jax

    def wrap(leaf):
        def read_rows(start, stop):
            block = leaf.read_rows(start, stop)
            bar.update(block.nbytes)
            return block

        return StreamedArray(leaf.shape, leaf.dtype, read_rows)

    return jax.tree_util.tree_map(wrap, params, is_leaf=lambda x: isinstance(x, StreamedArray))


def _load_tokenizer(directory):

    return OPTTokenizer.from_pretrained(directory)


class _NoBar:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _progress(enabled: bool, total, desc: str, unit: str):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", dynamic_ncols=True, leave=False)


__all__ = ["convert", "detect_format", "open_source", "ParamStager", "ConversionSummary", "Source"]
