"""cudnn: `jax.nn.dot_product_attention` on cuDNN's flash attention (NVIDIA GPUs, bfloat16/float16),
with our segments as its mask; `auto`'s pick on GPU."""

from __future__ import annotations

import jax.numpy as jnp

from optiml_jax.model.kernels.base import (
    KERNEL_BLOCK,
    AttentionShapes,
    KernelSpec,
    flash_backward_bytes,
    fused_dot_product_attention,
)

# cuDNN takes head dims up to 256 on Hopper but 128 before it; the platform says nothing about the GPU
# generation, so `auto` stays within what every generation runs.
AUTO_MAX_HEAD_DIM = 128


def _run(query, key, value, segment_ids, *, causal, platform, dropout_rate, dropout_rng, dtype):
    return fused_dot_product_attention(
        query, key, value, segment_ids, backend="cudnn", causal=causal, pad_to=KERNEL_BLOCK
    )


def _requirements(platform: str, dtype, shapes: AttentionShapes):
    if platform != "gpu":
        return f"needs an NVIDIA GPU; the target platform is {platform} (use 'xla' or 'blockwise')"
    if dtype not in (jnp.bfloat16, jnp.float16):
        return f"runs in bfloat16 or float16, not {dtype.name} (set the compute dtype, or use 'xla')"
    if shapes.head_dim % 8 or shapes.head_dim > 256:
        return (
            f"needs a head dim that is a multiple of 8 and at most 256 (128 before Hopper), "
            f"not {shapes.head_dim}"
        )
    return None


def _auto_reason(platform: str, dtype, shapes: AttentionShapes):
    # segment branches: the xla kernel takes them (cuDNN's bias path is not used for them)
    if shapes.head_dim <= AUTO_MAX_HEAD_DIM and not shapes.segment_branches:
        return f"GPU, {dtype.name}, head dim {shapes.head_dim}"
    return None


SPEC = KernelSpec(
    name="cudnn",
    run=_run,
    # the mask as a bias of the compute dtype (one per row: `length` values a token) and a float32
    # softmax statistic per query and head
    saved_bytes_per_token=lambda shapes, dtype: shapes.length * dtype.itemsize + 4 * shapes.heads,
    backward_bytes_per_token=flash_backward_bytes,
    requirements=_requirements,
    auto_reason=_auto_reason,
    auto_rank=2,
    takes_segment_branches=True,
)
