"""xla: `jax.nn.dot_product_attention`'s XLA implementation with our segments as its mask; runs on
every platform and takes scoring's segment branches, so `auto` picks it on GPU where cuDNN would run
but for those."""

from __future__ import annotations

from optiml_jax.model.kernels import cudnn
from optiml_jax.model.kernels.base import AttentionShapes, KernelSpec, fused_dot_product_attention


def _run(query, key, value, segment_ids, *, causal, platform, dropout_rate, dropout_rng, dtype):
    return fused_dot_product_attention(query, key, value, segment_ids, backend="xla", causal=causal)


def _auto_reason(platform: str, dtype, shapes: AttentionShapes):
    if (
        shapes.segment_branches
        and cudnn.SPEC.requirements(platform, dtype, shapes) is None
        and shapes.head_dim <= cudnn.AUTO_MAX_HEAD_DIM
    ):
        return "segment branches need a dense mask; cuDNN's bias path is not used for them"
    return None


SPEC = KernelSpec(
    name="xla",
    run=_run,
    # autodiff keeps the boolean mask (`length` bytes a token) and the probabilities, in float32 and
    # in the compute dtype, per head
    saved_bytes_per_token=lambda shapes, dtype: shapes.length * (1 + shapes.heads * (4 + dtype.itemsize)),
    # the float32 gradients of the probabilities and of the scores
    backward_bytes_per_token=lambda shapes, dtype: 2 * 4 * shapes.heads * shapes.length,
    auto_reason=_auto_reason,
    auto_rank=1,
    takes_segment_branches=True,
)
