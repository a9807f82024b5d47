"""splash: the TPU splash attention of jax.experimental.pallas.ops.tpu (Pallas; CPU runs it in interpret
mode, for tests); `auto`'s pick on TPU when rows are whole kernel blocks."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from optiml_jax.model.kernels.base import KERNEL_BLOCK, AttentionShapes, pad_rows, pallas_spec


def _splash_module():
    # imported on first use: the Pallas TPU ops load Mosaic (start-up cost) and move between jax versions
    from jax.experimental.pallas.ops.tpu import splash_attention

    return splash_attention


def _kernel_block(length: int) -> int:
    return next(b for b in (512, 256, KERNEL_BLOCK) if length % b == 0)


def splash_attention(query, key, value, segment_ids, *, causal: bool, interpret: bool):
    """TPU splash attention, one sequence at a time ([heads, length, head_dim]) under vmap."""
    splash = _splash_module()
    length = query.shape[1]
    query, key, value, segment_ids = pad_rows(KERNEL_BLOCK, query, key, value, segment_ids)
    padded, heads = query.shape[1], query.shape[2]
    block = _kernel_block(padded)
    one_head = splash.CausalMask((padded, padded)) if causal else splash.FullMask((padded, padded))
    blocks = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    kernel = splash.make_splash_mha(
        splash.MultiHeadMask([one_head] * heads),
        block_sizes=blocks,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )
    heads_major = lambda x: jnp.swapaxes(x, 1, 2)
    per_row = lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s))
    out = jax.vmap(per_row)(heads_major(query), heads_major(key), heads_major(value), segment_ids)
    return heads_major(out)[:, :length]


def _auto_reason(platform: str, dtype, shapes: AttentionShapes):
    if platform == "tpu" and shapes.length % KERNEL_BLOCK == 0:
        return f"TPU, length {shapes.length} a multiple of {KERNEL_BLOCK}"
    return None


SPEC = pallas_spec(
    "splash", splash_attention, platform="tpu", kind="TPU", auto_rank=3, auto_reason=_auto_reason
)
