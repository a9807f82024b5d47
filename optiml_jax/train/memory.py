"""An honest, up-front estimate of training memory per device, and a clear error when it won't fit.

Parameter, gradient and optimizer-state bytes are exact: they come from every parameter's shape and
its sharding under the logical axis rules on the configured mesh (no devices are needed, so a 30B
plan can be checked on a laptop). Activation bytes are an estimate from the layer structure and the
remat policy, following the per-layer accounting of Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models", section 4), adapted to what each JAX policy saves.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Optional

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import PartitionSpec

from optiml_jax.config import ConfigError, OPTConfig
from optiml_jax.model import OPTForCausalLM
from optiml_jax.model.attention import resolve_attention
from optiml_jax.model.kernels import AttentionShapes, KernelSpec
from optiml_jax.run_config import TrainSection
from optiml_jax.sharding import DEFAULT_RULES, abstract_params
from optiml_jax.train.loss import DEFAULT_CHUNK
from optiml_jax.train.trainable import Trainable, trainable_mask

log = logging.getLogger(__name__)

GiB = 1024**3


class InsufficientMemoryError(RuntimeError):
    """The run cannot fit in device memory; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    params: int  # bytes per device
    grads: int
    optimizer: int
    grad_accumulator: int
    activations: int
    logits: int
    devices: int
    notes: tuple = ()
    # AdamW's working set while it updates: the float32 updates and new moments before the old ones are
    # freed (XLA: twice the float32 gradient). The activations are gone by then, so the peak is the
    # larger of the two (calibrated on compiled steps of the 1.3B and 30B recipes, docs/finetuning.md).
    optimizer_update: int = 0

    @property
    def total(self) -> int:
        resident = self.params + self.grads + self.optimizer + self.grad_accumulator
        return resident + max(self.activations + self.logits, self.optimizer_update)

    def table(self) -> str:
        rows = [
            ("parameters", self.params),
            ("gradients", self.grads),
            ("optimizer state", self.optimizer),
            ("grad accumulator", self.grad_accumulator),
            ("activations (saved)", self.activations),
            ("logits + loss", self.logits),
            ("optimizer update", self.optimizer_update),
            ("total", self.total),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"memory per device (estimate, {self.devices} devices):"]
        lines += [f"  {name:<{width}}  {value / GiB:9.3f} GiB" for name, value in rows]
        lines += [f"  note: {note}" for note in self.notes]
        lines.append("  note: the total counts the larger of activations + logits and the optimizer update")
        return "\n".join(lines)


def _dtype_bytes(dtype) -> int:
    return np.dtype(dtype).itemsize


def sharded_param_bytes(
    config: OPTConfig,
    mesh_shape: dict,
    rules,
    *,
    scan_layers: bool = True,
    param_dtype="float32",
    trainable: Trainable = None,
) -> int:
    """Bytes of one device's shard of every parameter (or of the `trainable` ones: train/trainable.py),
    under `rules` on a mesh of `mesh_shape`."""
    model = OPTForCausalLM(config, param_dtype=param_dtype, scan_layers=scan_layers)
    boxed = abstract_params(model)
    specs = nn.get_partition_spec(boxed)
    shapes = nn.meta.unbox(boxed)
    rule_map = dict(rules)
    total = 0
    mask = trainable_mask(shapes, trainable)
    keep = jax.tree.leaves(mask) if mask is not None else [True] * len(jax.tree.leaves(shapes))
    leaves_specs = [pair for pair, kept in zip(_leaves_with_specs(specs, shapes), keep) if kept]
    for spec, shape in leaves_specs:
        shard = list(shape.shape)
        for dim, logical in enumerate(tuple(spec) + (None,) * (len(shard) - len(spec))):
            axes = rule_map.get(logical) if logical is not None else None
            if axes is None:
                continue
            axes = axes if isinstance(axes, tuple) else (axes,)
            split = math.prod(mesh_shape.get(a, 1) for a in axes)
            if split > 1 and shard[dim] % split == 0:
                shard[dim] //= split
        total += math.prod(shard) * _dtype_bytes(shape.dtype)
    return total


def _leaves_with_specs(specs, shapes):
    spec_leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    shape_leaves = jax.tree_util.tree_leaves(shapes)
    return list(zip(spec_leaves, shape_leaves))


