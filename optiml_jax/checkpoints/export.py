"""Exporting one of our model directories (converted or fine-tuned) back to Hugging Face format.

Writes config.json, the tokenizer files and model.safetensors (or model-0000K-of-0000N.safetensors
with model.safetensors.index.json above `max_shard_size`), which `transformers.OPTForCausalLM
.from_pretrained` loads. The safetensors files are written by hand: every tensor's name, shape and
dtype follow from the config, so headers are known up front and the data is streamed one tensor at
a time (one layer's slice is read from each stacked array), so memory holds one tensor, not the model.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from optiml_jax.checkpoints import model_format as checkpoint
from optiml_jax.fileio import atomic_output_dir, check_output_dir
from optiml_jax.config import OPTConfig, as_dtype
from optiml_jax.checkpoints.mapping import stacked_location, tensor_specs

_SAFETENSORS_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
DEFAULT_MAX_SHARD_SIZE = "5GB"


def parse_size(size) -> int:
    """'5GB', '500MB', '10GiB' or a number of bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read size {size!r}; write e.g. 5GB, 500MB or a number of bytes")
    unit = (m.group(2) or "").upper()
    scale = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6,
             "G": 10**9, "T": 10**12}.get(unit)
    if scale is None:
        raise ValueError(f"cannot read size {size!r}")
    return int(float(m.group(1)) * scale)


def export_hf(model_dir, output_dir, *, max_shard_size=DEFAULT_MAX_SHARD_SIZE, dtype: Optional[str] = None,
              overwrite: bool = False) -> Path:
    """Writes `model_dir` (an optiml_jax directory) as a Hugging Face OPT directory at `output_dir`."""

    model_dir = Path(model_dir)
    marker = checkpoint.read_marker(model_dir)
    config = OPTConfig.from_json_file(model_dir / "config.json")
    out_dtype = np.dtype(as_dtype(dtype) if dtype else marker["dtype"])
    if out_dtype.name not in _SAFETENSORS_NAMES:
        raise ValueError(f"cannot export dtype {out_dtype.name}")
    limit = parse_size(max_shard_size)
    check_output_dir(output_dir, overwrite)

    # Tensor order: grouped by stored array, so each stacked array is read once.
    groups: dict[tuple, list] = {}
    for spec in tensor_specs(config):
        stored, layer = stacked_location(spec.path)
        groups.setdefault(stored, []).append((spec, layer))
    plan = [(spec, layer, stored) for stored, items in groups.items() for spec, layer in items]
    shards, current, current_bytes = [], [], 0
    for item in plan:
        nbytes = math.prod(item[0].hf_shape) * out_dtype.itemsize
        if current and current_bytes + nbytes > limit:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(item)
        current_bytes += nbytes
    if current:
        shards.append(current)

    with atomic_output_dir(output_dir, overwrite) as tmp:
        reader = checkpoint.ParamsReader(model_dir)
        weight_map, total = {}, 0
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        for name, shard in zip(names, shards):
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for spec, layer, _ in shard:
                nbytes = math.prod(spec.hf_shape) * out_dtype.itemsize
                header["model." + spec.hf_key if spec.hf_key != "lm_head.weight" else spec.hf_key] = {
                    "dtype": _SAFETENSORS_NAMES[out_dtype.name], "shape": list(spec.hf_shape),
                    "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            header_bytes = json.dumps(header, separators=(",", ":")).encode()
            header_bytes += b" " * (-len(header_bytes) % 8)
            with open(tmp / name, "wb") as f:
                f.write(len(header_bytes).to_bytes(8, "little"))
                f.write(header_bytes)
                for spec, layer, stored in shard:
                    # One layer of a stacked array at a time: memory holds one tensor, not the model.
                    array = reader.read(stored) if layer is None else reader.read_layer(stored, layer)
                    tensor = np.ascontiguousarray(spec.to_hf(np.asarray(array))).astype(out_dtype, copy=False)
                    if tuple(tensor.shape) != tuple(spec.hf_shape):
                        raise checkpoint.CheckpointError(
                            f"{model_dir}: {'/'.join(stored)} gives {spec.hf_key} shape {tensor.shape}, "
                            f"config.json needs {spec.hf_shape}")
                    f.write(memoryview(tensor.reshape(-1).view(np.uint8)))
                    key = "model." + spec.hf_key if spec.hf_key != "lm_head.weight" else spec.hf_key
                    weight_map[key] = name
                    total += tensor.nbytes
        reader.close()
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        hf_config = dict(config.to_dict(), torch_dtype=out_dtype.name)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        from optiml_jax.tokenizer import TOKENIZER_FILES

        for file in TOKENIZER_FILES:
            if (model_dir / file).is_file():
                shutil.copy2(model_dir / file, tmp / file)
    return Path(output_dir)


__all__ = ["export_hf", "parse_size", "DEFAULT_MAX_SHARD_SIZE"]
