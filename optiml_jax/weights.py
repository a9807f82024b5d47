"""Name and shape mapping between Hugging Face OPT state dicts and our Flax params, both ways.

No file I/O here: readers hand us tensors one at a time (so a converter can stream), and writers
take what we return. Every check (missing, unexpected, wrongly shaped tensors) names the HF key.

Our params are the contents of the Flax "params" collection. Layers are either unstacked
(`decoder/layers_{i}/...`, the model with scan_layers=False) or stacked on a leading axis
(`decoder/layers/...`, scan_layers=True); `stack_layers` / `unstack_layers` convert.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

from optiml_jax.config import OPTConfig

Path = tuple  # a path of keys into the nested params dict


class WeightsError(ValueError):
    """A tensor is missing, unexpected or wrongly shaped; the message names its key."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One HF tensor and where it lives in our params."""
    hf_key: str  # without the "model." prefix, e.g. "decoder.layers.0.fc1.weight"
    path: Path  # in the unstacked params, e.g. ("decoder", "layers_0", "fc1", "kernel")
    hf_shape: tuple
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _identity(x):
    return x


def _transpose(x):
    return np.ascontiguousarray(np.swapaxes(x, 0, 1))


def tensor_specs(config: OPTConfig) -> list[TensorSpec]:
    """Every tensor of an HF `OPTForCausalLM` checkpoint, in HF's order."""
    cfg = config
    h, f, v, dw = cfg.hidden_size, cfg.ffn_dim, cfg.vocab_size, cfg.word_embed_proj_dim
    nh, hd = cfg.num_attention_heads, cfg.head_dim
    specs = [
        TensorSpec("decoder.embed_tokens.weight", ("decoder", "embed_tokens", "embedding"), (v, dw),
                   _identity, _identity),
        TensorSpec("decoder.embed_positions.weight", ("decoder", "embed_positions", "embedding"),
                   (cfg.num_positions, h), _identity, _identity),
    ]
    if cfg.has_projections:
        specs += [
            TensorSpec("decoder.project_in.weight", ("decoder", "project_in", "kernel"), (h, dw),
                       _transpose, _transpose),
            TensorSpec("decoder.project_out.weight", ("decoder", "project_out", "kernel"), (dw, h),
                       _transpose, _transpose),
        ]
    if cfg.has_final_layer_norm and cfg.layer_norm_elementwise_affine:
        specs += [
            TensorSpec("decoder.final_layer_norm.weight", ("decoder", "final_layer_norm", "scale"), (h,),
                       _identity, _identity),
            TensorSpec("decoder.final_layer_norm.bias", ("decoder", "final_layer_norm", "bias"), (h,),
                       _identity, _identity),
        ]

    # HF Linear weights are [out, in]; ours split the head dimension out so "heads" can be sharded.
    def qkv_kernel(x):
        return np.ascontiguousarray(x.T.reshape(h, nh, hd))

    def qkv_kernel_back(x):
        return np.ascontiguousarray(x.reshape(h, nh * hd).T)

    def out_kernel(x):
        return np.ascontiguousarray(x.T.reshape(nh, hd, h))

    def out_kernel_back(x):
        return np.ascontiguousarray(x.reshape(nh * hd, h).T)

    def head_bias(x):
        return x.reshape(nh, hd)

    def head_bias_back(x):
        return x.reshape(nh * hd)

    for i in range(cfg.num_hidden_layers):
        hf, ours = f"decoder.layers.{i}", ("decoder", f"layers_{i}")
        for proj in ("q_proj", "k_proj", "v_proj"):
            specs.append(TensorSpec(f"{hf}.self_attn.{proj}.weight", ours + ("self_attn", proj, "kernel"),
                                    (h, h), qkv_kernel, qkv_kernel_back))
            if cfg.enable_bias:
                specs.append(TensorSpec(f"{hf}.self_attn.{proj}.bias", ours + ("self_attn", proj, "bias"),
                                        (h,), head_bias, head_bias_back))
        specs.append(TensorSpec(f"{hf}.self_attn.out_proj.weight", ours + ("self_attn", "out_proj", "kernel"),
                                (h, h), out_kernel, out_kernel_back))
        if cfg.enable_bias:
            specs.append(TensorSpec(f"{hf}.self_attn.out_proj.bias", ours + ("self_attn", "out_proj", "bias"),
                                    (h,), _identity, _identity))
        if cfg.layer_norm_elementwise_affine:
            for norm in ("self_attn_layer_norm", "final_layer_norm"):
                specs.append(TensorSpec(f"{hf}.{norm}.weight", ours + (norm, "scale"), (h,),
                                        _identity, _identity))
                specs.append(TensorSpec(f"{hf}.{norm}.bias", ours + (norm, "bias"), (h,),
                                        _identity, _identity))
        specs.append(TensorSpec(f"{hf}.fc1.weight", ours + ("fc1", "kernel"), (f, h), _transpose, _transpose))
        if cfg.enable_bias:
            specs.append(TensorSpec(f"{hf}.fc1.bias", ours + ("fc1", "bias"), (f,), _identity, _identity))
        specs.append(TensorSpec(f"{hf}.fc2.weight", ours + ("fc2", "kernel"), (h, f), _transpose, _transpose))
        if cfg.enable_bias:
            specs.append(TensorSpec(f"{hf}.fc2.bias", ours + ("fc2", "bias"), (h,), _identity, _identity))
    if not cfg.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", ("lm_head", "kernel"), (v, dw), _transpose, _transpose))
    return specs


