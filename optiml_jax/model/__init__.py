"""The OPT model: the Flax modules (opt.py), the attention kernels (kernels/, one module each) with
their dispatch (attention.py) and masks (masks.py), the remat policies (remat.py), and the norm and
activation with their hand-written gradients (layers.py)."""

from optiml_jax.model.masks import SEGMENT_BRANCH_SHIFT, attention_mask_for, branch_segment_ids
from optiml_jax.model.opt import (
    POSITION_OFFSET,
    OPTForCausalLM,
    lm_head_logits,
    lm_head_weights,
    positions_from_mask,
)
from optiml_jax.model.remat import REMAT_POLICIES

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
