"""What every attention kernel states about itself (`KernelSpec`) and the pieces the fused kernels share.

A kernel is one module of this package with a module-level `SPEC`; `kernels/__init__.py` finds them,
attention.py asks them which one runs, the remat policies (remat.py) and the memory estimate
(train/memory.py) ask the one that will run what it keeps for the backward pass.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from optiml_jax.model.masks import segment_mask

# Fused kernels work on whole blocks: their rows are padded to a multiple of this (the padding is its
# own segment, so no real token sees it, and it is sliced off). cuDNN also needs it: its backward
# pass returns NaN gradients at length % 128 == 64 with a mask (pytorch #196678, same library).
KERNEL_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class AttentionShapes:
    """What a kernel's support and memory depend on besides the platform and dtype: one row's length,
    the head dim, the heads one device computes (for the memory estimate), and whether the call has
    attention dropout or scoring's segment branches (masks.SEGMENT_BRANCH_SHIFT)."""

    length: int
    head_dim: int
    heads: int = 1
    dropout: bool = False
    segment_branches: bool = False


# (platform, dtype, shapes) -> a reason, or None
Check = Callable[[str, np.dtype, AttentionShapes], Optional[str]]
# (shapes, compute dtype) -> bytes per token
Bytes = Callable[[AttentionShapes, np.dtype], int]


def _no_reason(platform, dtype, shapes) -> Optional[str]:
    """As `requirements`: runs everywhere; as `auto_reason`: never auto's pick."""
    return None


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One attention kernel.

    `run(query, key, value, segment_ids, *, causal, platform, dropout_rate, dropout_rng, dtype)`
    computes softmax(q k^T) v (q already scaled) on [batch, length, heads, head_dim]; `per_shard`
    kernels are custom calls XLA cannot partition, run per shard of the mesh on inputs cast to
    `dtype` (attention.py does both). `requirements` says why the kernel cannot run on a platform,
    dtype and shapes (None: it can); `auto_reason` says why `auto` picks it there (None: auto does
    not), asked only where it can run, in `auto_rank` order, the spec without a rank (the fallback,
    which runs everywhere) last. `saved_names` are the `checkpoint_name`s of what its backward pass
    needs (the remat policy "dots" keeps them); `saved_bytes_per_token` is what it keeps for the
    backward pass beyond its inputs and output, `backward_bytes_per_token` the working set of one
    layer's backward pass.
    """

    name: str
    run: Callable[..., jax.Array]
    saved_bytes_per_token: Bytes
    backward_bytes_per_token: Bytes
    requirements: Check = _no_reason
    auto_reason: Check = _no_reason
    auto_rank: Optional[int] = None
    saved_names: tuple[str, ...] = ()
    per_shard: bool = True
    has_dropout: bool = False
    takes_segment_branches: bool = False  # needs a dense mask: segment ids compared for equality do not do
    interpreted_on_cpu: bool = False  # a Pallas kernel: CPU runs it in interpret mode (tests)

    def supports(self, platform: str, dtype, shapes: AttentionShapes) -> Optional[str]:
        """None when this kernel can run `shapes` in `dtype` on `platform`, else why not (a phrase
        that follows "attention='<name>'")."""
        if shapes.dropout and not self.has_dropout:
            return (
                "has no attention dropout; set the model's attention_dropout to 0 or use "
                "attention='blockwise' (or 'auto')"
            )
        if shapes.segment_branches and not self.takes_segment_branches:
            return "compares segment ids only; segment branches need a mask"
        return self.requirements(platform, jnp.dtype(dtype), shapes)


def pad_rows(multiple: int, query, key, value, segment_ids):
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
    query, key, value, segment_ids = pad_rows(pad_to, query, key, value, segment_ids)
    out = jax.nn.dot_product_attention(
        query, key, value, mask=segment_mask(segment_ids, causal), scale=1.0, implementation=backend
    )
    return out[:, :length]


def log_sum_exp_bytes(shapes: AttentionShapes, dtype) -> int:
    """A flash kernel's saved state: a float32 log-sum-exp per head and the int32 segment id."""
    return 4 * shapes.heads + 4


def flash_backward_bytes(shapes: AttentionShapes, dtype) -> int:
    """A flash kernel's backward working set: float32 gradient accumulators of q, k and v per token
    (its score tiles are per block, not per row)."""
    return 3 * 4 * shapes.heads * shapes.head_dim


def pallas_spec(
    name: str,
    attention_fn: Callable[..., jax.Array],
    *,
    platform: str,
    kind: str,
    auto_rank: int,
    auto_reason: Check = _no_reason,
) -> KernelSpec:
    """The spec of a Pallas flash kernel for `platform` ("tpu" or "gpu", a `kind` of kernel in
    messages): `attention_fn(query, key, value, segment_ids, *, causal, interpret)`, which CPU runs in
    interpret mode (tests)."""

    def run(query, key, value, segment_ids, *, causal, platform, dropout_rate, dropout_rng, dtype):
        return attention_fn(query, key, value, segment_ids, causal=causal, interpret=platform == "cpu")

    def requirements(target: str, dtype, shapes: AttentionShapes):
        if target not in (platform, "cpu"):
            return (
                f"is a {kind} kernel (CPU runs it in interpret mode, for tests); "
                f"the target platform is {target}"
            )
        return None

    return KernelSpec(
        name=name,
        run=run,
        saved_bytes_per_token=log_sum_exp_bytes,
        backward_bytes_per_token=flash_backward_bytes,
        requirements=requirements,
        auto_reason=auto_reason,
        auto_rank=auto_rank,
        interpreted_on_cpu=True,
    )
