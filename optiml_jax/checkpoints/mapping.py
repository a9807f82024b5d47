"""Name and shape mapping between Hugging Face OPT state dicts and our Flax params, both ways.

No file I/O here: readers hand us tensors one at a time (so a converter can stream), and writers
take what we return. Every check (missing, unexpected, wrongly shaped tensors) names the HF key.

Our params are the contents of the Flax "params" collection. Layers are either unstacked
(`decoder/layers_{i}/...`, the model with scan_layers=False) or stacked on a leading axis
(`decoder/layers/...`, scan_layers=True); `stack_layers` / `unstack_layers` convert, and
`stacked_location` says where one layer's array lives in the stacked tree.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Mapping, Optional

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
        TensorSpec(
            "decoder.embed_tokens.weight",
            ("decoder", "embed_tokens", "embedding"),
            (v, dw),
            _identity,
            _identity,
        ),
        TensorSpec(
            "decoder.embed_positions.weight",
            ("decoder", "embed_positions", "embedding"),
            (cfg.num_positions, h),
            _identity,
            _identity,
        ),
    ]
    if cfg.has_projections:
        specs += [
            TensorSpec(
                "decoder.project_in.weight",
                ("decoder", "project_in", "kernel"),
                (h, dw),
                _transpose,
                _transpose,
            ),
            TensorSpec(
                "decoder.project_out.weight",
                ("decoder", "project_out", "kernel"),
                (dw, h),
                _transpose,
                _transpose,
            ),
        ]
    if cfg.has_final_layer_norm and cfg.layer_norm_elementwise_affine:
        specs += [
            TensorSpec(
                "decoder.final_layer_norm.weight",
                ("decoder", "final_layer_norm", "scale"),
                (h,),
                _identity,
                _identity,
            ),
            TensorSpec(
                "decoder.final_layer_norm.bias",
                ("decoder", "final_layer_norm", "bias"),
                (h,),
                _identity,
                _identity,
            ),
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
            specs.append(
                TensorSpec(
                    f"{hf}.self_attn.{proj}.weight",
                    ours + ("self_attn", proj, "kernel"),
                    (h, h),
                    qkv_kernel,
                    qkv_kernel_back,
                )
            )
            if cfg.enable_bias:
                specs.append(
                    TensorSpec(
                        f"{hf}.self_attn.{proj}.bias",
                        ours + ("self_attn", proj, "bias"),
                        (h,),
                        head_bias,
                        head_bias_back,
                    )
                )
        specs.append(
            TensorSpec(
                f"{hf}.self_attn.out_proj.weight",
                ours + ("self_attn", "out_proj", "kernel"),
                (h, h),
                out_kernel,
                out_kernel_back,
            )
        )
        if cfg.enable_bias:
            specs.append(
                TensorSpec(
                    f"{hf}.self_attn.out_proj.bias",
                    ours + ("self_attn", "out_proj", "bias"),
                    (h,),
                    _identity,
                    _identity,
                )
            )
        if cfg.layer_norm_elementwise_affine:
            for norm in ("self_attn_layer_norm", "final_layer_norm"):
                specs.append(
                    TensorSpec(f"{hf}.{norm}.weight", ours + (norm, "scale"), (h,), _identity, _identity)
                )
                specs.append(
                    TensorSpec(f"{hf}.{norm}.bias", ours + (norm, "bias"), (h,), _identity, _identity)
                )
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
_IGNORABLE = re.compile(
    r"^(decoder\.version|decoder\.embed_positions\._float_tensor|"
    r"decoder\.layers\.\d+\.self_attn\.(bias|masked_bias))$"
)


def normalize_hf_key(key: str) -> str:
    """Strips the `model.` prefix that some hub checkpoints have and others lack."""
    return key[len("model.") :] if key.startswith("model.") else key


class TensorChecker:
    """Checks HF tensors against a config as they stream by, one at a time: every key known (or one that
    holds no weights of ours), none twice, every shape right, none missing at the end. A tied
    `lm_head.weight` is checked for shape and then skipped (the head reads embed_tokens; several hub
    checkpoints omit it). Loading (hf_to_params) and converting (convert.ParamStager) both use it;
    errors name `source` and the key."""

    def __init__(self, config: OPTConfig, source: str = "checkpoint"):
        self.config, self.source = config, source
        self.specs = {spec.hf_key: spec for spec in tensor_specs(config)}
        self.seen: set[str] = set()

    def check(self, raw_key: str, shape, source: Optional[str] = None) -> Optional[TensorSpec]:
        """The spec of a tensor to keep, or None for one to skip; WeightsError for a bad one."""
        source = source or self.source
        key = normalize_hf_key(raw_key)
        shape = tuple(shape)
        if self.config.tie_word_embeddings and key == "lm_head.weight":
            expected = (self.config.vocab_size, self.config.word_embed_proj_dim)
            if shape != expected:
                raise WeightsError(f"{source}: {raw_key} has shape {shape}, expected {expected}")
            return None
        spec = self.specs.get(key)
        if spec is None:
            if _IGNORABLE.match(key):
                return None
            raise WeightsError(f"{source}: unexpected tensor {raw_key} for this OPT config")
        if key in self.seen:
            raise WeightsError(f"{source}: tensor {raw_key} appears twice (with and without 'model.'?)")
        if shape != spec.hf_shape:
            raise WeightsError(
                f"{source}: {raw_key} has shape {shape}, expected {spec.hf_shape} for this config"
            )
        self.seen.add(key)
        return spec

    def missing(self) -> list[str]:
        return [k for k in self.specs if k not in self.seen]

    def check_complete(self, source: Optional[str] = None) -> None:
        missing = self.missing()
        if missing:
            raise WeightsError(
                f"{source or self.source}: missing tensor(s): {', '.join(missing[:10])}"
                + (" ..." if len(missing) > 10 else "")
            )


def hf_to_params(
    tensors: Iterable[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
    config: OPTConfig,
    *,
    scan_layers: bool = False,
    dtype=None,
    source: str = "checkpoint",
) -> dict:
    """Builds our params from HF (key, tensor) pairs, each checked by a TensorChecker; `source` names the
    file(s) in errors."""
    checker = TensorChecker(config, source)
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    params: dict = {}
    for raw_key, tensor in items:
        array = np.asarray(tensor)
        spec = checker.check(raw_key, array.shape)
        if spec is None:
            continue
        array = spec.to_flax(array)
        if dtype is not None:
            array = array.astype(dtype)
        set_path(params, spec.path, array)
    checker.check_complete()
    return stack_layers(params, config.num_hidden_layers) if scan_layers else params


def stacked_location(path: Path) -> tuple[Path, Optional[int]]:
    """Where an unstacked path lives in the stacked layout: ("decoder", "layers_3", "fc1", "kernel") ->
    (("decoder", "layers", "fc1", "kernel"), 3); a path outside the layers -> (path, None)."""
    if len(path) > 1 and path[0] == "decoder" and path[1].startswith("layers_"):
        return ("decoder", "layers") + tuple(path[2:]), int(path[1][len("layers_") :])
    return tuple(path), None


def stack_layers(params: dict, num_layers: int, stack: Optional[Callable] = None) -> dict:
    """`decoder/layers_{i}/...` -> `decoder/layers/...` with a leading layer axis (what nn.scan uses).
    `stack(*per_layer_arrays)` builds each stacked leaf (default np.stack; pass jnp.stack for device
    arrays, or something lazy to avoid a copy)."""
    import jax  # local: keep this module importable without initialising a backend

    stack = stack or (lambda *xs: np.stack(xs))
    decoder = dict(params["decoder"])
    if "layers" in decoder:
        return params
    layers = [decoder.pop(f"layers_{i}") for i in range(num_layers)]
    decoder["layers"] = jax.tree_util.tree_map(stack, *layers)
    return {**params, "decoder": decoder}


def unstack_layers(params: dict, num_layers: int, shardings: Optional[dict] = None) -> dict:
    """Inverse of `stack_layers`, for numpy, device or traced arrays. Each stacked array is dropped
    from the tree once split, so outside jit the stack and its layers are not all held at once; with
    `shardings` (of the unstacked params) each layer's array is placed into its shards."""
    import jax

    decoder = dict(params["decoder"])
    flat, treedef = jax.tree_util.tree_flatten(decoder.pop("layers"))
    targets = None
    if shardings is not None:
        targets = [
            jax.tree_util.tree_flatten(shardings["decoder"][f"layers_{i}"])[0] for i in range(num_layers)
        ]
    per_layer = [[None] * len(flat) for _ in range(num_layers)]
    for j in range(len(flat)):
        leaf, flat[j] = flat[j], None
        for i in range(num_layers):
            piece = leaf[i]
            per_layer[i][j] = piece if targets is None else jax.device_put(piece, targets[i][j])
        del leaf
    for i in range(num_layers):
        decoder[f"layers_{i}"] = jax.tree_util.tree_unflatten(treedef, per_layer[i])
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
