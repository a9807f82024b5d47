"""Attention's dispatch: `attention`, the one entry point of whole-row attention (training, scoring,
forward passes), which runs one of the kernels of kernels/ -- our blockwise XLA attention with its
memory-saving backward pass, `jax.nn.dot_product_attention` (XLA or cuDNN), TPU splash or the GPU
Pallas kernel -- chosen by `resolve_attention` ("auto" asks each kernel's spec in order); and the
attention over a KV cache of decoding. The masks are masks.py. The model (opt.py) calls `attention`,
`resolve_attention` (for its remat policy) and `cached_dot_product_attention` only.

The choice is static (made while tracing) for a target platform, by default the running backend; a
program can so be traced for "tpu" or "gpu" on a CPU host. It is logged once per process with its
reason. On CPU the Pallas kernels run in interpret mode, so the tests check every path against
`blockwise` here.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from optiml_jax.model.kernels import FALLBACK, IMPLEMENTATIONS, KERNELS, AttentionShapes, KernelSpec

Dtype = Any
logger = logging.getLogger(__name__)
_logged_choices: set = set()


class AttentionError(ValueError):
    """An attention implementation cannot run here (platform, dtype, head dim, dropout)."""


def attention(
    query,
    key,
    value,
    *,
    segment_ids,
    causal: bool = True,
    dropout_rate: float = 0.0,
    dropout_rng=None,
    implementation: str = "auto",
    segment_branches: bool = False,
    dtype: Optional[Dtype] = None,
    platform: Optional[str] = None,
):
    """softmax(q k^T) v over whole rows (training, scoring, plain forward passes); q already scaled.

    query/key/value [batch, length, heads, head_dim]; segment_ids [batch, length] int: a token sees
    only keys of its own segment (0 = padding; `segment_branches`: ids may carry branches, see
    masks.SEGMENT_BRANCH_SHIFT), and with `causal` only keys up to itself. Every query sees at least
    itself, so no row is fully masked on any path. `dropout_rng` None means no attention dropout.
    `implementation` is one of IMPLEMENTATIONS; `auto` picks for `platform` (`resolve_attention`;
    None: the running backend).
    """
    dtype = jnp.dtype(dtype or query.dtype)
    platform = platform or jax.default_backend()
    rate = float(dropout_rate) if dropout_rng is not None and dropout_rate > 0.0 else 0.0
    shapes = AttentionShapes(
        length=query.shape[1],
        head_dim=query.shape[-1],
        heads=query.shape[2],
        dropout=rate > 0.0,
        segment_branches=segment_branches,
    )
    spec, reason = resolve_attention(implementation, platform, dtype, shapes)
    _log_choice(implementation, spec.name, reason)
    kernel = functools.partial(
        spec.run, causal=causal, platform=platform, dropout_rate=rate, dropout_rng=dropout_rng, dtype=dtype
    )
    if not spec.per_shard:
        return kernel(query, key, value, segment_ids)
    query, key, value = (x.astype(dtype) for x in (query, key, value))
    return _shard_over_batch_and_heads(kernel, query, key, value, segment_ids)


def resolve_attention(
    implementation: str, platform: Optional[str], dtype, shapes: AttentionShapes
) -> tuple[KernelSpec, str]:
    """(the kernel that runs, why) for a request on `platform` (None: the running backend). "auto"
    asks the kernels in order for the first that supports the call and says it is auto's pick
    there; an explicit name that cannot run is an AttentionError, except that a request the kernel
    cannot express without a dense mask (segment branches) falls back to the fallback, logged."""
    if implementation not in IMPLEMENTATIONS:
        raise AttentionError(f"attention={implementation!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    platform = platform or jax.default_backend()
    dtype = jnp.dtype(dtype)
    if implementation == "auto":
        for spec in KERNELS.values():
            if spec.supports(platform, dtype, shapes) is None:
                reason = spec.auto_reason(platform, dtype, shapes)
                if reason:
                    return spec, reason
        raise AssertionError(f"{FALLBACK.name} gave no reason for {platform}, {dtype.name}, {shapes}")
    spec = KERNELS[implementation]
    dropout_refused = shapes.dropout and not spec.has_dropout
    if shapes.segment_branches and not spec.takes_segment_branches and not dropout_refused:
        return FALLBACK, f"{implementation} compares segment ids only; segment branches need a mask"
    why_not = spec.supports(platform, dtype, shapes)
    if why_not:
        raise AttentionError(f"attention={implementation!r} {why_not}")
    if spec.interpreted_on_cpu and platform == "cpu":
        return spec, "asked for; Pallas interpret mode on CPU (slow: for tests)"
    return spec, "asked for"


def choose_implementation(
    implementation: str,
    *,
    platform: str,
    dtype,
    head_dim: int,
    length: int,
    dropout: bool,
    segment_branches: bool = False,
) -> tuple[str, str]:
    """`resolve_attention` for callers that check a request before a model exists: (the kernel's
    name, why)."""
    shapes = AttentionShapes(
        length=length, head_dim=head_dim, dropout=dropout, segment_branches=segment_branches
    )
    spec, reason = resolve_attention(implementation, platform, dtype, shapes)
    return spec.name, reason


def _log_choice(requested: str, name: str, reason: str) -> None:
    if (requested, name, reason) not in _logged_choices:  # once per process: traces repeat it per layer
        _logged_choices.add((requested, name, reason))
        logger.info("attention=%s: using %s (%s)", requested, name, reason)


def _dividing(mesh, axes, size: int):
    """`axes` (a mesh axis, a tuple of them or None) if they split `size` evenly, else None: an
    initialisation trace of one row is then computed whole on every device."""
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    shards = int(np.prod([mesh.shape[name] for name in names])) if names else 1
    return axes if shards > 1 and size % shards == 0 else None


def _shard_over_batch_and_heads(kernel, query, key, value, segment_ids):
    """A kernel (a custom call that XLA cannot partition) run per shard of the current mesh: rows split
    as the rules split the activations' batch axis, heads as they split "activation_heads"."""
    mesh = _current_mesh()
    if mesh is None:
        return kernel(query, key, value, segment_ids)
    batch_axes, head_axes = (
        _dividing(mesh, axes, size)
        for axes, size in zip(
            nn.logical_to_mesh_axes(("activation_batch", "activation_heads")),
            (query.shape[0], query.shape[2]),
        )
    )
    if batch_axes is None and head_axes is None:
        return kernel(query, key, value, segment_ids)
    qkv = jax.sharding.PartitionSpec(batch_axes, None, head_axes, None)
    segments = jax.sharding.PartitionSpec(batch_axes, None)
    return _shard_map(kernel, mesh, in_specs=(qkv, qkv, qkv, segments), out_specs=qkv)(
        query, key, value, segment_ids
    )


