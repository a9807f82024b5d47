"""The OPT decoder (Zhang et al. 2022, arXiv 2205.01068) in Flax, exact to Hugging Face's PyTorch OPT.

Every parameter and large activation carries logical axis names (see `sharding.py` for how they map
onto a device mesh), so this one file serves a CPU test, one GPU and a TPU pod unchanged.

Parity traps handled here (see docs and the HF source for the reference semantics):
  * positions come from the attention mask (`cumsum(mask) * mask - 1`) and index a learned table
    with an offset of 2, so left padding does not shift the positions of real tokens;
  * the query is scaled by head_dim**-0.5 after its bias is added, and softmax runs in float32;
  * 350m: token embeddings are 512 wide and go through `project_in` before positions are added,
    layers are post-LN, there is no final LayerNorm, and `project_out` precedes the tied LM head;
  * the LM head is tied to the token embedding over all rows, the vocabulary's padding rows included.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name

from optiml_jax.config import OPTConfig

Dtype = Any

# The position table is indexed with `position + POSITION_OFFSET` (metaseq's padding_idx + 1).
POSITION_OFFSET = 2

REMAT_POLICIES = {
    "none": None,  # no rematerialisation: keep every activation (fastest, most memory)
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole layer in the backward pass
    # keep the weight matmuls' outputs and attention's output and softmax statistics, recompute the
    # rest (jax's checkpoint_dots would also keep the float32 scores, which attention's backward
    # recomputes anyway: more memory than "none" at long sequences)
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names("attention_out", "attention_log_sum_exp")),
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls only
}


@jax.custom_vjp
def _relu(x):
    return jnp.maximum(x, 0)


def _relu_vjp_forward(x):
    out = _relu(x)
    # The output is kept anyway (fc2's weight gradient reads it) and tells where the input was
    # positive: jax.nn.relu's gradient kept a separate boolean mask the size of the MLP activations.
    return out, out


def _relu_vjp_backward(out, d_out):
    return (jnp.where(out > 0, d_out, jnp.zeros_like(d_out)),)


_relu.defvjp(_relu_vjp_forward, _relu_vjp_backward)

_ACTIVATIONS = {
    "relu": _relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def _init(stddev: float, axes: tuple):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev), axes)


def _zeros(axes: tuple):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def _ones(axes: tuple):
    return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


def _layer_norm(cfg: OPTConfig, dtype, param_dtype, name: str) -> "LayerNorm":
    """OPT's LayerNorm: eps 1e-5 (HF and metaseq), affine unless layer_norm_elementwise_affine=False."""
    return LayerNorm(epsilon=1e-5, affine=cfg.layer_norm_elementwise_affine, dtype=dtype,
                     param_dtype=param_dtype, name=name)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, statistics in float32 (mean, then the variance about it, as
    PyTorch). Parameters `scale` and `bias`, as flax's nn.LayerNorm.

    Its backward pass (`_normalize_vjp_backward`) keeps only the input and two numbers per row and
    recomputes the normalised values: autodiff of the plain formula kept three more activations of
    the input's size per LayerNorm, which under `nn.scan` are stacked, zero-filled and copied per layer.
    """
    epsilon: float
    affine: bool
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x):
        features = (x.shape[-1],)
        if self.affine:
            scale = self.param("scale", _ones(("embed",)), features, self.param_dtype)
            bias = self.param("bias", _zeros(("embed",)), features, self.param_dtype)
        else:
            scale, bias = jnp.ones(features, jnp.float32), jnp.zeros(features, jnp.float32)
        return _normalize(x, scale, bias, self.epsilon, jnp.dtype(self.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _normalize(x, scale, bias, epsilon, dtype):
    return _normalize_vjp_forward(x, scale, bias, epsilon, dtype)[0]


def _normalize_vjp_forward(x, scale, bias, epsilon, dtype):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centered = x32 - mean
    inv_std = jax.lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + epsilon)
    out = centered * inv_std * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return out.astype(dtype), (x, mean, inv_std, scale, bias)


def _normalize_vjp_backward(epsilon, dtype, residuals, d_out):
    x, mean, inv_std, scale, bias = residuals
    normalized = (x.astype(jnp.float32) - mean) * inv_std
    d_out = d_out.astype(jnp.float32)
    rows = tuple(range(d_out.ndim - 1))
    d_scale = jnp.sum(d_out * normalized, axis=rows)
    d_bias = jnp.sum(d_out, axis=rows)
    d_normalized = d_out * scale.astype(jnp.float32)
    d_x = inv_std * (d_normalized - jnp.mean(d_normalized, axis=-1, keepdims=True)
                     - normalized * jnp.mean(d_normalized * normalized, axis=-1, keepdims=True))
    return d_x.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(bias.dtype)


_normalize.defvjp(_normalize_vjp_forward, _normalize_vjp_backward)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """HF/metaseq positions: 0, 1, 2... over real tokens, -1 on padding (which then reads row 1)."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.cumsum(mask, axis=1) * mask - 1


