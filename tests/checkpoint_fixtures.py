"""Checkpoint fixtures from a Hugging Face model: the hub's HF layouts, and metaseq checkpoints
built following docs/spec opt_formats.md §3.

metaseq builders are independent of optiml_jax's reader: written from the spec's description of what
metaseq saves.
  consolidated:  fused qkv_proj = [K; V; Q], decoder.layer_norm, project_in_dim / project_out_dim,
                 decoder.version, a `cfg` (dict or argparse.Namespace) under "model".
  model-parallel parts: embed_tokens rows split (vocab-parallel); each part's qkv = [K_r; V_r; Q_r];
                 fc1 rows split; out_proj / fc2 weight columns split; biases of row-parallel layers,
                 norms and positions replicated.
  FSDP-flattened: per part, one flat_param_0 per FSDP instance (root + each layer), chunked over
                 `world_size` ranks like torch.chunk, each chunk right-padded to chunk 0's size, with
                 that rank's shard_metadata (names, shapes, numels, padding).
"""

from __future__ import annotations

import argparse
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch


def metaseq_state(hf_state: dict, config) -> "OrderedDict[str, np.ndarray]":
    """Unflattened single-part metaseq names from HF names (fused qkv in K, V, Q order)."""
    sd = {k[len("model.") :] if k.startswith("model.") else k: v for k, v in hf_state.items()}
    out = OrderedDict()
    out["decoder.version"] = np.array([3.0], np.float32)
    out["decoder.embed_tokens.weight"] = sd["decoder.embed_tokens.weight"]
    out["decoder.embed_positions.weight"] = sd["decoder.embed_positions.weight"]
    if config.has_projections:
        out["decoder.project_in_dim.weight"] = sd["decoder.project_in.weight"]
        out["decoder.project_out_dim.weight"] = sd["decoder.project_out.weight"]
    if config.has_final_layer_norm:
        out["decoder.layer_norm.weight"] = sd["decoder.final_layer_norm.weight"]
        out["decoder.layer_norm.bias"] = sd["decoder.final_layer_norm.bias"]
    for i in range(config.num_hidden_layers):
        p = f"decoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[p + f"self_attn.qkv_proj.{kind}"] = np.concatenate(
                [sd[p + f"self_attn.{n}_proj.{kind}"] for n in ("k", "v", "q")], axis=0
            )
        for name in (
            "self_attn.out_proj.weight",
            "self_attn.out_proj.bias",
            "self_attn_layer_norm.weight",
            "self_attn_layer_norm.bias",
            "fc1.weight",
            "fc1.bias",
            "fc2.weight",
            "fc2.bias",
            "final_layer_norm.weight",
            "final_layer_norm.bias",
        ):
            out[p + name] = sd[p + name]
    return out


def split_model_parallel(state: dict, mp: int) -> list:
    """Megatron parts of an unflattened state (spec §3.4)."""
    parts = [OrderedDict() for _ in range(mp)]
    for key, value in state.items():
        if key == "decoder.embed_tokens.weight" or key.endswith(("fc1.weight", "fc1.bias")):
            chunks = np.split(value, mp, axis=0)
        elif "qkv_proj" in key:
            k, v, q = np.split(value, 3, axis=0)
            chunks = [
                np.concatenate([a, b, c], axis=0)
                for a, b, c in zip(np.split(k, mp), np.split(v, mp), np.split(q, mp))
            ]
        elif key.endswith(("out_proj.weight", "fc2.weight")):
            chunks = np.split(value, mp, axis=1)
        else:
            chunks = [value] * mp
        for part, chunk in zip(parts, chunks):
            part[key] = np.ascontiguousarray(chunk)
    return parts


def flatten_fsdp(state: dict, world_size: int, wrapper_prefix: str = "") -> list:
    """[(model dict, shard_metadata)] per rank of one part (fairscale flatten + _get_shard)."""
    groups: "OrderedDict[str, list]" = OrderedDict([("", [])])
    buffers = []
    for key in state:
        if key == "decoder.version":
            buffers.append(key)
            continue
        parts = key.split(".")
        if parts[1] == "layers":
            groups.setdefault(".".join(parts[:3]), []).append(key)
        else:
            groups[""].append(key)
    models = [OrderedDict() for _ in range(world_size)]
    metas = [{"param_metadata": [], "buffer_names": buffers} for _ in range(world_size)]
    for fsdp_path, keys in groups.items():
        names = [k[len(fsdp_path) + 1 :] if fsdp_path else k for k in keys]
        flat = torch.cat([torch.from_numpy(np.ascontiguousarray(state[k])).reshape(-1) for k in keys])
        chunks = list(torch.flatten(flat).chunk(world_size))
        while len(chunks) < world_size:
            chunks.append(flat.new_empty(0))
        for rank, chunk in enumerate(chunks):
            padding = chunks[0].numel() - chunk.numel()
            shard = torch.nn.functional.pad(chunk, [0, padding]) if padding else chunk.clone()
            key = f"{fsdp_path}.flat_param_0" if fsdp_path else "flat_param_0"
            models[rank][key] = shard
            metas[rank]["param_metadata"].append(
                {
                    "fsdp_path": fsdp_path,
                    "params": {
                        "flat_param_0": {
                            "names": [wrapper_prefix + n for n in names],
                            "shapes": [torch.Size(state[k].shape) for k in keys],
                            "numels": [int(np.prod(state[k].shape)) for k in keys],
                            "padding": padding,
                        }
                    },
                    "no_broadcast_optim_state": False,
                    "shared_param_info": [],
                }
            )
    for rank in range(world_size):
        for key in buffers:
            models[rank][key] = torch.from_numpy(np.ascontiguousarray(state[key]))
    return list(zip(models, metas))


