"""Reading Hugging Face OPT weight files, lazily, one tensor at a time.

Handles `model.safetensors`, `pytorch_model.bin` and both sharded forms with their `*.index.json`.
safetensors files are parsed here (the format is a JSON header and raw bytes) and `.bin` files by
`torch_pickle` (a safe Unpickler: no code from the file runs), so neither needs torch, bfloat16
works, and each tensor is read from disk only when its turn comes, into memory that is freed when
the caller drops it. (A memory map would keep every page it touched resident for as long as the file
is open, i.e. the whole file by the end.)
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

from optiml_jax.checkpoints import torch_pickle

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointFormatError(ValueError):
    """A weight file is missing, truncated or not what its name says; the message names it."""


def find_weight_files(directory: str | Path) -> list[Path]:
    """The weight files of an HF model directory, safetensors preferred (no pickle, mmap-able)."""
    directory = Path(directory)
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointFormatError(f"{path}: not a valid weight index ({e})") from None
        files = [directory / f for f in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointFormatError(f"{path} lists shard(s) that do not exist: {', '.join(missing)}")
        return files
    raise FileNotFoundError(f"{directory}: no weights found (looked for {', '.join(WEIGHT_FILES)})")


def iter_tensors(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """(key, array) pairs of one weight file, each array read from the file when its turn comes (see
    the module doc for why not a memory map)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        yield from _iter_safetensors(path)
    else:
        yield from _iter_torch_file(path)


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header and the offset where tensor data starts; checks it fits in the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointFormatError(f"{path}: truncated safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise CheckpointFormatError(f"{path}: corrupted or truncated safetensors header")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointFormatError(f"{path}: corrupted safetensors header ({e})") from None
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{path}: corrupted safetensors header (not a JSON object)")
    for key, info in header.items():
        try:
            _, end = (int(x) for x in info["data_offsets"])
            info["shape"] = [int(d) for d in info["shape"]]
            str(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointFormatError(f"{path}: corrupted safetensors header entry for {key}") from None
        if data_start + end > size:
            raise CheckpointFormatError(
                f"{path}: truncated; tensor {key} ends at byte {data_start + end} "
                f"but the file has {size} bytes"
            )
    return header, data_start


def _iter_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    header, data_start = read_safetensors_header(path)
    for key, info in header.items():
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointFormatError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - start != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
            raise CheckpointFormatError(
                f"{path}: tensor {key} has {end - start} bytes for shape {shape} "
                f"of {info['dtype']} (corrupted header)"
            )
        array = np.empty(shape, dtype)
        with open(path, "rb") as f:
            f.seek(data_start + start)
            if f.readinto(memoryview(array.reshape(-1).view(np.uint8))) != end - start:
                raise CheckpointFormatError(f"{path}: truncated inside tensor {key}")
        yield key, array


def _iter_torch_file(path: Path) -> Iterator[tuple[str, np.ndarray]]:

    try:
        state = torch_pickle.load(path)
    except torch_pickle.UnsafePickleError:
        raise
    except torch_pickle.TorchFileError as e:
        raise CheckpointFormatError(str(e)) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    for key, tensor in state.items():
        if not isinstance(tensor, torch_pickle.LazyTensor):
            raise CheckpointFormatError(f"{path}: entry {key!r} is a {type(tensor).__name__}, not a tensor")
        try:
            yield key, tensor.numpy()
        except torch_pickle.TorchFileError as e:
            raise CheckpointFormatError(f"{e} (tensor {key})") from None


def iter_directory_tensors(directory: str | Path) -> Iterator[tuple[str, np.ndarray, Path]]:
    """Every (key, array, file) of an HF model directory, file after file."""
    for path in find_weight_files(directory):
        for key, array in iter_tensors(path):
            yield key, array, path
