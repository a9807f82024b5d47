"""The OPT model: the Flax modules (opt.py), the attention kernels (attention.py), and the norm and
activation with their hand-written gradients (layers.py)."""

from optiml_jax.model.attention import SEGMENT_BRANCH_SHIFT, attention_mask_for, branch_segment_ids
from optiml_jax.model.opt import (
    POSITION_OFFSET,
    REMAT_POLICIES,
    OPTForCausalLM,
    lm_head_logits,
    lm_head_weights,
    positions_from_mask,
)

__all__ = [
    "OPTForCausalLM",
    "REMAT_POLICIES",
    "POSITION_OFFSET",
    "SEGMENT_BRANCH_SHIFT",
    "attention_mask_for",
    "branch_segment_ids",
    "lm_head_logits",
    "lm_head_weights",
    "positions_from_mask",
]
