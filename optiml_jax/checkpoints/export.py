"""Exporting a model back to Hugging Face format: one of our model directories (converted, or a run's
final model), a training checkpoint (`WORKDIR/checkpoints/STEP`, params only: the optimizer state is
never read) or a fine-tuning workdir (its final model, else its latest checkpoint).

Writes config.json, generation_config.json, the tokenizer files and model.safetensors (or
model-0000K-of-0000N.safetensors with model.safetensors.index.json above `max_shard_size`), which
`transformers.OPTForCausalLM.from_pretrained` loads. The safetensors files are written by hand: every
tensor's name, shape and dtype follow from the config, so headers are known up front and the data is
streamed one tensor at a time (one layer's slice is read from each stacked array), so memory holds one
tensor, not the model.

A training checkpoint holds the train state, not the architecture: that comes from the run's
`WORKDIR/config.yaml` (its `model` and `tokenizer`, read as the training loop reads them), so a run
whose config names relative paths is exported from the directory it was started in.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import orbax.checkpoint as ocp
import yaml

from optiml_jax.checkpoints import model_format as checkpoint
from optiml_jax.checkpoints.mapping import stacked_location, tensor_specs
from optiml_jax.config import OPTConfig, as_dtype
from optiml_jax.fileio import atomic_output_dir, check_output_dir
from optiml_jax.paths import is_preset, preset_config, resolve_model_path, resolve_path
from optiml_jax.tokenizer import TOKENIZER_FILES, OPTTokenizer

_SAFETENSORS_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
DEFAULT_MAX_SHARD_SIZE = "5GB"
GENERATION_CONFIG_FILE = "generation_config.json"


def parse_size(size) -> int:
    """'5GB', '500MB', '10GiB' or a number of bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read size {size!r}; write e.g. 5GB, 500MB or a number of bytes")
    unit = (m.group(2) or "").upper()
    scale = {
        "": 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
        "K": 10**3,
        "M": 10**6,
        "G": 10**9,
        "T": 10**12,
    }.get(unit)
    if scale is None:
        raise ValueError(f"cannot read size {size!r}")
    return int(float(m.group(1)) * scale)


def generation_config(config: OPTConfig) -> dict:
    """generation_config.json as transformers writes it for OPT (`GenerationConfig.from_model_config`,
    as on the facebook/opt-* hub repos): the special token ids."""
    return {
        "_from_model_config": True,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    }


@dataclasses.dataclass(frozen=True)
class ExportSource:
    """What an export reads: the architecture, and where and how the params are stored."""

    config: OPTConfig
    params_path: Path  # an Orbax PyTree checkpoint directory
    prefix: tuple  # the keys above the params in it: () in a model directory, ("params",) in a train state
    stacked: bool  # decoder/layers/... with a leading layer axis, or decoder/layers_{i}/...
    dtype: np.dtype  # of the stored params
    tokenizer: Any  # a directory whose tokenizer files are copied, an OPTTokenizer to save, or None
    name: str  # for messages


def find_source(path) -> ExportSource:
    """The model at `path`: one of our model directories, a training checkpoint (WORKDIR/checkpoints/STEP)
    or a workdir (its final model, else its latest checkpoint); CheckpointError saying what it is not."""
    path = Path(path)
    if not path.exists():
        raise checkpoint.CheckpointError(f"{path}: no such file or directory")
    if checkpoint.is_converted_checkpoint(path):
        return _model_dir_source(path)
    if path.name.isdigit() and (path / "state").is_dir():
        return _train_checkpoint_source(path, workdir=path.parent.parent)
    if (path / "final").is_dir() or (path / "checkpoints").is_dir():
        if checkpoint.is_converted_checkpoint(path / "final"):
            return _model_dir_source(path / "final")
        steps = [
            int(p.name)
            for p in (path / "checkpoints").glob("*")
            if p.name.isdigit() and (p / "state").is_dir()
        ]
        if steps:
            return _train_checkpoint_source(path / "checkpoints" / str(max(steps)), workdir=path)
        raise checkpoint.CheckpointError(
            f"{path}: a run directory with neither a final model (final/) nor a "
            f"checkpoint (checkpoints/STEP/) to export"
        )
    raise checkpoint.CheckpointError(
        f"{path}: not an optiml_jax model directory (no {checkpoint.MARKER}), a training checkpoint "
        f"(WORKDIR/checkpoints/STEP) or a fine-tuning workdir"
    )


def _model_dir_source(path: Path) -> ExportSource:
    marker = checkpoint.read_marker(path)
    if marker.get("layout") != checkpoint.LAYOUT:
        raise checkpoint.CheckpointError(
            f"{path / checkpoint.MARKER}: unknown params layout {marker.get('layout')!r}"
        )
    has_tokenizer = any((path / file).is_file() for file in TOKENIZER_FILES)
    return ExportSource(
        config=OPTConfig.from_json_file(path / "config.json"),
        params_path=path / marker.get("params_dir", checkpoint.PARAMS_DIR),
        prefix=(),
        stacked=True,
        dtype=np.dtype(as_dtype(marker["dtype"])),
        tokenizer=path if has_tokenizer else None,
        name=str(path),
    )


