"""`load_pretrained`: a local model directory or a hub id to (model, params, tokenizer).

A directory is either one of ours (`tools/convert_weights.py` or `checkpoint.save_model` output:
restored by Orbax, straight into shards when a mesh is given) or a Hugging Face OPT directory (read
one tensor at a time by `hf_checkpoint`, then placed).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optiml_jax.checkpoints import model_format as checkpoint
from optiml_jax.checkpoints.hf import WEIGHT_FILES, find_weight_files, iter_directory_tensors
from optiml_jax.checkpoints.mapping import hf_to_params
from optiml_jax.config import OPTConfig, as_dtype
from optiml_jax.model import OPTForCausalLM
from optiml_jax.model.attention import choose_implementation
from optiml_jax.model.kernels import KERNEL_BLOCK
from optiml_jax.paths import resolve_model_path
from optiml_jax.sharding import DEFAULT_RULES, param_shardings
from optiml_jax.tokenizer import OPTTokenizer


@dataclasses.dataclass
class Pretrained:
    """What a checkpoint holds, ready to run: `model.apply({"params": params}, ids)`."""

    model: OPTForCausalLM
    params: Any
    config: OPTConfig
    tokenizer: Any  # OPTTokenizer, or None when the directory has no tokenizer files
    path: Path


def load_pretrained(
    path_or_hub_id: str | os.PathLike,
    *,
    dtype=None,
    param_dtype=None,
    scan_layers: bool = True,
    mesh=None,
    rules=None,
    load_tokenizer: bool = True,
    attention: str = "auto",
) -> Pretrained:
    """Loads an OPT / OPT-IML model from a Hugging Face directory, a converted optiml-jax directory,
    or a hub id (when online).

    dtype: compute dtype ("float32", "bfloat16", "float16" or a jnp dtype); also the storage dtype
      of the params unless `param_dtype` is given. Defaults to float32.
    scan_layers: stacked layer weights under nn.scan (fast compiles) or one module per layer.
    mesh: a `jax.sharding.Mesh`; params are then placed in their shards per `rules`.
    attention: the attention kernel of whole-row passes (model/kernels IMPLEMENTATIONS; "auto"
      picks per platform and dtype). Decoding has its own.
    """
    compute_dtype = as_dtype(dtype) or as_dtype("float32")
    storage_dtype = as_dtype(param_dtype) or compute_dtype
    path = resolve_model_path(path_or_hub_id)
    config = OPTConfig.from_json_file(path / "config.json")

    # an AttentionError (a ValueError) now, not while tracing the first call: cuDNN on a CPU, float32 cuDNN
    choose_implementation(
        attention,
        platform=jax.default_backend(),
        dtype=compute_dtype,
        head_dim=config.head_dim,
        length=KERNEL_BLOCK,
        dropout=False,
    )
    model = OPTForCausalLM(
        config, dtype=compute_dtype, param_dtype=storage_dtype, scan_layers=scan_layers, attention=attention
    )

    if checkpoint.is_converted_checkpoint(path):
        params = checkpoint.restore_params(path, model, mesh=mesh, rules=rules)
    elif (path / checkpoint.PARAMS_DIR).is_dir():
        raise checkpoint.CheckpointError(
            f"{path / checkpoint.MARKER}: missing; {path} holds params/ (an optiml_jax model directory) "
            f"but not the file that says how to read them: the directory is incomplete, save or convert "
            f"it again"
        )
    else:
        find_weight_files(path)  # a clear error before anything else when there are no weights
        tensors = ((key, array) for key, array, _ in iter_directory_tensors(path))
        params = hf_to_params(
            tensors, config, scan_layers=scan_layers, dtype=np.dtype(storage_dtype), source=str(path)
        )
        params = _place(params, model, mesh, rules)
    tokenizer = None
    if load_tokenizer:
        tokenizer = _maybe_tokenizer(path)
    return Pretrained(model=model, params=params, config=config, tokenizer=tokenizer, path=path)


def _place(params, model, mesh, rules):
    if mesh is None:
        return jax.tree_util.tree_map(jnp.asarray, params)

    return jax.device_put(params, param_shardings(model, mesh, rules or DEFAULT_RULES))


def _maybe_tokenizer(path: Path):

    if not any((path / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        return None
    return OPTTokenizer.from_pretrained(path)


__all__ = ["Pretrained", "load_pretrained", "resolve_model_path", "WEIGHT_FILES"]