# Keys that HF or metaseq-derived checkpoints carry and that hold no weights of ours.
_IGNORABLE = re.compile(r"^(decoder\.version|decoder\.embed_positions\._float_tensor|"
                        r"decoder\.layers\.\d+\.self_attn\.(bias|masked_bias))$")


def normalize_hf_key(key: str) -> str:
    """Strips the `model.` prefix that some hub checkpoints have and others lack."""
    return key[len("model."):] if key.startswith("model.") else key


def hf_to_params(tensors: Iterable[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
                 config: OPTConfig, *, scan_layers: bool = False, dtype=None,
                 source: str = "checkpoint") -> dict:
    """Builds our params from HF (key, tensor) pairs, checking every key and shape.

    A missing `lm_head.weight` with tied embeddings is normal (several hub checkpoints omit it);
    a present one is checked for shape and otherwise ignored, since the head reads embed_tokens.
    `source` names the file(s) in errors.
    """
    by_key = {spec.hf_key: spec for spec in tensor_specs(config)}
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    params: dict = {}
    seen = set()
    unexpected = []
    for raw_key, tensor in items:
        key = normalize_hf_key(raw_key)
        if config.tie_word_embeddings and key == "lm_head.weight":
            expected = (config.vocab_size, config.word_embed_proj_dim)
            if tuple(tensor.shape) != expected:
                raise WeightsError(f"{source}: {raw_key} has shape {tuple(tensor.shape)}, expected {expected}")
            continue
        spec = by_key.get(key)
        if spec is None:
            if not _IGNORABLE.match(key):
                unexpected.append(raw_key)
            continue
        if key in seen:
            raise WeightsError(f"{source}: tensor {raw_key} appears twice (with and without 'model.'?)")
        seen.add(key)
        array = np.asarray(tensor)
        if tuple(array.shape) != spec.hf_shape:
            raise WeightsError(f"{source}: {raw_key} has shape {tuple(array.shape)}, expected "
                               f"{spec.hf_shape} for this config")
        array = spec.to_flax(array)
        if dtype is not None:
            array = array.astype(dtype)
        set_path(params, spec.path, array)
    if unexpected:
        raise WeightsError(f"{source}: unexpected tensor(s) for this OPT config: "
                           f"{', '.join(sorted(unexpected)[:10])}" + (" ..." if len(unexpected) > 10 else ""))
    missing = [k for k in by_key if k not in seen]
    if missing:
        raise WeightsError(f"{source}: missing tensor(s): {', '.join(missing[:10])}"
                           + (" ..." if len(missing) > 10 else ""))
    return stack_layers(params, config) if scan_layers else params


def params_to_hf(params: dict, config: OPTConfig, *, prefix: str = "model.",
                 include_lm_head: bool = True) -> Iterator[tuple[str, np.ndarray]]:
    """Yields HF (key, tensor) pairs, one at a time, from stacked or unstacked params.

    The tied `lm_head.weight` is yielded (as the embedding) when `include_lm_head`, because
    `transformers` expects to find it in the files it writes itself.
    """
    stacked = "layers" in params.get("decoder", {})
    for spec in tensor_specs(config):
        if stacked and spec.path[1].startswith("layers_"):
            layer = int(spec.path[1][len("layers_"):])
            array = np.asarray(get_path(params, ("decoder", "layers") + spec.path[2:])[layer])
        else:
            array = np.asarray(get_path(params, spec.path))
        key = spec.hf_key if spec.hf_key == "lm_head.weight" else prefix + spec.hf_key
        yield key, spec.to_hf(array)
    if include_lm_head and config.tie_word_embeddings:
        yield "lm_head.weight", np.asarray(get_path(params, ("decoder", "embed_tokens", "embedding")))


def stack_layers(params: dict, config: OPTConfig) -> dict:
    """`decoder/layers_{i}/...` -> `decoder/layers/...` with a leading layer axis (for nn.scan)."""
    decoder = dict(params["decoder"])
    layers = [decoder.pop(f"layers_{i}") for i in range(config.num_hidden_layers)]
    import jax  # local: keep this module importable without initialising a backend

    decoder["layers"] = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *layers)
    return {**params, "decoder": decoder}


def unstack_layers(params: dict, config: OPTConfig) -> dict:
    """Inverse of `stack_layers`."""
    import jax

    decoder = dict(params["decoder"])
    stacked = decoder.pop("layers")
    for i in range(config.num_hidden_layers):
        decoder[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], stacked)
    return {**params, "decoder": decoder}


def get_path(tree: dict, path: Path):
    node = tree
    for key in path:
        node = node[key]
    return node


def set_path(tree: dict, path: Path, value) -> None:
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
