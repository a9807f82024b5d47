"""blockwise: softmax(q k^T) v in plain XLA ops with a FlashAttention-style backward pass; runs on every
platform, has attention dropout and takes any mask (scoring's segment branches), so it is `auto`'s
fallback. Every other kernel is tested against it (tests/test_attention.py)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from optiml_jax.model.kernels.base import AttentionShapes, KernelSpec
from optiml_jax.model.masks import segment_mask

Dtype = Any

# Query block of causal attention: keys past a block's last query are never computed (see below).
CAUSAL_QUERY_BLOCK = 128


def blockwise_attention(
    query,
    key,
    value,
    mask,
    *,
    dropout_rate: float = 0.0,
    dropout_rng=None,
    deterministic: bool = True,
    dtype: Dtype = jnp.float32,
    causal: bool = False,
    query_block: int = CAUSAL_QUERY_BLOCK,
):
    """softmax(q k^T) v with q already scaled, in plain XLA ops: `attention`'s "blockwise" path.

    query [b, q, heads, d], key/value [b, k, heads, d], mask bool [b, 1|heads, q, k].
    Scores are taken to float32 before masking and softmax (HF does softmax in float32), and a
    fully masked row (a padding query) becomes uniform, as with HF's additive finfo.min mask.

    `causal=True` promises that `mask` hides every key after its query (q == k, same slots). The
    queries are then taken in blocks of `query_block`, each against only the keys up to its last
    query: the skipped scores are all masked, so every query with a visible key gets the same result,
    for about half the score and softmax work. A fully masked query (padding) is then uniform over
    its block's keys instead of all keys: a padding position's output, which nothing reads.

    The gradient (`_attention_vjp_backward`) keeps only each query's log-sum-exp from the forward
    pass and recomputes the probabilities, as FlashAttention does: the float32 score, softmax and
    mask tensors are the largest activations of a layer (130 MB per 125m layer at 4 x 512), and under
    `nn.scan` every saved one is also zero-filled, written and read back per layer.
    """
    length, key_len = query.shape[1], key.shape[1]
    if causal and key_len == length:  # (first query, end of queries, end of keys) per block
        blocks = tuple(
            (start, min(start + query_block, length), min(start + query_block, length))
            for start in range(0, length, query_block)
        )
    else:  # one block of every query against every key
        blocks = ((0, length, key_len),)
    rate = float(dropout_rate) if not deterministic and dropout_rate > 0.0 else 0.0
    return _attention(query, key, value, mask, dropout_rng if rate else None, blocks, rate, jnp.dtype(dtype))


def _to_heads_major(query, key, value):
    """q [b, h, q, d], k as [b, h, d, k] and v [b, h, k, d]: each score and output matmul then reads
    its operands in the layout the CPU matmul wants, without a per-block transpose."""
    return (jnp.swapaxes(query, 1, 2), jnp.transpose(key, (0, 2, 3, 1)), jnp.swapaxes(value, 1, 2))


def _masked_scores(q, k_t, mask, block):
    start, end, key_end = block
    scores = jnp.einsum(
        "bhqd,bhdk->bhqk", q[:, :, start:end], k_t[..., :key_end], preferred_element_type=jnp.float32
    )
    return jnp.where(mask[:, :, start:end, :key_end], scores, jnp.finfo(jnp.float32).min)


def _dropout_keep(dropout_rng, block_index: int, rate: float, shape):
    return jax.random.bernoulli(jax.random.fold_in(dropout_rng, block_index), 1.0 - rate, shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(query, key, value, mask, dropout_rng, blocks, rate, dtype):
    return _attention_vjp_forward(query, key, value, mask, dropout_rng, blocks, rate, dtype)[0]


def _attention_vjp_forward(query, key, value, mask, dropout_rng, blocks, rate, dtype):
    q, k_t, v = _to_heads_major(query, key, value)
    outputs, log_sum_exps = [], []
    for index, block in enumerate(blocks):
        key_end = block[2]
        scores = _masked_scores(q, k_t, mask, block)
        row_max = jnp.max(scores, axis=-1, keepdims=True)
        exps = jnp.exp(scores - row_max)
        sums = jnp.sum(exps, axis=-1, keepdims=True)
        probs = exps / sums
        if rate:
            probs = jnp.where(_dropout_keep(dropout_rng, index, rate, probs.shape), probs / (1.0 - rate), 0.0)
        outputs.append(jnp.einsum("bhqk,bhkd->bhqd", probs.astype(dtype), v[:, :, :key_end]))
        log_sum_exps.append((row_max + jnp.log(sums))[..., 0])
    out = checkpoint_name(jnp.swapaxes(jnp.concatenate(outputs, axis=2), 1, 2), "attention_out")
    log_sum_exp = checkpoint_name(jnp.concatenate(log_sum_exps, axis=2), "attention_log_sum_exp")
    # `out` is also out_proj's input, so saving it costs nothing extra.
    return out, (query, key, value, out, mask, log_sum_exp, dropout_rng)


def _attention_vjp_backward(blocks, rate, dtype, residuals, d_out):
    query, key, value, out, mask, log_sum_exp, dropout_rng = residuals
    q, k_t, v = _to_heads_major(query, key, value)
    # sum_k p_k dL/dp_k per query, from the output instead of per block: (dropped) p @ v is `out`.
    out_dot_grad = jnp.swapaxes(jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1), 1, 2)
    d_out = jnp.swapaxes(d_out, 1, 2).astype(dtype)
    batch, heads, _, head_dim = q.shape
    key_len = v.shape[2]
    # d/dk and d/dv are accumulated as [b, h, d, k]: each block's contribution is then a matmul
    # whose operands need no transpose.
    d_key_t = jnp.zeros((batch, heads, head_dim, key_len), jnp.float32)
    d_value_t = jnp.zeros((batch, heads, head_dim, key_len), jnp.float32)
    d_query_blocks = []
    for index, block in enumerate(blocks):
        start, end, key_end = block
        probs = jnp.exp(_masked_scores(q, k_t, mask, block) - log_sum_exp[:, :, start:end, None])
        d_out_block = d_out[:, :, start:end]
        d_probs = jnp.einsum(
            "bhqd,bhkd->bhqk", d_out_block, v[:, :, :key_end], preferred_element_type=jnp.float32
        )
        used = probs
        if rate:
            keep = _dropout_keep(dropout_rng, index, rate, probs.shape)
            used = jnp.where(keep, probs / (1.0 - rate), 0.0)
            d_probs = jnp.where(keep, d_probs / (1.0 - rate), 0.0)
        d_value_t = d_value_t.at[..., :key_end].add(
            jnp.einsum("bhqd,bhqk->bhdk", d_out_block, used.astype(dtype), preferred_element_type=jnp.float32)
        )
        # Masked scores get no gradient (jnp.where's); only a fully masked row has nonzero p there.
        d_scores = jnp.where(
            mask[:, :, start:end, :key_end], probs * (d_probs - out_dot_grad[:, :, start:end, None]), 0.0
        ).astype(dtype)
        d_query_blocks.append(
            jnp.einsum("bhqk,bhdk->bhqd", d_scores, k_t[..., :key_end], preferred_element_type=jnp.float32)
        )
        d_key_t = d_key_t.at[..., :key_end].add(
            jnp.einsum("bhqd,bhqk->bhdk", q[:, :, start:end], d_scores, preferred_element_type=jnp.float32)
        )
    d_query = jnp.swapaxes(jnp.concatenate(d_query_blocks, axis=2), 1, 2).astype(query.dtype)
    d_key = jnp.transpose(d_key_t, (0, 3, 1, 2)).astype(key.dtype)
    d_value = jnp.transpose(d_value_t, (0, 3, 1, 2)).astype(value.dtype)
    return d_query, d_key, d_value, None, None


_attention.defvjp(_attention_vjp_forward, _attention_vjp_backward)


def _run(query, key, value, segment_ids, *, causal, platform, dropout_rate, dropout_rng, dtype):
    return blockwise_attention(
        query,
        key,
        value,
        segment_mask(segment_ids, causal),
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        deterministic=not dropout_rate,
        dtype=dtype,
        causal=causal,
    )


def _auto_reason(platform: str, dtype, shapes: AttentionShapes) -> str:
    if shapes.dropout:
        return "attention dropout > 0 (only blockwise has dropout)"
    if platform == "cpu":
        return "CPU"
    return (
        f"{platform}: no fused kernel for {dtype.name}, head dim {shapes.head_dim}, length {shapes.length}"
        + (", segment branches" if shapes.segment_branches else "")
    )


SPEC = KernelSpec(
    name="blockwise",
    run=_run,
    # the boolean mask (one per row, shared by the heads: `length` bytes a token) and a float32
    # log-sum-exp per query and head
    saved_bytes_per_token=lambda shapes, dtype: shapes.length + 4 * shapes.heads,
    # one layer's float32 probabilities exist while its backward pass runs
    backward_bytes_per_token=lambda shapes, dtype: 4 * shapes.heads * shapes.length,
    auto_reason=_auto_reason,
    auto_rank=None,  # the fallback
    saved_names=("attention_out", "attention_log_sum_exp"),
    per_shard=False,  # plain XLA ops: the partitioner splits them
    has_dropout=True,
    takes_segment_branches=True,
)