# A segment id may carry a branch number above this bit: branch b > 0 of segment s is the id
# s + (b << SEGMENT_BRANCH_SHIFT). Scoring packs one context (branch 0) and its answer options
# (branches 1, 2, ...) into one segment: each option sees the context and itself, not the others,
# so the context is computed once for all of them. Training ids (< 2**16 per row) have no branches.
SEGMENT_BRANCH_SHIFT = 16


def branch_segment_ids(segment, branch):
    """The segment id of `branch` (0 = the shared trunk) of `segment` (see SEGMENT_BRANCH_SHIFT)."""
    return segment + (branch << SEGMENT_BRANCH_SHIFT)


def attention_mask_for(query_len: int, key_valid: jax.Array, query_offset,
                       segment_ids: Optional[jax.Array] = None) -> jax.Array:
    """Boolean [batch, 1, query, key] mask: causal by slot, padded keys hidden, no cross-example attention.

    Query i sits in key slot `query_offset + i` (the offset is the KV-cache fill level when decoding).
    `segment_ids` (packed training) keeps each example's tokens attending only within the example;
    a branch of an example also sees the example's trunk, but no other branch (SEGMENT_BRANCH_SHIFT).
    """
    key_len = key_valid.shape[1]
    query_slots = query_offset + jnp.arange(query_len, dtype=jnp.int32)
    causal = jnp.arange(key_len, dtype=jnp.int32)[None, :] <= query_slots[:, None]
    mask = causal[None, None] & key_valid.astype(bool)[:, None, None, :]
    if segment_ids is not None:
        query_ids, key_ids = segment_ids[:, None, :, None], segment_ids[:, None, None, :]
        low = (1 << SEGMENT_BRANCH_SHIFT) - 1
        key_is_trunk = (key_ids >> SEGMENT_BRANCH_SHIFT) == 0
        mask = mask & ((query_ids == key_ids) | (key_is_trunk & ((query_ids & low) == (key_ids & low))))
    return mask


# Query block of causal attention: keys past a block's last query are never computed (see below).
CAUSAL_QUERY_BLOCK = 128


