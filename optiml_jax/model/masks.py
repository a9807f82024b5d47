"""The masks of attention: which keys a query may see, from segment ids (packed rows, padding, scoring's
branches) and causality. Below the kernels (kernels/) and the entry point (attention.py), which all
build their masks here."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

# A segment id may carry a branch number above this bit: branch b > 0 of segment s is the id
# s + (b << SEGMENT_BRANCH_SHIFT). Scoring packs one context (branch 0) and its answer options
# (branches 1, 2, ...) into one segment: each option sees the context and itself, not the others,
# so the context is computed once for all of them. Training ids (< 2**16 per row) have no branches.
SEGMENT_BRANCH_SHIFT = 16


def branch_segment_ids(segment, branch):
    """The segment id of `branch` (0 = the shared trunk) of `segment` (see SEGMENT_BRANCH_SHIFT)."""
    return segment + (branch << SEGMENT_BRANCH_SHIFT)


def _same_example(query_ids, key_ids):
    """Which keys a query may see by segment: its own segment, and a branch also its segment's
    trunk, but no other branch (SEGMENT_BRANCH_SHIFT). Padding is segment 0 (sees only padding)."""
    low = (1 << SEGMENT_BRANCH_SHIFT) - 1
    key_is_trunk = (key_ids >> SEGMENT_BRANCH_SHIFT) == 0
    return (query_ids == key_ids) | (key_is_trunk & ((query_ids & low) == (key_ids & low)))


def attention_mask_for(
    query_len: int, key_valid: jax.Array, query_offset, segment_ids: Optional[jax.Array] = None
) -> jax.Array:
    """Boolean [batch, 1, query, key] mask of decoding: causal by slot, padded keys hidden, no
    cross-example attention.

    Query i sits in key slot `query_offset + i` (the offset is the KV-cache fill level when decoding).
    `segment_ids` (packed rows) keeps each example's tokens attending only within the example.
    """
    key_len = key_valid.shape[1]
    query_slots = query_offset + jnp.arange(query_len, dtype=jnp.int32)
    causal = jnp.arange(key_len, dtype=jnp.int32)[None, :] <= query_slots[:, None]
    mask = causal[None, None] & key_valid.astype(bool)[:, None, None, :]
    if segment_ids is not None:
        mask = mask & _same_example(segment_ids[:, None, :, None], segment_ids[:, None, None, :])
    return mask


def segment_mask(segment_ids: jax.Array, causal: bool) -> jax.Array:
    """Boolean [batch, 1, length, length] mask of `attention`'s segment ids (0 = padding)."""
    mask = _same_example(segment_ids[:, None, :, None], segment_ids[:, None, None, :])
    if causal:
        length = segment_ids.shape[1]
        mask = mask & jnp.tril(jnp.ones((length, length), bool))[None, None]
    return mask


def segments_from(key_valid: Optional[jax.Array], segment_ids: Optional[jax.Array], shape) -> jax.Array:
    """`attention`'s segment ids from the model's inputs: packed ids as given, a padded key (mask 0)
    as segment 0, and an unpacked row as one segment."""
    if segment_ids is None:
        return jnp.ones(shape, jnp.int32) if key_valid is None else key_valid.astype(jnp.int32)
    segment_ids = segment_ids.astype(jnp.int32)
    return segment_ids if key_valid is None else jnp.where(key_valid.astype(bool), segment_ids, 0)
