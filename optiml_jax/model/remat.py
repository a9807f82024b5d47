"""The rematerialisation policies of the decoder layers, by name: what the forward pass keeps for the
backward pass, the rest being recomputed there. A table of names (run_config.py validates
train.remat_policy against it) and, per name, the jax policy for the attention kernel that runs
(`dots` keeps what that kernel names for its backward pass: kernels.KernelSpec.saved_names)."""

from __future__ import annotations

from typing import Callable, Optional

import jax

_policies = jax.checkpoint_policies

# name -> (the attention kernel's saved names -> the jax policy; None: no rematerialisation)
REMAT_POLICIES: dict[str, Callable[[tuple[str, ...]], Optional[Callable]]] = {
    # keep every activation (fastest, most memory)
    "none": lambda attention_names: None,
    # recompute the whole layer in the backward pass
    "full": lambda attention_names: _policies.nothing_saveable,
    # keep the weight matmuls' outputs and what the attention kernel names for its backward pass (jax's
    # checkpoint_dots would also keep the float32 scores, which blockwise's backward recomputes anyway:
    # more memory than "none" at long sequences)
    "dots": lambda attention_names: _policies.save_from_both_policies(
        _policies.dots_with_no_batch_dims_saveable, _policies.save_only_these_names(*attention_names)
    ),
    # keep the weight matmuls' outputs only
    "dots_no_batch": lambda attention_names: _policies.dots_with_no_batch_dims_saveable,
}