def activation_bytes_per_layer(
    config: OPTConfig,
    tokens: int,
    seq_len: int,
    batch_rows: int,
    tensor: int,
    remat_policy: str,
    compute_dtype,
    kernel: KernelSpec,
) -> int:
    """Bytes one layer keeps for the backward pass, for `tokens` = rows x seq_len on one device, with
    the attention kernel `kernel` (what it keeps beyond its inputs and output is its spec's)."""
    h, f = config.hidden_size, config.ffn_dim
    act = _dtype_bytes(compute_dtype)
    shapes = _attention_shapes(config, seq_len, tensor)
    attention_state = tokens * kernel.saved_bytes_per_token(shapes, np.dtype(compute_dtype))
    if remat_policy == "full":
        return tokens * h * act  # the layer input only; the layer is recomputed in the backward pass
    if remat_policy == "dots_no_batch":
        # weight matmul outputs: q, k, v, out_proj, fc1, fc2 (attention einsums are recomputed)
        return tokens * (4 * h // tensor + f // tensor + h) * act
    if remat_policy == "dots":
        # the same and, where the kernel names them (model.REMAT_POLICIES), attention's output and state
        if not kernel.saved_names:
            return tokens * (4 * h // tensor + f // tensor + h) * act
        return tokens * (5 * h // tensor + f // tensor + h) * act + attention_state
    # "none": what the backward pass reads (Korthikanti et al.'s count, less what our LayerNorm, ReLU
    # and attention recompute): each LayerNorm's input and output, q, k, v and attention's output,
    # the MLP activation, two boolean dropout masks, plus the attention state above.
    return tokens * ((4 * h + 4 * h // tensor + f // tensor) * act + 2 * h) + attention_state


def _attention_shapes(config: OPTConfig, seq_len: int, tensor: int) -> AttentionShapes:
    """One device's attention in training: whole rows of `seq_len`, heads split over `tensor`."""
    return AttentionShapes(
        length=seq_len,
        head_dim=config.head_dim,
        heads=max(config.num_attention_heads // tensor, 1),
        dropout=config.attention_dropout > 0.0,
    )


def estimate_training_memory(
    config: OPTConfig,
    *,
    mesh_shape: dict,
    global_batch: int,
    seq_len: int,
    grad_accum_steps: int = 1,
    remat_policy: str = "none",
    compute_dtype="float32",
    param_dtype="float32",
    rules=None,
    scan_layers: bool = True,
    attention: str = "auto",
    platform: Optional[str] = None,
    trainable: Trainable = None,
) -> MemoryEstimate:
    """Per-device bytes of one training step with AdamW (float32 moments), with the attention kernel
    that `attention` runs on `platform` (None: the running backend); gradients and moments are counted
    for the `trainable` parameters only (train/trainable.py; None: all)."""

    rules = rules or DEFAULT_RULES
    devices = math.prod(mesh_shape.values())
    data_parallel = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
    tensor = mesh_shape.get("tensor", 1)
    params = sharded_param_bytes(config, mesh_shape, rules, scan_layers=scan_layers, param_dtype=param_dtype)
    per_param = _dtype_bytes(param_dtype)
    trained = params
    if trainable is not None:
        trained = sharded_param_bytes(
            config, mesh_shape, rules, scan_layers=scan_layers, param_dtype=param_dtype, trainable=trainable
        )
    moments = 2 * trained // per_param * 4  # Adam mu and nu in float32
    grads = trained // per_param * 4
    accumulator = grads if grad_accum_steps > 1 else 0
    micro_rows = max(global_batch // grad_accum_steps // data_parallel, 1)
    tokens = micro_rows * seq_len
    shapes = _attention_shapes(config, seq_len, tensor)
    kernel, _ = resolve_attention(attention, platform, compute_dtype, shapes)
    saved = activation_bytes_per_layer(
        config, tokens, seq_len, micro_rows, tensor, remat_policy, compute_dtype, kernel
    )
    activations = config.num_hidden_layers * saved
    if remat_policy != "none":
        # The backward pass recomputes one layer at a time and holds that layer's whole working set: without
        # this term the "full" estimate was ~3x below XLA's compiled temp size (tests/test_reliability.py).
        whole_layer = activation_bytes_per_layer(
            config, tokens, seq_len, micro_rows, tensor, "none", compute_dtype, kernel
        )
        activations += max(whole_layer - saved, 0)
    # Whatever is saved, one layer's attention backward working set (blockwise: its float32
    # probabilities) exists while its backward pass runs.
    activations += tokens * kernel.backward_bytes_per_token(shapes, np.dtype(compute_dtype))
    # The fused head + loss (loss.py): float32 logits, softmax and their gradient for one chunk of
    # positions over the (tensor-split) vocabulary, this batch shard's float32 partial sum of the head's
    # gradient (vocab x d, not split over fsdp), and the gradient wrt the final hidden states, kept from
    # the forward pass.
    local_vocab = config.vocab_size // tensor if config.vocab_size % tensor == 0 else config.vocab_size
    head_dim = config.word_embed_proj_dim if config.has_projections else config.hidden_size
    logits = (
        3 * micro_rows * min(DEFAULT_CHUNK, seq_len) * local_vocab * 4
        + local_vocab * head_dim * 4
        + tokens * head_dim * 4
    )
    notes = [
        f"micro-batch of {micro_rows} sequence(s) x {seq_len} tokens per device, remat={remat_policy}, "
        f"attention={kernel.name}",
        "XLA temporaries and fragmentation come on top; keep ~10-20% headroom (the compiler's own figure "
        "for a TPU or GPU target: optiml-finetune --aot TARGET)",
    ]
    return MemoryEstimate(
        params=params,
        grads=grads,
        optimizer=moments,
        grad_accumulator=accumulator,
        activations=activations,
        logits=logits,
        devices=devices,
        notes=tuple(notes),
        optimizer_update=2 * grads,
    )


def device_memory_bytes(device=None) -> Optional[int]:
    """Usable memory of one device: the accelerator's limit, or host RAM (shared by CPU devices)."""
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # CPU backends may not implement it
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None
        return total // max(jax.local_device_count(), 1)
    return None


def check_fits(estimate: MemoryEstimate, available: Optional[int], *, headroom: float = 0.9) -> None:
    """Raises InsufficientMemoryError, before anything is compiled, when the estimate exceeds memory."""
    if available is None or estimate.total <= headroom * available:
        return
    raise InsufficientMemoryError(
        f"this run needs about {estimate.total / GiB:.2f} GiB per device but {available / GiB:.2f} GiB "
        f"is available ({headroom:.0%} usable).\n{estimate.table()}\n"
        "Try: a smaller train.batch_size or more train.grad_accum_steps, train.remat_policy=full, "
        "bfloat16 compute, or more fsdp/tensor parallelism in mesh.*"
    )


# ---------------------------------------------------------------------- the start-up check of a run
def memory_limit_bytes(train: TrainSection, mesh) -> Optional[int]:
    """OPTIML_JAX_MEMORY_LIMIT_GIB, else train.memory_limit_gib, else what one local device of the mesh
    has."""
    env = os.environ.get("OPTIML_JAX_MEMORY_LIMIT_GIB")
    if env:
        try:
            return int(float(env) * GiB)
        except ValueError:
            raise ConfigError(f"OPTIML_JAX_MEMORY_LIMIT_GIB={env!r} is not a number") from None
    if train.memory_limit_gib > 0:
        return int(train.memory_limit_gib * GiB)
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    return device_memory_bytes(local[0] if local else None)


# What sizes a step in a run's train section, which estimate_training_memory takes under the same names.
_STEP_SETTINGS = (
    "seq_len",
    "grad_accum_steps",
    "remat_policy",
    "compute_dtype",
    "param_dtype",
    "scan_layers",
)


def estimate_run(
    t: TrainSection,
    opt_config: OPTConfig,
    mesh_shape: dict,
    platform: str,
    rules=DEFAULT_RULES,
    attention=None,
    trainable: Trainable = None,
) -> MemoryEstimate:
    """`estimate_training_memory` for a run's train section on a mesh of `mesh_shape` devices of
    `platform` (`attention`: the kernel's name where it is known, else the config's request; trainable:
    train/trainable.py, None: all train)."""
    if t.attention_dropout is not None:  # the run's attention dropout decides which kernel can run
        opt_config = opt_config.replace(attention_dropout=t.attention_dropout)
    return estimate_training_memory(
        opt_config,
        mesh_shape=mesh_shape,
        global_batch=t.batch_size,
        rules=rules,
        attention=attention or t.attention,
        platform=platform,
        trainable=trainable,
        **{name: getattr(t, name) for name in _STEP_SETTINGS},
    )


def check_memory(
    t: TrainSection, opt_config: OPTConfig, mesh, rules=DEFAULT_RULES, trainable: Trainable = None
):
    """Prints the per-device estimate (process 0) and raises InsufficientMemoryError when it cannot fit;
    called before anything is allocated or compiled. trainable: train/trainable.py (None: all train)."""
    # the mesh's devices are the target (they may be a topology's, compiled for from another host)
    platform = mesh.devices.flat[0].platform
    estimate = estimate_run(t, opt_config, dict(mesh.shape), platform, rules, trainable=trainable)
    available = memory_limit_bytes(t, mesh)
    if jax.process_index() == 0:
        limit = f"{available / GiB:.3f} GiB per device available" if available else "device memory unknown"
        log.info("%s\n  (%s)", estimate.table(), limit)
    check_fits(estimate, available)
    return estimate