def dot_product_attention(query, key, value, mask, *, dropout_rate: float = 0.0,
                          dropout_rng=None, deterministic: bool = True, dtype: Dtype = jnp.float32,
                          causal: bool = False, query_block: int = CAUSAL_QUERY_BLOCK):
    """softmax(q k^T) v with q already scaled. The one place a fused kernel would plug in.

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
        blocks = tuple((start, min(start + query_block, length), min(start + query_block, length))
                       for start in range(0, length, query_block))
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
    scores = jnp.einsum("bhqd,bhdk->bhqk", q[:, :, start:end], k_t[..., :key_end],
                        preferred_element_type=jnp.float32)
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
        d_probs = jnp.einsum("bhqd,bhkd->bhqk", d_out_block, v[:, :, :key_end], preferred_element_type=jnp.float32)
        used = probs
        if rate:
            keep = _dropout_keep(dropout_rng, index, rate, probs.shape)
            used = jnp.where(keep, probs / (1.0 - rate), 0.0)
            d_probs = jnp.where(keep, d_probs / (1.0 - rate), 0.0)
        d_value_t = d_value_t.at[..., :key_end].add(
            jnp.einsum("bhqd,bhqk->bhdk", d_out_block, used.astype(dtype), preferred_element_type=jnp.float32))
        # Masked scores get no gradient (jnp.where's); only a fully masked row has nonzero p there.
        d_scores = jnp.where(mask[:, :, start:end, :key_end],
                             probs * (d_probs - out_dot_grad[:, :, start:end, None]), 0.0).astype(dtype)
        d_query_blocks.append(jnp.einsum("bhqk,bhdk->bhqd", d_scores, k_t[..., :key_end],
                                         preferred_element_type=jnp.float32))
        d_key_t = d_key_t.at[..., :key_end].add(
            jnp.einsum("bhqd,bhqk->bhdk", q[:, :, start:end], d_scores, preferred_element_type=jnp.float32))
    d_query = jnp.swapaxes(jnp.concatenate(d_query_blocks, axis=2), 1, 2).astype(query.dtype)
    d_key = jnp.transpose(d_key_t, (0, 3, 1, 2)).astype(key.dtype)
    d_value = jnp.transpose(d_value_t, (0, 3, 1, 2)).astype(value.dtype)
    return d_query, d_key, d_value, None, None


_attention.defvjp(_attention_vjp_forward, _attention_vjp_backward)


def cached_dot_product_attention(query, key_t, value, mask, *, dtype: Dtype = jnp.float32):
    """`dot_product_attention` over a KV cache laid out for CPU matmuls (see `_update_cache`):
    key_t [batch * heads, head_dim, slots], value [batch * heads, slots, head_dim]."""
    batch, query_len, heads, head_dim = query.shape
    query = jnp.swapaxes(query, 1, 2).reshape(batch * heads, query_len, head_dim)
    scores = jnp.matmul(query, key_t).astype(jnp.float32).reshape(batch, heads, query_len, -1)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype).reshape(batch * heads, query_len, -1)
    out = jnp.matmul(probs, value).reshape(batch, heads, query_len, head_dim)
    return jnp.swapaxes(out, 1, 2)


class HeadsProjection(nn.Module):
    """A linear map into per-head features [.., heads, head_dim] (q/k/v) or back out of them (out_proj).

    Kernels keep the head axis separate ([embed, heads, kv] / [heads, kv, embed]) so tensor
    parallelism splits whole heads.
    """
    heads: int
    head_dim: int
    use_bias: bool
    init_std: float
    dtype: Dtype
    param_dtype: Dtype
    into_heads: bool = True
    hidden_size: Optional[int] = None  # output width when projecting out of heads

    @nn.compact
    def __call__(self, x):
        if self.into_heads:
            shape, axes = (x.shape[-1], self.heads, self.head_dim), ("embed", "heads", "kv")
            bias_shape, bias_axes, equation = (self.heads, self.head_dim), ("heads", "kv"), "bse,ehd->bshd"
        else:
            shape, axes = (self.heads, self.head_dim, self.hidden_size), ("heads", "kv", "embed")
            bias_shape, bias_axes, equation = (self.hidden_size,), ("embed",), "bshd,hde->bse"
        kernel = self.param("kernel", _init(self.init_std, axes), shape, self.param_dtype)
        if self.into_heads:
            out = jnp.einsum(equation, x.astype(self.dtype), kernel.astype(self.dtype))
        else:
            # Not jnp.einsum: it contracts (kv, heads) in that order, which made XLA on CPU transpose
            # the whole out_proj kernel on every call (a quarter of a decode step's time at batch 1).
            out = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                                      (((2, 3), (0, 1)), ((), ())))
        if self.use_bias:
            bias = self.param("bias", _zeros(bias_axes), bias_shape, self.param_dtype)
            out = out + bias.astype(self.dtype)
        return out


class OPTAttention(nn.Module):
    config: OPTConfig
    dtype: Dtype
    param_dtype: Dtype
    deterministic: bool
    decode: bool

    @nn.compact
    def __call__(self, hidden, key_valid, segment_ids):
        cfg = self.config
        heads, head_dim = cfg.num_attention_heads, cfg.head_dim
        dense = functools.partial(HeadsProjection, heads=heads, head_dim=head_dim, use_bias=cfg.enable_bias,
                                  init_std=cfg.init_std, dtype=self.dtype, param_dtype=self.param_dtype)
        query = dense(name="q_proj")(hidden) * jnp.asarray(head_dim ** -0.5, self.dtype)
        key = dense(name="k_proj")(hidden)
        value = dense(name="v_proj")(hidden)
        qkv_axes = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
        query = nn.with_logical_constraint(query, qkv_axes)
        key = nn.with_logical_constraint(key, qkv_axes)
        value = nn.with_logical_constraint(value, qkv_axes)

        if self.decode:  # inference only: no attention dropout
            key, value, query_offset = self._update_cache(key, value)
            mask = attention_mask_for(hidden.shape[1], key_valid, query_offset, segment_ids)
            out = cached_dot_product_attention(query, key, value, mask, dtype=self.dtype)
        else:
            mask = attention_mask_for(hidden.shape[1], key_valid, 0, segment_ids)
            dropout_rng = None
            if not self.deterministic and cfg.attention_dropout > 0.0:
                dropout_rng = self.make_rng("dropout")
            out = dot_product_attention(query, key, value, mask, dropout_rate=cfg.attention_dropout,
                                        dropout_rng=dropout_rng, deterministic=self.deterministic,
                                        dtype=self.dtype, causal=True)  # the mask above is causal by slot
        out = nn.with_logical_constraint(out, qkv_axes)
        return HeadsProjection(heads, head_dim, cfg.enable_bias, cfg.init_std, self.dtype,
                               self.param_dtype, into_heads=False, hidden_size=cfg.hidden_size,
                               name="out_proj")(out)

    def _update_cache(self, key, value):
        """Writes this step's keys/values at the fill level; returns the whole cache to attend over.

        The cache is preallocated at the full generation length (fixed shapes: the decode loop
        compiles once); slots past the fill level are hidden by the causal-by-slot mask.
        Layout: keys [batch * heads, head_dim, slots], values [batch * heads, slots, head_dim], so
        q @ K and p @ V are plain batched matmuls on the stored arrays. Stored as
        [batch, slots, heads, head_dim], XLA on CPU copied every layer's whole cache at every step
        (to transpose it, or, with a separate batch axis of size 1, to feed the matmul a reshaped
        copy of the update instead of updating in place).
        """
        batch, step_len, heads, head_dim = key.shape
        # this step's tokens only: cheap to move
        key = jnp.transpose(key, (0, 2, 3, 1)).reshape(batch * heads, head_dim, step_len)
        value = jnp.swapaxes(value, 1, 2).reshape(batch * heads, step_len, head_dim)
        initialised = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if not initialised:  # `init` only shapes the cache
            return key, value, 0
        index = cache_index.value
        zero = jnp.array(0, jnp.int32)
        key = jax.lax.dynamic_update_slice(cached_key.value, key.astype(cached_key.value.dtype),
                                           (zero, zero, index))
        value = jax.lax.dynamic_update_slice(cached_value.value, value.astype(cached_value.value.dtype),
                                             (zero, index, zero))
        cached_key.value, cached_value.value = key, value
        cache_index.value = index + step_len
        return key, value, index


class OPTDecoderLayer(nn.Module):
    config: OPTConfig
    dtype: Dtype
    param_dtype: Dtype
    deterministic: bool
    decode: bool
    scanned: bool = False  # under nn.scan: return (carry, per-layer output) as scan expects

    @nn.compact
    def __call__(self, hidden, key_valid, segment_ids):
        cfg = self.config
        layer_norm = functools.partial(_layer_norm, cfg, self.dtype, self.param_dtype)
        dropout = nn.Dropout(rate=cfg.dropout)
        act_axes = ("activation_batch", "activation_length", "activation_embed")

        residual = hidden
        if cfg.do_layer_norm_before:
            hidden = layer_norm(name="self_attn_layer_norm")(hidden)
        attention = OPTAttention(cfg, self.dtype, self.param_dtype, self.deterministic, self.decode,
                                 name="self_attn")
        hidden = attention(hidden, key_valid, segment_ids)
        hidden = residual + dropout(hidden, deterministic=self.deterministic)
        if not cfg.do_layer_norm_before:
            hidden = layer_norm(name="self_attn_layer_norm")(hidden)
        hidden = nn.with_logical_constraint(hidden, act_axes)

        residual = hidden
        if cfg.do_layer_norm_before:
            hidden = layer_norm(name="final_layer_norm")(hidden)
        hidden = nn.Dense(cfg.ffn_dim, use_bias=cfg.enable_bias, dtype=self.dtype,
                          param_dtype=self.param_dtype, kernel_init=_init(cfg.init_std, ("embed", "mlp")),
                          bias_init=_zeros(("mlp",)), name="fc1")(hidden)
        hidden = nn.with_logical_constraint(
            hidden, ("activation_batch", "activation_length", "activation_mlp"))
        hidden = _ACTIVATIONS[cfg.activation_function](hidden)
        hidden = nn.Dense(cfg.hidden_size, use_bias=cfg.enable_bias, dtype=self.dtype,
                          param_dtype=self.param_dtype, kernel_init=_init(cfg.init_std, ("mlp", "embed")),
                          bias_init=_zeros(("embed",)), name="fc2")(hidden)
        hidden = residual + dropout(hidden, deterministic=self.deterministic)
        if not cfg.do_layer_norm_before:
            hidden = layer_norm(name="final_layer_norm")(hidden)
        hidden = nn.with_logical_constraint(hidden, act_axes)
        return (hidden, None) if self.scanned else hidden


def _maybe_remat(layer_cls, policy_name: str, prevent_cse: bool):
    if policy_name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy_name!r}; choose one of {', '.join(REMAT_POLICIES)}")
    if policy_name == "none":
        return layer_cls
    return nn.remat(layer_cls, policy=REMAT_POLICIES[policy_name], prevent_cse=prevent_cse)


class OPTDecoder(nn.Module):
    config: OPTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    embed_dropout: float = 0.0

    @nn.compact
    def __call__(self, input_ids, key_valid, position_ids, segment_ids, deterministic: bool,
                 decode: bool, tied_head: bool):
        """Final hidden states, or with `tied_head` the logits of the LM head tied to embed_tokens."""
        cfg = self.config
        act_axes = ("activation_batch", "activation_length", "activation_embed")
        embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.word_embed_proj_dim, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=_init(cfg.init_std, ("vocab", "embed")), name="embed_tokens")
        hidden = embed_tokens(input_ids)  # no sqrt(d) scaling: OPT trained without it
        if cfg.has_projections:
            hidden = nn.Dense(cfg.hidden_size, use_bias=False, dtype=self.dtype,
                              param_dtype=self.param_dtype,
                              kernel_init=_init(cfg.init_std, ("embed_proj", "embed")),
                              name="project_in")(hidden)
        positions = nn.Embed(cfg.num_positions, cfg.hidden_size, dtype=self.dtype,
                             param_dtype=self.param_dtype,
                             embedding_init=_init(cfg.init_std, ("positions", "embed")),
                             name="embed_positions")(position_ids + POSITION_OFFSET)
        hidden = nn.with_logical_constraint(hidden + positions, act_axes)
        # HF applies no dropout here; metaseq (and the OPT-IML fine-tuning recipe) does.
        hidden = nn.Dropout(rate=self.embed_dropout)(hidden, deterministic=deterministic)

        if self.scan_layers:
            # prevent_cse=False is safe under scan and lets XLA optimise the rematerialised layer.
            stack = nn.scan(
                _maybe_remat(OPTDecoderLayer, self.remat_policy, prevent_cse=False),
                variable_axes={"params": 0, "cache": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_hidden_layers,
                metadata_params={nn.PARTITION_NAME: "layers"})
            hidden, _ = stack(cfg, self.dtype, self.param_dtype, deterministic, decode, scanned=True,
                              name="layers")(hidden, key_valid, segment_ids)
        else:
            layer_cls = _maybe_remat(OPTDecoderLayer, self.remat_policy, prevent_cse=True)
            for i in range(cfg.num_hidden_layers):
                hidden = layer_cls(cfg, self.dtype, self.param_dtype, deterministic, decode,
                                   name=f"layers_{i}")(hidden, key_valid, segment_ids)

        if cfg.has_final_layer_norm:
            hidden = _layer_norm(cfg, self.dtype, self.param_dtype, name="final_layer_norm")(hidden)
        if cfg.has_projections:
            hidden = nn.Dense(cfg.word_embed_proj_dim, use_bias=False, dtype=self.dtype,
                              param_dtype=self.param_dtype,
                              kernel_init=_init(cfg.init_std, ("embed", "embed_proj")),
                              name="project_out")(hidden)
        if tied_head:  # logits over every embedding row, the vocabulary's padding rows included
            return embed_tokens.attend(hidden)
        return hidden


class OPTForCausalLM(nn.Module):
    """OPT with its (tied) language-model head.

    `dtype` is the compute dtype, `param_dtype` the storage dtype of parameters. `scan_layers`
    stacks the layers' weights on a leading "layers" axis and runs them under `nn.scan`, so compile
    time does not grow with depth; `remat_policy` is one of REMAT_POLICIES. `embed_dropout` is
    metaseq's dropout on the input embeddings (0 in HF; 0.1 in the OPT-IML recipe).
    """
    config: OPTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    embed_dropout: float = 0.0

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None,
                 deterministic: bool = True, decode: bool = False, return_hidden: bool = False):
        """Logits [batch, length, vocab].

        attention_mask: [batch, key_length] with 1 for real tokens (left padding allowed). When
          decoding with a KV cache, it covers every cache slot (key_length = cache length).
        position_ids: positions without OPT's +2 offset; derived from the mask when omitted
          (required when decoding, since the mask then covers the whole cache).
        segment_ids: [batch, length] example ids of packed sequences (0 = padding); attention never
          crosses examples.
        """
        cfg = self.config
        if attention_mask is None:
            if decode:
                raise ValueError("decode=True needs an attention_mask covering every cache slot")
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if position_ids is None:
            if decode:
                raise ValueError("decode=True needs explicit position_ids")
            position_ids = positions_from_mask(attention_mask)
        decoder = OPTDecoder(cfg, self.dtype, self.param_dtype, self.scan_layers, self.remat_policy,
                             self.embed_dropout, name="decoder")
        tied_head = cfg.tie_word_embeddings and not return_hidden
        out = decoder(input_ids, attention_mask, position_ids, segment_ids, deterministic, decode,
                      tied_head)
        if return_hidden:
            return out
        if tied_head:
            logits = out
        else:
            logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=self.dtype,
                              param_dtype=self.param_dtype,
                              kernel_init=_init(cfg.init_std, ("embed", "vocab")), name="lm_head")(out)
        return nn.with_logical_constraint(logits, ("activation_batch", "activation_length", "activation_vocab"))

    def init_cache(self, batch_size: int, max_length: int):
        """Zero KV cache for `max_length` slots (shapes only: no forward pass runs)."""
        ids = jnp.ones((batch_size, max_length), jnp.int32)
        shapes = jax.eval_shape(
            lambda: self.init(jax.random.PRNGKey(0), ids, attention_mask=ids, position_ids=ids,
                              decode=True)["cache"])
        return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
