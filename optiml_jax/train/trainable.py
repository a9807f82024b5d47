"""Which parameters train: a predicate on "/"-joined parameter paths ("decoder/embed_tokens/embedding").

`train.trainable` in a run config is a regular expression searched in each path (null: every parameter
trains); library users may pass any `is_trainable(path) -> bool` instead. Frozen parameters get no
gradient (the loss is differentiated with respect to the trainable ones only), no optimizer state and no
weight decay, and the memory estimate leaves their gradients and Adam moments out.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional, Union

import jax

from optiml_jax.config import ConfigError

Trainable = Union[None, str, Callable[[str], bool]]


def param_path(path) -> str:
    """ "decoder/layers/fc1/kernel" for a key path of a params tree (a box's attribute is not a name)."""
    return "/".join(str(entry.key) for entry in path if hasattr(entry, "key"))


def is_trainable_fn(trainable: Trainable) -> Optional[Callable[[str], bool]]:
    """The predicate `trainable` stands for, or None when everything trains."""
    if trainable is None:
        return None
    if isinstance(trainable, str):
        pattern = re.compile(trainable)
        return lambda path: pattern.search(path) is not None
    return trainable


def trainable_mask(params, trainable: Trainable) -> Any:
    """A tree of bools shaped like `params` (boxed or not): True where the parameter trains; None when
    every parameter trains."""
    predicate = is_trainable_fn(trainable)
    if predicate is None:
        return None
    mask = jax.tree_util.tree_map_with_path(lambda path, _: bool(predicate(param_path(path))), params)
    if not any(jax.tree.leaves(mask)):
        raise ConfigError(f"train.trainable={trainable!r} matches no parameter")
    return mask


def split_trainable(tree, mask) -> tuple[Any, Any]:
    """(trainable part, frozen part) of a params-shaped tree; each holds None where the other has the leaf."""
    if mask is None:
        return tree, None
    trained = jax.tree.map(lambda keep, leaf: leaf if keep else None, mask, tree)
    frozen = jax.tree.map(lambda keep, leaf: None if keep else leaf, mask, tree)
    return trained, frozen


def merge_trainable(mask, trained, frozen) -> Any:
    """The params tree again from the two parts of `split_trainable`."""
    if mask is None:
        return trained
    return jax.tree.map(
        lambda keep, a, b: a if keep else b, mask, trained, frozen, is_leaf=lambda leaf: leaf is None
    )
