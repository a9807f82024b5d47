"""Attention, every kernel of it: the masks (causal, padding, packed segments and their branches);
`attention`, the one entry point of whole-row attention (training, scoring, forward passes), which
runs one of IMPLEMENTATIONS -- our blockwise XLA attention with its memory-saving backward pass,
`jax.nn.dot_product_attention` (XLA or cuDNN), TPU splash or the GPU Pallas kernel -- picked per
platform by "auto"; and the attention over a KV cache of decoding. The model (opt.py) calls
`attention` and `cached_dot_product_attention` only.

The choice is static (made while tracing) and logged once per process with its reason. On CPU the
Pallas kernels run in interpret mode, so the tests check every path against `blockwise` here.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

Dtype = Any
logger = logging.getLogger(__name__)


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


# ---------------------------------------------------------------------------------------------------
# The entry point: one call for every implementation, chosen by name or per platform ("auto").

IMPLEMENTATIONS = ("auto", "blockwise", "xla", "cudnn", "splash", "pallas_gpu")
# Paths that take a dense mask and so can express segment branches (scoring); the Pallas kernels
# only compare segment ids for equality.
_MASK_PATHS = ("blockwise", "xla", "cudnn")
# Fused kernels work on whole blocks: their rows are padded to a multiple of this (the padding is its
# own segment, so no real token sees it, and it is sliced off). cuDNN also needs it: its backward
# pass returns NaN gradients at length % 128 == 64 with a mask (pytorch #196678, same library).
KERNEL_BLOCK = 128
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
):
    """softmax(q k^T) v over whole rows (training, scoring, plain forward passes); q already scaled.

    query/key/value [batch, length, heads, head_dim]; segment_ids [batch, length] int: a token sees
    only keys of its own segment (0 = padding; `segment_branches`: ids may carry branches, see
    SEGMENT_BRANCH_SHIFT), and with `causal` only keys up to itself. Every query sees at least
    itself, so no row is fully masked on any path. `dropout_rng` None means no attention dropout.
    `implementation` is one of IMPLEMENTATIONS; `auto` picks per platform (`choose_implementation`).
    """
    dtype = jnp.dtype(dtype or query.dtype)
    rate = float(dropout_rate) if dropout_rng is not None and dropout_rate > 0.0 else 0.0
    name, reason = choose_implementation(
        implementation,
        platform=jax.default_backend(),
        dtype=dtype,
        head_dim=query.shape[-1],
        length=query.shape[1],
        dropout=rate > 0.0,
        segment_branches=segment_branches,
    )
    _log_choice(implementation, name, reason)
    if name == "blockwise":
        return blockwise_attention(
            query,
            key,
            value,
            segment_mask(segment_ids, causal),
            dropout_rate=rate,
            dropout_rng=dropout_rng,
            deterministic=not rate,
            dtype=dtype,
            causal=causal,
        )
    query, key, value = (x.astype(dtype) for x in (query, key, value))
    interpret = jax.default_backend() == "cpu"
    if name in ("xla", "cudnn"):
        kernel = functools.partial(
            fused_dot_product_attention,
            backend=name,
            causal=causal,
            pad_to=KERNEL_BLOCK if name == "cudnn" else 1,
        )
    elif name == "splash":
        kernel = functools.partial(splash_attention, causal=causal, interpret=interpret)
    else:
        kernel = functools.partial(pallas_gpu_attention, causal=causal, interpret=interpret)
    return _shard_over_batch_and_heads(kernel, query, key, value, segment_ids)


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
    """(the implementation to run, why) for a request; an explicit name that cannot run here is an
    AttentionError, except that a request the kernels cannot express (dropout, segment branches)
    falls back to `blockwise`, logged."""
    if implementation not in IMPLEMENTATIONS:
        raise AttentionError(f"attention={implementation!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    dtype = jnp.dtype(dtype)
    if implementation == "auto":
        if dropout:
            return "blockwise", "attention dropout > 0 (only blockwise has dropout)"
        if (
            platform == "gpu"
            and dtype in (jnp.bfloat16, jnp.float16)
            and head_dim % 8 == 0
            and head_dim <= 128
        ):
            return (
                ("xla", "segment branches need a dense mask; cuDNN's bias path is not used for them")
                if segment_branches
                else ("cudnn", f"GPU, {dtype.name}, head dim {head_dim}")
            )
        if platform == "tpu" and length % KERNEL_BLOCK == 0 and not segment_branches:
            return "splash", f"TPU, length {length} a multiple of {KERNEL_BLOCK}"
        why = {"cpu": "CPU"}.get(platform) or (
            f"{platform}: no fused kernel for {dtype.name}, head dim {head_dim}, length {length}"
            + (", segment branches" if segment_branches else "")
        )
        return "blockwise", why
    if dropout and implementation != "blockwise":
        raise AttentionError(
            f"attention={implementation!r} has no attention dropout; set the model's "
            f"attention_dropout to 0 or use attention='blockwise' (or 'auto')"
        )
    if segment_branches and implementation not in _MASK_PATHS:
        return "blockwise", f"{implementation} compares segment ids only; segment branches need a mask"
    if implementation == "cudnn":
        if platform != "gpu":
            raise AttentionError(
                f"attention='cudnn' needs an NVIDIA GPU; this process runs on {platform} "
                f"(use 'xla' or 'blockwise')"
            )
        if dtype not in (jnp.bfloat16, jnp.float16):
            raise AttentionError(
                f"attention='cudnn' runs in bfloat16 or float16, not {dtype.name} "
                f"(set the compute dtype, or use 'xla')"
            )
        if head_dim % 8 or head_dim > 256:
            raise AttentionError(
                f"attention='cudnn' needs a head dim that is a multiple of 8 and at most "
                f"256 (128 before Hopper), not {head_dim}"
            )
    if implementation == "splash" and platform not in ("tpu", "cpu"):
        raise AttentionError(
            f"attention='splash' is a TPU kernel (CPU runs it in interpret mode, for "
            f"tests); this process runs on {platform}"
        )
    if implementation == "pallas_gpu" and platform not in ("gpu", "cpu"):
        raise AttentionError(
            f"attention='pallas_gpu' is a GPU (Triton) kernel (CPU runs it in interpret "
            f"mode, for tests); this process runs on {platform}"
        )
    if implementation in ("splash", "pallas_gpu") and platform == "cpu":
        return implementation, "asked for; Pallas interpret mode on CPU (slow: for tests)"
    return implementation, "asked for"


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


# ---------------------------------------------------------------------------------------------------
# Fused kernels: jax.nn.dot_product_attention (XLA or cuDNN) and the Pallas kernels (TPU splash,
# GPU Triton). Each takes one shard: [batch, length, heads, head_dim] and its segment ids.


def _pad_rows(multiple: int, query, key, value, segment_ids):
    """Rows padded to a multiple of `multiple`; the padding is segment -1, which only sees itself."""
    length = query.shape[1]
    extra = -length % multiple
    if not extra:
        return query, key, value, segment_ids
    pad = lambda x: jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0)))
    return pad(query), pad(key), pad(value), jnp.pad(segment_ids, ((0, 0), (0, extra)), constant_values=-1)


def fused_dot_product_attention(
    query, key, value, segment_ids, *, backend: str, causal: bool, pad_to: int = 1
):
    """`jax.nn.dot_product_attention` with our segments as its boolean mask (`backend` "xla" or
    "cudnn"). The mask is passed whole, [batch, 1, length, length] (a broadcast-shaped one fails on
    cuDNN: jax #28974); cuDNN turns it into a bias of the compute dtype."""
    length = query.shape[1]
    query, key, value, segment_ids = _pad_rows(pad_to, query, key, value, segment_ids)
    out = jax.nn.dot_product_attention(
        query, key, value, mask=segment_mask(segment_ids, causal), scale=1.0, implementation=backend
    )
    return out[:, :length]


def _kernel_block(length: int) -> int:
    return next(b for b in (512, 256, KERNEL_BLOCK) if length % b == 0)


def splash_attention(query, key, value, segment_ids, *, causal: bool, interpret: bool):
    """TPU splash attention, one sequence at a time ([heads, length, head_dim]) under vmap."""
    splash = _splash_module()
    length = query.shape[1]
    query, key, value, segment_ids = _pad_rows(KERNEL_BLOCK, query, key, value, segment_ids)
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


def pallas_gpu_attention(query, key, value, segment_ids, *, causal: bool, interpret: bool):
    """The Pallas (Triton) flash attention of jax.experimental.pallas.ops.gpu, rows padded to its block."""
    mha = _pallas_gpu_mha()
    length = query.shape[1]
    query, key, value, segment_ids = _pad_rows(KERNEL_BLOCK, query, key, value, segment_ids)
    out = mha(query, key, value, segment_ids, sm_scale=1.0, causal=causal, interpret=interpret)
    return out[:, :length]


# ---------------------------------------------------------------------------------------------------
# The jax APIs that move between versions, in one place (the GPU machine runs a newer jax than CI):
# the Pallas kernels' modules, shard_map and the mesh of the current `jax.set_mesh`.


def _splash_module():
    from jax.experimental.pallas.ops.tpu import splash_attention  # TPU splash kernel, jax >= 0.4.26

    return splash_attention


def _pallas_gpu_mha():
    from jax.experimental.pallas.ops.gpu.attention import mha  # the Triton flash attention

    return mha


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