# ---------------------------------------------------------------------------------------------------
# The jax APIs that move between versions, in one place (the GPU machine runs a newer jax than CI):
# shard_map and the mesh of the current `jax.set_mesh`.


def _current_mesh():
    """The mesh of the enclosing `jax.set_mesh`, or None (one device, nothing to shard over)."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty or mesh.size == 1 else mesh


def _shard_map(fn, mesh, *, in_specs, out_specs):
    if hasattr(jax, "shard_map"):  # jax >= 0.7
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map

    return shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def cached_dot_product_attention(query, key, value, mask, *, dtype: Dtype = jnp.float32):
    """softmax(q k^T) v (q already scaled) over a KV cache in either layout of
    `OPTAttention._update_cache`, told apart by rank: standard key/value [batch, slots, heads, head_dim],
    or the cpu layout's
    key_t [batch * heads, head_dim, slots] and value [batch * heads, slots, head_dim]. Scores are
    taken in `dtype` and softmaxed in float32 either way, as HF's eager attention does."""
    batch, query_len, heads, head_dim = query.shape
    if key.ndim == 4:
        scores = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, value)
    query = jnp.swapaxes(query, 1, 2).reshape(batch * heads, query_len, head_dim)
    scores = jnp.matmul(query, key).astype(jnp.float32).reshape(batch, heads, query_len, -1)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype).reshape(batch * heads, query_len, -1)
    out = jnp.matmul(probs, value).reshape(batch, heads, query_len, head_dim)
    return jnp.swapaxes(out, 1, 2)
