"""The device mesh and the table that maps the model's logical axis names onto it.

The model names every parameter and activation axis ("embed", "heads", "activation_batch", ...);
this module alone decides which mesh axis each name is split over. The mesh has three axes:
  data    pure data parallelism (params replicated),
  fsdp    data parallelism with params and optimizer state sharded (ZeRO-3 / FSDP),
  tensor  Megatron-style tensor parallelism over heads, MLP and vocabulary.
Changing the mesh in the config is all it takes to move from one CPU to a pod.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from optiml_jax.config import ConfigError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes, or None = replicated). MaxText / flax lm1b style.
DEFAULT_RULES: tuple = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("embed_proj", None),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("positions", None),
    ("layers", None),
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; -1 on one axis means "all remaining devices"."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    @classmethod
    def parse(cls, text: str) -> "MeshConfig":
        """From the command-line form "data=-1,tensor=2" (evaluate's --mesh, lm_eval's model_args);
        ConfigError naming the text when it is not axis=size pairs of our axes."""
        sizes = {}
        for part in filter(None, text.split(",")):
            name, sep, value = part.partition("=")
            if not sep or name.strip() not in MESH_AXES:
                raise ConfigError(
                    f"--mesh {text!r}: expected axis=size pairs of data, fsdp, tensor (e.g. data=-1,tensor=2)"
                )
            try:
                sizes[name.strip()] = int(value)
            except ValueError:
                raise ConfigError(f"--mesh {text!r}: {value!r} is not an integer") from None
        return cls(**sizes)

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """The axis sizes on `num_devices` devices; ConfigError (a ValueError) naming the axes when
        they do not multiply to the device count."""
        sizes = [self.data, self.fsdp, self.tensor]
        for name, size in zip(MESH_AXES, sizes):
            if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
                raise ConfigError(f"mesh.{name} must be a positive integer or -1, got {size!r}")
        free = [i for i, s in enumerate(sizes) if s == -1]
        if len(free) > 1:
            raise ConfigError("only one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
        fixed = math.prod(s for s in sizes if s != -1)
        given = " x ".join(f"mesh.{name}={size}" for name, size in zip(MESH_AXES, sizes))
        if free:
            if num_devices % fixed:
                raise ConfigError(
                    f"{given}: the {num_devices} devices cannot be split so (the fixed axes "
                    f"multiply to {fixed}, which does not divide {num_devices})"
                )
            sizes[free[0]] = num_devices // fixed
        if math.prod(sizes) != num_devices:
            raise ConfigError(
                f"{given} = {math.prod(sizes)} devices, but {num_devices} are available; make the "
                f"sizes multiply to {num_devices}, or set one of them to -1 (all the remaining devices)"
            )
        return tuple(sizes)


def make_mesh(config: MeshConfig = MeshConfig(), devices: Optional[Sequence] = None) -> Mesh:
    """The mesh over `devices` (default: every device of every process); ConfigError when the config's
    sizes do not fit them."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = config.resolve(len(devices))
    # Auto axes: shardings are propagated by XLA from our annotations (the pjit model).
    auto = (AxisType.Auto,) * len(MESH_AXES)
    if devices == jax.devices():
        try:
            return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
        except (
            ValueError,
            NotImplementedError,
        ) as e:  # a shape the physical topology (TPU slice) cannot take
            raise ConfigError(
                f"mesh data={shape[0]} x fsdp={shape[1]} x tensor={shape[2]} does not fit the "
                f"{len(devices)} {devices[0].platform} devices: {' '.join(str(e).split())}"
            ) from None
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def _divisible_spec(spec: PartitionSpec, shape: tuple, mesh: Mesh, name: str) -> PartitionSpec:
    """Drops a mesh axis from a dimension it does not divide, rather than failing to compile.

    A tiny test model's 4 heads on an 8-way tensor axis, or an odd vocabulary, are then replicated
    along that axis (logged), and real model sizes are split as the rules say.
    """
    fixed = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            fixed.append(None)
            continue
        axes_tuple = axes if isinstance(axes, tuple) else (axes,)
        kept = tuple(a for a in axes_tuple if mesh.shape[a] > 1)
        while kept and dim % math.prod(mesh.shape[a] for a in kept):
            log.info(
                "%s: dimension %d is not divisible by mesh axes %s; replicating along %s",
                name,
                dim,
                kept,
                kept[-1],
            )
            kept = kept[:-1]
        fixed.append(kept if len(kept) > 1 else (kept[0] if kept else None))
    return PartitionSpec(*fixed)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """NamedShardings for a tree of (boxed) abstract values from `jax.eval_shape(model.init, ...)`.

    Leaves without logical names (e.g. the KV-cache index) are replicated.
    """
    logical_specs = nn.get_partition_spec(abstract_tree)
    mesh_specs = nn.logical_to_mesh(logical_specs, rules)
    shapes = nn.meta.unbox(abstract_tree)

    def to_sharding(path, spec, shape):
        spec = spec if isinstance(spec, PartitionSpec) else PartitionSpec()
        name = jax.tree_util.keystr(path)
        return NamedSharding(mesh, _divisible_spec(spec, tuple(shape.shape), mesh, name))

    return jax.tree_util.tree_map_with_path(
        to_sharding, mesh_specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# Logical axes of every model input [batch, length] (token ids, positions, segments, targets, masks).
BATCH_AXES = ("activation_batch", "activation_length")


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES, *, microbatched: bool = False) -> NamedSharding:
    """The sharding of a [batch, length] model input (with `microbatched`, [microbatch, batch, length]):
    rows split as the rules split the activations' batch axis (every data-parallel mesh axis)."""
    logical = PartitionSpec(None, *BATCH_AXES) if microbatched else PartitionSpec(*BATCH_AXES)
    return NamedSharding(mesh, nn.logical_to_mesh_axes(logical, rules))


def init_params_sharded(
    model: nn.Module, rng: jax.Array, mesh: Mesh, rules=DEFAULT_RULES, sample_shape: tuple = (1, 8)
) -> tuple[dict, dict]:
    """Random params created directly in their shards (never whole on one device).

    Returns (params, shardings), both trees of the Flax "params" collection, unboxed.
    """
    ids = jax.numpy.ones(sample_shape, jax.numpy.int32)

    def init(rng):
        return model.init(rng, ids)["params"]

    abstract = jax.eval_shape(init, rng)
    shardings = logical_shardings(abstract, mesh, rules)
    params = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)
    return params, shardings


def abstract_params(model: nn.Module, sample_shape: tuple = (1, 8)):
    """Boxed abstract params (shapes, dtypes and logical names; no memory)."""
    ids = jax.numpy.ones(sample_shape, jax.numpy.int32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids)["params"])


def param_shardings(model: nn.Module, mesh: Mesh, rules=DEFAULT_RULES) -> dict:
    """Shardings of the model's params on `mesh` (for restoring a checkpoint straight into shards)."""
    return logical_shardings(abstract_params(model), mesh, rules)


def on_mesh(mesh: Optional[Mesh], rules=DEFAULT_RULES):
    """A context that runs jitted code on `mesh` with the logical axis rules (nothing when mesh is None):
    what sharding constraints and shard_map inside the model read."""
    import contextlib

    stack = contextlib.ExitStack()
    if mesh is not None:
        stack.enter_context(jax.set_mesh(mesh))
        stack.enter_context(nn.logical_axis_rules(rules))
    return stack
