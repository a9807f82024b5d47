"""pallas_gpu: the Pallas (Triton) flash attention of jax.experimental.pallas.ops.gpu (CPU runs it in
interpret mode, for tests). Only on request: `auto` prefers cuDNN on GPU."""

from __future__ import annotations

from optiml_jax.model.kernels.base import KERNEL_BLOCK, pad_rows, pallas_spec


def _pallas_gpu_mha():
    # imported on first use: the Pallas GPU ops load Triton's lowering (start-up cost) and move between
    # jax versions
    from jax.experimental.pallas.ops.gpu.attention import mha

    return mha


def pallas_gpu_attention(query, key, value, segment_ids, *, causal: bool, interpret: bool):
    """The Pallas (Triton) flash attention, rows padded to its block."""
    mha = _pallas_gpu_mha()
    length = query.shape[1]
    query, key, value, segment_ids = pad_rows(KERNEL_BLOCK, query, key, value, segment_ids)
    out = mha(query, key, value, segment_ids, sm_scale=1.0, causal=causal, interpret=interpret)
    return out[:, :length]


# auto prefers cuDNN on GPU: no auto_reason, asked last of the fused kernels
SPEC = pallas_spec("pallas_gpu", pallas_gpu_attention, platform="gpu", kind="GPU (Triton)", auto_rank=4)
