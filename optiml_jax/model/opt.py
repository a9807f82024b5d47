"""The OPT decoder (Zhang et al. 2022, arXiv 2205.01068) in Flax, exact to Hugging Face's PyTorch OPT.

Every parameter and large activation carries logical axis names (see `sharding.py` for how they map
onto a device mesh), so this one file serves a CPU test, one GPU and a TPU pod unchanged. The attention
kernels live in kernels/ (dispatched by attention.py), the remat policies in remat.py, the norm and
activation with their hand-written gradients in layers.py.

Parity traps handled here (see docs and the HF source for the reference semantics):
  * positions come from the attention mask (`cumsum(mask) * mask - 1`) and index a learned table
    with an offset of 2, so left padding does not shift the positions of real tokens;
  * the query is scaled by head_dim**-0.5 after its bias is added, and softmax runs in float32;
  * 350m: token embeddings are 512 wide and go through `project_in` before positions are added,
    layers are post-LN, there is no final LayerNorm, and `project_out` precedes the tied LM head;
  * the LM head is tied to the token embedding over all rows, the vocabulary's padding rows included.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from optiml_jax.config import OPTConfig
from optiml_jax.model.attention import attention, cached_dot_product_attention, resolve_attention
from optiml_jax.model.kernels import AttentionShapes
from optiml_jax.model.layers import LayerNorm, activation, init_normal, init_zeros
from optiml_jax.model.masks import attention_mask_for, segments_from
from optiml_jax.model.remat import REMAT_POLICIES

Dtype = Any

# KV-cache layouts (OPTAttention._update_cache); generate.py picks one per platform.
CACHE_LAYOUTS = ("standard", "cpu")

# The position table is indexed with `position + POSITION_OFFSET` (metaseq's padding_idx + 1).
POSITION_OFFSET = 2


def _layer_norm(cfg: OPTConfig, dtype, param_dtype, name: str) -> "LayerNorm":
    """OPT's LayerNorm: eps 1e-5 (HF and metaseq), affine unless layer_norm_elementwise_affine=False."""
    return LayerNorm(
        epsilon=1e-5,
        affine=cfg.layer_norm_elementwise_affine,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def _dense(
    cfg: OPTConfig, dtype, param_dtype, features: int, kernel_axes: tuple[str, str], name: str, use_bias=False
) -> nn.Dense:
    """A dense layer with OPT's normal init; its bias (if any) is zero and named by the output axis."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=init_normal(cfg.init_std, kernel_axes),
        bias_init=init_zeros(kernel_axes[-1:]),
        name=name,
    )


def _embedding(
    cfg: OPTConfig, dtype, param_dtype, rows: int, width: int, row_axis: str, name: str
) -> nn.Embed:
    """A learned table (tokens or positions) with OPT's normal init."""
    return nn.Embed(
        rows,
        width,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=init_normal(cfg.init_std, (row_axis, "embed")),
        name=name,
    )


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """HF/metaseq positions: 0, 1, 2... over real tokens, -1 on padding (which then reads row 1)."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.cumsum(mask, axis=1) * mask - 1


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
        kernel = self.param("kernel", init_normal(self.init_std, axes), shape, self.param_dtype)
        if self.into_heads:
            out = jnp.einsum(equation, x.astype(self.dtype), kernel.astype(self.dtype))
        else:
            # Not jnp.einsum: it contracts (kv, heads) in that order, which made XLA on CPU transpose
            # the whole out_proj kernel on every call (a quarter of a decode step's time at batch 1).
            out = jax.lax.dot_general(
                x.astype(self.dtype), kernel.astype(self.dtype), (((2, 3), (0, 1)), ((), ()))
            )
        if self.use_bias:
            bias = self.param("bias", init_zeros(bias_axes), bias_shape, self.param_dtype)
            out = out + bias.astype(self.dtype)
        return out


class OPTAttention(nn.Module):
    config: OPTConfig
    dtype: Dtype
    param_dtype: Dtype
    deterministic: bool
    decode: bool
    attention: str = "auto"  # kernels.IMPLEMENTATIONS
    segment_branches: bool = False  # segment ids may carry branches (scoring)
    platform: Optional[str] = None  # the attention kernel's target platform; None: the running backend

    @nn.compact
    def __call__(self, hidden, key_valid, segment_ids):
        cfg = self.config
        heads, head_dim = cfg.num_attention_heads, cfg.head_dim
        dense = functools.partial(
            HeadsProjection,
            heads=heads,
            head_dim=head_dim,
            use_bias=cfg.enable_bias,
            init_std=cfg.init_std,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        query = dense(name="q_proj")(hidden) * jnp.asarray(head_dim**-0.5, self.dtype)
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
            dropout_rng = None
            if not self.deterministic and cfg.attention_dropout > 0.0:
                dropout_rng = self.make_rng("dropout")
            out = attention(
                query,
                key,
                value,
                segment_ids=segments_from(key_valid, segment_ids, hidden.shape[:2]),
                causal=True,
                dropout_rate=cfg.attention_dropout,
                dropout_rng=dropout_rng,
                implementation=self.attention,
                segment_branches=self.segment_branches,
                dtype=self.dtype,
                platform=self.platform,
            )
        out = nn.with_logical_constraint(out, qkv_axes)
        return HeadsProjection(
            heads,
            head_dim,
            cfg.enable_bias,
            cfg.init_std,
            self.dtype,
            self.param_dtype,
            into_heads=False,
            hidden_size=cfg.hidden_size,
            name="out_proj",
        )(out)

    def _update_cache(self, key, value):
        """Writes this step's keys/values at the fill level; returns the whole cache to attend over.

        The cache is preallocated at the full generation length (fixed shapes: the decode loop
        compiles once); slots past the fill level are hidden by the causal-by-slot mask. Its layout
        is the one `OPTForCausalLM.init_cache` made, told apart here by rank:
          * "standard": keys and values [batch, slots, heads, head_dim], whose attention matmuls are
            the usual batched dots of GPU and TPU libraries;
          * "cpu": keys [batch * heads, head_dim, slots], values [batch * heads, slots, head_dim], so
            q @ K and p @ V are plain batched matmuls on the stored arrays. Stored the standard way,
            XLA on CPU copied every layer's whole cache at every step (to transpose it, or, with a
            separate batch axis of size 1, to feed the matmul a reshaped copy of the update instead
            of updating in place).
        """
        initialised = self.has_variable("cache", "cached_key")
        # `init` shapes the cache in the standard layout; init_cache reshapes it for the cpu one
        cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if not initialised:
            return key, value, 0
        index = cache_index.value
        zero = jnp.array(0, jnp.int32)
        batch, step_len, heads, head_dim = key.shape
        if cached_key.value.ndim == 4:  # standard
            cache_axes = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
            key = nn.with_logical_constraint(
                jax.lax.dynamic_update_slice(
                    cached_key.value, key.astype(cached_key.value.dtype), (zero, index, zero, zero)
                ),
                cache_axes,
            )
            value = nn.with_logical_constraint(
                jax.lax.dynamic_update_slice(
                    cached_value.value, value.astype(cached_value.value.dtype), (zero, index, zero, zero)
                ),
                cache_axes,
            )
        else:  # cpu; this step's tokens only are transposed: cheap to move
            key = jnp.transpose(key, (0, 2, 3, 1)).reshape(batch * heads, head_dim, step_len)
            value = jnp.swapaxes(value, 1, 2).reshape(batch * heads, step_len, head_dim)
            key = jax.lax.dynamic_update_slice(
                cached_key.value, key.astype(cached_key.value.dtype), (zero, zero, index)
            )
            value = jax.lax.dynamic_update_slice(
                cached_value.value, value.astype(cached_value.value.dtype), (zero, index, zero)
            )
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
    attention: str = "auto"
    segment_branches: bool = False
    platform: Optional[str] = None

    @nn.compact
    def __call__(self, hidden, key_valid, segment_ids):
        cfg = self.config
        layer_norm = functools.partial(_layer_norm, cfg, self.dtype, self.param_dtype)
        dropout = nn.Dropout(rate=cfg.dropout)
        act_axes = ("activation_batch", "activation_length", "activation_embed")

        residual = hidden
        if cfg.do_layer_norm_before:
            hidden = layer_norm(name="self_attn_layer_norm")(hidden)
        self_attention = OPTAttention(
            cfg,
            self.dtype,
            self.param_dtype,
            self.deterministic,
            self.decode,
            self.attention,
            self.segment_branches,
            self.platform,
            name="self_attn",
        )
        hidden = self_attention(hidden, key_valid, segment_ids)
        hidden = residual + dropout(hidden, deterministic=self.deterministic)
        if not cfg.do_layer_norm_before:
            hidden = layer_norm(name="self_attn_layer_norm")(hidden)
        hidden = nn.with_logical_constraint(hidden, act_axes)

        residual = hidden
        if cfg.do_layer_norm_before:
            hidden = layer_norm(name="final_layer_norm")(hidden)
        dense = functools.partial(_dense, cfg, self.dtype, self.param_dtype, use_bias=cfg.enable_bias)
        hidden = dense(cfg.ffn_dim, ("embed", "mlp"), "fc1")(hidden)
        hidden = nn.with_logical_constraint(
            hidden, ("activation_batch", "activation_length", "activation_mlp")
        )
        hidden = activation(cfg.activation_function)(hidden)
        hidden = dense(cfg.hidden_size, ("mlp", "embed"), "fc2")(hidden)
        hidden = residual + dropout(hidden, deterministic=self.deterministic)
        if not cfg.do_layer_norm_before:
            hidden = layer_norm(name="final_layer_norm")(hidden)
        hidden = nn.with_logical_constraint(hidden, act_axes)
        return (hidden, None) if self.scanned else hidden


def _maybe_remat(layer_cls, policy_name: str, prevent_cse: bool, attention_names: tuple[str, ...]):
    """`layer_cls` under the remat policy `policy_name`, which keeps `attention_names` (what the
    attention kernel that runs names for its backward pass) where the policy keeps attention's state."""
    if policy_name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy_name!r}; choose one of {', '.join(REMAT_POLICIES)}")
    if policy_name == "none":
        return layer_cls
    return nn.remat(layer_cls, policy=REMAT_POLICIES[policy_name](attention_names), prevent_cse=prevent_cse)