def model_cfg(config, as_namespace: bool = True, model_parallel_size: int = 1):
    fields = dict(
        model_parallel_size=model_parallel_size,
        decoder_layers=config.num_hidden_layers,
        decoder_embed_dim=config.hidden_size,
        decoder_ffn_embed_dim=config.ffn_dim,
        decoder_attention_heads=config.num_attention_heads,
        decoder_normalize_before=config.do_layer_norm_before,
        activation_fn=config.activation_function,
        max_target_positions=config.max_position_embeddings,
        dropout=0.0,
        attention_dropout=0.0,
        decoder_input_dim=config.word_embed_proj_dim,
        share_decoder_input_output_embed=True,
    )
    return argparse.Namespace(**fields) if as_namespace else fields


def _to_torch(model: dict) -> "OrderedDict":
    return OrderedDict(
        (k, v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v)))
        for k, v in model.items()
    )


def _checkpoint(model: dict, cfg, extra=None) -> dict:
    ckpt = {
        "model": _to_torch(model),
        "cfg": {"model": cfg, "task": {"_name": "language_modeling"}},
        "optimizer_history": [{"num_updates": 4000, "optimizer_name": "FP16Optimizer"}],
        "extra_state": {"metrics": {}, "previous_training_time": 12.5},
        "args": None,
    }
    ckpt.update(extra or {})
    return ckpt


def write_consolidated(
    directory: Path, hf_state: dict, config, *, namespace_cfg=True, with_cfg=True, dtype=np.float32
) -> Path:
    state = OrderedDict(
        (k, v.astype(dtype) if k != "decoder.version" else v)
        for k, v in metaseq_state(hf_state, config).items()
    )
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "restored.pt"
    ckpt = _checkpoint(state, model_cfg(config, namespace_cfg))
    if not with_cfg:
        ckpt["cfg"] = None
    torch.save(ckpt, path)
    return path


def write_model_parallel(
    directory: Path, hf_state: dict, config, mp: int = 2, prefix: str = "checkpoint_1_4000.pt-"
) -> list:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, part in enumerate(split_model_parallel(metaseq_state(hf_state, config), mp)):
        path = directory / f"{prefix}model_part-{k}.pt"
        torch.save(_checkpoint(part, model_cfg(config, as_namespace=False, model_parallel_size=mp)), path)
        paths.append(path)
    return paths


def write_fsdp(
    directory: Path,
    hf_state: dict,
    config,
    mp: int = 2,
    world_size: int = 1,
    prefix: str = "checkpoint_last-",
) -> list:
    """Flattened parts: `{prefix}model_part-K.pt` (world_size 1, the v1_20220502 release layout) or
    raw `{prefix}model_part-K-shardN.pt` files."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, part in enumerate(split_model_parallel(metaseq_state(hf_state, config), mp)):
        for rank, (model, meta) in enumerate(flatten_fsdp(part, world_size, wrapper_prefix="_fpw_module.")):
            name = (
                f"{prefix}model_part-{k}.pt" if world_size == 1 else f"{prefix}model_part-{k}-shard{rank}.pt"
            )
            torch.save(
                _checkpoint(model, model_cfg(config, model_parallel_size=mp), {"shard_metadata": meta}),
                directory / name,
            )
            paths.append(directory / name)
    return paths


# ---------------------------------------------------------------------------------------- HF layouts
HF_LAYOUTS = ("bin", "safetensors", "sharded_safetensors", "sharded_bin", "no_model_prefix_no_lm_head")


def write_hf_dir(directory: Path, hf_model, config, layout: str) -> Path:
    """An HF OPT directory as the hub has them: config.json plus weights in the given layout."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config.to_json_file(directory / "config.json")
    state = OrderedDict((k, v.detach().clone().contiguous()) for k, v in hf_model.state_dict().items())
    if layout == "bin":
        torch.save(state, directory / "pytorch_model.bin")
    elif layout == "safetensors":
        state.pop("lm_head.weight", None)  # safetensors refuses shared storage; HF ties on load
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    elif layout in ("sharded_safetensors", "sharded_bin"):
        keys = list(state)
        halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
        ext = "safetensors" if layout == "sharded_safetensors" else "bin"
        weight_map = {}
        for i, half in enumerate(halves):
            name = (
                f"model-{i + 1:05d}-of-00002.safetensors"
                if ext == "safetensors"
                else f"pytorch_model-{i + 1:05d}-of-00002.bin"
            )
            shard = OrderedDict((k, state[k]) for k in half)
            if ext == "safetensors":
                save_file(shard, str(directory / name), metadata={"format": "pt"})
            else:
                torch.save(shard, directory / name)
            weight_map.update({k: name for k in half})
        index = "model.safetensors.index.json" if ext == "safetensors" else "pytorch_model.bin.index.json"
        (directory / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    elif layout == "no_model_prefix_no_lm_head":  # like facebook/opt-6.7b/13b/30b and opt-350m
        stripped = OrderedDict((k[len("model.") :], v) for k, v in state.items() if k.startswith("model."))
        torch.save(stripped, directory / "pytorch_model.bin")
    else:
        raise ValueError(layout)
    return directory