def _train_checkpoint_source(step_dir: Path, workdir: Path) -> ExportSource:
    config, tokenizer = _run_model(workdir)
    state_dir = (step_dir / "state").absolute()
    handler = ocp.PyTreeCheckpointHandler()  # not a Checkpointer: state/ has no step metadata of its own
    try:
        params = handler.metadata(state_dir).tree["params"]
        dtype = np.dtype(params["decoder"]["embed_tokens"]["embedding"].dtype)
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise checkpoint.CheckpointError(
            f"{step_dir}: cannot read the training checkpoint's params ({type(e).__name__}: {str(e)[:300]})"
        ) from None
    finally:
        handler.close()
    return ExportSource(
        config=config,
        params_path=state_dir,
        prefix=("params",),
        stacked="layers" in params["decoder"],
        dtype=dtype,
        tokenizer=tokenizer,
        name=str(step_dir),
    )


def _run_model(workdir: Path):
    """(OPTConfig, OPTTokenizer) of the run in `workdir`, from its config.yaml's `model` and `tokenizer`
    (preset:NAME, or a model directory or hub id and its tokenizer), as the training loop reads them."""
    run_file = workdir / "config.yaml"
    try:
        run = yaml.safe_load(run_file.read_text(encoding="utf-8"))
        model, tokenizer = run["model"], run.get("tokenizer")
    except FileNotFoundError:
        raise checkpoint.CheckpointError(
            f"{run_file} is missing: the run's config names the model's architecture"
        ) from None
    except (yaml.YAMLError, TypeError, KeyError) as e:
        raise checkpoint.CheckpointError(
            f"{run_file}: not a run config with a model ({type(e).__name__})"
        ) from None
    model_dir = None
    if is_preset(model):
        config = preset_config(model)
    else:
        model_dir = resolve_model_path(model)
        config = OPTConfig.from_json_file(model_dir / "config.json")
    source = resolve_path(tokenizer) if tokenizer else model_dir
    return config, OPTTokenizer.from_pretrained(source) if source is not None else None


def export_hf(
    path,
    output_dir,
    *,
    max_shard_size=DEFAULT_MAX_SHARD_SIZE,
    dtype: Optional[str] = None,
    overwrite: bool = False,
) -> Path:
    """Writes the model at `path` (see `find_source`: one of our model directories, a training checkpoint
    WORKDIR/checkpoints/STEP, or a workdir) as a Hugging Face OPT directory at `output_dir`, in `dtype`
    (default: as stored)."""
    limit = parse_size(max_shard_size)  # the arguments first, then the files
    out_dtype = np.dtype(as_dtype(dtype)) if dtype else None
    check_output_dir(output_dir, overwrite)
    source = find_source(path)
    out_dtype = out_dtype or source.dtype
    if out_dtype.name not in _SAFETENSORS_NAMES:
        raise ValueError(f"cannot export dtype {out_dtype.name}")
    config = source.config

    # Tensor order: grouped by stored array, so each stacked array is read once.
    groups: dict[tuple, list] = {}
    for spec in tensor_specs(config):
        stored, layer = stacked_location(spec.path) if source.stacked else (tuple(spec.path), None)
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
        reader = checkpoint.ParamsReader(params_path=source.params_path)
        weight_map, total = {}, 0
        names = (
            ["model.safetensors"]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        for name, shard in zip(names, shards):
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for spec, _layer, _ in shard:
                nbytes = math.prod(spec.hf_shape) * out_dtype.itemsize
                header["model." + spec.hf_key if spec.hf_key != "lm_head.weight" else spec.hf_key] = {
                    "dtype": _SAFETENSORS_NAMES[out_dtype.name],
                    "shape": list(spec.hf_shape),
                    "data_offsets": [offset, offset + nbytes],
                }
                offset += nbytes
            header_bytes = json.dumps(header, separators=(",", ":")).encode()
            header_bytes += b" " * (-len(header_bytes) % 8)
            with open(tmp / name, "wb") as f:
                f.write(len(header_bytes).to_bytes(8, "little"))
                f.write(header_bytes)
                for spec, layer, stored in shard:
                    # One layer of a stacked array at a time: memory holds one tensor, not the model.
                    keys = source.prefix + stored
                    array = reader.read(keys) if layer is None else reader.read_layer(keys, layer)
                    tensor = np.ascontiguousarray(spec.to_hf(np.asarray(array))).astype(out_dtype, copy=False)
                    if tuple(tensor.shape) != tuple(spec.hf_shape):
                        raise checkpoint.CheckpointError(
                            f"{source.name}: {'/'.join(keys)} gives {spec.hf_key} shape {tensor.shape}, "
                            f"the config needs {spec.hf_shape}"
                        )
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
        (tmp / GENERATION_CONFIG_FILE).write_text(json.dumps(generation_config(config), indent=2) + "\n")
        _write_tokenizer(source.tokenizer, tmp)
    return Path(output_dir)


def _write_tokenizer(tokenizer, directory: Path) -> None:
    if isinstance(tokenizer, Path):
        for file in TOKENIZER_FILES:
            if (tokenizer / file).is_file():
                shutil.copy2(tokenizer / file, directory / file)
    elif tokenizer is not None:
        tokenizer.save_pretrained(directory)


__all__ = [
    "export_hf",
    "find_source",
    "ExportSource",
    "generation_config",
    "parse_size",
    "DEFAULT_MAX_SHARD_SIZE",
]