class _OPTSettings(nn.Module):
    """The settings OPTForCausalLM takes and hands on whole to its OPTDecoder.

    `dtype` is the compute dtype, `param_dtype` the storage dtype of parameters. `scan_layers`
    stacks the layers' weights on a leading "layers" axis and runs them under `nn.scan`, so compile
    time does not grow with depth; `remat_policy` is one of REMAT_POLICIES. `embed_dropout` is
    metaseq's dropout on the input embeddings (0 in HF; 0.1 in the OPT-IML recipe). `attention` is
    one of kernels.IMPLEMENTATIONS (the kernel of whole-row attention; decoding has its own), chosen
    for `platform` ("cpu", "gpu", "tpu"; None: the running backend, so a program can be traced for
    another platform than the one tracing it).
    """

    config: OPTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    embed_dropout: float = 0.0
    attention: str = "auto"
    platform: Optional[str] = None


class OPTDecoder(_OPTSettings):
    @nn.compact
    def __call__(
        self,
        input_ids,
        key_valid,
        position_ids,
        segment_ids,
        deterministic: bool,
        decode: bool,
        tied_head: bool,
        segment_branches: bool = False,
    ):
        """Final hidden states, or with `tied_head` the logits of the LM head tied to embed_tokens."""
        cfg = self.config
        act_axes = ("activation_batch", "activation_length", "activation_embed")
        dense = functools.partial(_dense, cfg, self.dtype, self.param_dtype)
        embed = functools.partial(_embedding, cfg, self.dtype, self.param_dtype)
        embed_tokens = embed(cfg.vocab_size, cfg.word_embed_proj_dim, "vocab", "embed_tokens")
        hidden = embed_tokens(input_ids)  # no sqrt(d) scaling: OPT trained without it
        if cfg.has_projections:
            hidden = dense(cfg.hidden_size, ("embed_proj", "embed"), "project_in")(hidden)
        positions = embed(cfg.num_positions, cfg.hidden_size, "positions", "embed_positions")(
            position_ids + POSITION_OFFSET
        )
        hidden = nn.with_logical_constraint(hidden + positions, act_axes)
        # HF applies no dropout here; metaseq (and the OPT-IML fine-tuning recipe) does.
        hidden = nn.Dropout(rate=self.embed_dropout)(hidden, deterministic=deterministic)
        attention_names = () if decode else self._attention_kernel(input_ids, deterministic, segment_branches)

        layer_args = (cfg, self.dtype, self.param_dtype, deterministic, decode)
        layer_options = dict(
            attention=self.attention, segment_branches=segment_branches, platform=self.platform
        )
        if self.scan_layers:
            # prevent_cse=False is safe under scan and lets XLA optimise the rematerialised layer.
            stack = nn.scan(
                _maybe_remat(OPTDecoderLayer, self.remat_policy, False, attention_names),
                variable_axes={"params": 0, "cache": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=cfg.num_hidden_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            hidden, _ = stack(*layer_args, scanned=True, name="layers", **layer_options)(
                hidden, key_valid, segment_ids
            )
        else:
            layer_cls = _maybe_remat(OPTDecoderLayer, self.remat_policy, True, attention_names)
            for i in range(cfg.num_hidden_layers):
                layer = layer_cls(*layer_args, name=f"layers_{i}", **layer_options)
                hidden = layer(hidden, key_valid, segment_ids)

        if cfg.has_final_layer_norm:
            hidden = _layer_norm(cfg, self.dtype, self.param_dtype, name="final_layer_norm")(hidden)
        if cfg.has_projections:
            hidden = dense(cfg.word_embed_proj_dim, ("embed", "embed_proj"), "project_out")(hidden)
        if tied_head:  # logits over every embedding row, the vocabulary's padding rows included
            return embed_tokens.attend(hidden)
        return hidden

    def _attention_kernel(self, input_ids, deterministic: bool, segment_branches: bool) -> tuple[str, ...]:
        """The names the attention kernel that the layers will run keeps for its backward pass (the
        layers' `attention` calls make the same choice, and log it)."""
        cfg = self.config
        shapes = AttentionShapes(
            length=input_ids.shape[1],
            head_dim=cfg.head_dim,
            heads=cfg.num_attention_heads,
            dropout=not deterministic and cfg.attention_dropout > 0.0,
            segment_branches=segment_branches,
        )
        spec, _ = resolve_attention(self.attention, self.platform, self.dtype, shapes)
        return spec.saved_names


class OPTForCausalLM(_OPTSettings):
    """OPT with its (tied) language-model head; the settings are _OPTSettings'."""

    @nn.compact
    def __call__(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        segment_ids=None,
        deterministic: bool = True,
        decode: bool = False,
        return_hidden: bool = False,
        segment_branches: bool = False,
    ):
        """Logits [batch, length, vocab].

        attention_mask: [batch, key_length] with 1 for real tokens (left padding allowed). When
          decoding with a KV cache, it covers every cache slot (key_length = cache length).
        position_ids: positions without OPT's +2 offset; derived from the mask when omitted
          (required when decoding, since the mask then covers the whole cache).
        segment_ids: [batch, length] example ids of packed sequences (0 = padding); attention never
          crosses examples. `segment_branches`: the ids carry branches (masks.SEGMENT_BRANCH_SHIFT).
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
        settings = {field.name: getattr(self, field.name) for field in dataclasses.fields(_OPTSettings)}
        settings.pop("parent"), settings.pop("name")  # flax's own fields: this module's, not the decoder's
        decoder = OPTDecoder(**settings, name="decoder")
        tied_head = cfg.tie_word_embeddings and not return_hidden
        out = decoder(
            input_ids,
            attention_mask,
            position_ids,
            segment_ids,
            deterministic,
            decode,
            tied_head,
            segment_branches,
        )
        if return_hidden:
            return out
        if tied_head:
            logits = out
        else:
            logits = _dense(cfg, self.dtype, self.param_dtype, cfg.vocab_size, ("embed", "vocab"), "lm_head")(
                out
            )
        return nn.with_logical_constraint(
            logits, ("activation_batch", "activation_length", "activation_vocab")
        )

    def init_cache(self, batch_size: int, max_length: int, layout: str = "standard"):
        """Zero KV cache for `max_length` slots in `layout` ("standard" or "cpu", see
        `OPTAttention._update_cache`); shapes only: no forward pass runs."""
        if layout not in CACHE_LAYOUTS:
            raise ValueError(f"cache layout must be one of {', '.join(CACHE_LAYOUTS)}, got {layout!r}")
        ids = jnp.ones((batch_size, max_length), jnp.int32)
        shapes = jax.eval_shape(
            lambda: self.init(jax.random.PRNGKey(0), ids, attention_mask=ids, position_ids=ids, decode=True)[
                "cache"
            ]
        )

        def zeros(path, shape):
            name, dims = path[-1].key, shape.shape
            if layout == "cpu" and name in ("cached_key", "cached_value"):
                *layers, batch, slots, heads, head_dim = dims  # `layers`: a scanned stack's axis
                inner = (head_dim, slots) if name == "cached_key" else (slots, head_dim)
                dims = (*layers, batch * heads, *inner)
            return jnp.zeros(dims, shape.dtype)

        return jax.tree_util.tree_map_with_path(zeros, shapes)


def lm_head_weights(config: OPTConfig, params) -> jax.Array:
    """The LM head as [vocab, word_embed_proj_dim]: the tied token embedding, or lm_head's kernel
    transposed. For code that applies the head itself (the fused training loss, decoding's last
    position, scoring's scored positions) without reading the parameter tree's layout."""
    if config.tie_word_embeddings:
        return params["decoder"]["embed_tokens"]["embedding"]
    return params["lm_head"]["kernel"].T


def lm_head_logits(model: OPTForCausalLM, params, hidden: jax.Array) -> jax.Array:
    """Logits [..., vocab] of final hidden states [..., word_embed_proj_dim] (`return_hidden=True`
    outputs), in the model's compute dtype."""
    table = lm_head_weights(model.config, params).astype(model.dtype)
    return jnp.einsum("...e,ve->...v", hidden.astype(model.dtype), table)
