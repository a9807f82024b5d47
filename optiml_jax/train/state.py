"""The training state: the model with the run's settings, AdamW with the OPT-IML schedule, and the
TrainState, created straight into its shards.

Every sharding comes from the logical axis names (flax lm1b's `setup_initial_state`): the abstract
state is built from the *boxed* abstract params, so Adam's moments carry the params' logical names,
and `sharding.logical_shardings` maps the whole tree onto the mesh by the rules.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from optiml_jax.config import ConfigError, OPTConfig, as_dtype
from optiml_jax.model import OPTForCausalLM
from optiml_jax.model.attention import AttentionError, choose_implementation
from optiml_jax.run_config import OptimSection, TrainSection
from optiml_jax.sharding import DEFAULT_RULES, abstract_params, logical_shardings, on_mesh
from optiml_jax.train.trainable import Trainable, trainable_mask

NO_DECAY_NAMES = ("bias", "scale")  # biases and LayerNorm scales (and LayerNorm biases)


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. too many non-finite steps in a row); the message says why."""


@struct.dataclass
class TrainState:
    step: jax.Array  # int32: steps taken = batches consumed (skipped non-finite steps included)
    params: Any
    opt_state: Any
    rng: jax.Array  # the base dropout key (raw uint32[2]); step s uses fold_in(rng, s)
    nonfinite_in_a_row: jax.Array  # int32
    nonfinite_total: jax.Array  # int32


def build_model(opt_config: OPTConfig, train: TrainSection, platform: Optional[str] = None) -> OPTForCausalLM:
    """The model with the run's dropout, dtypes, scan and remat settings, its attention kernel chosen
    for `platform` (None: the running backend)."""
    changes = {}
    if train.dropout is not None:
        changes["dropout"] = train.dropout
    if train.attention_dropout is not None:
        changes["attention_dropout"] = train.attention_dropout
    config = opt_config.replace(**changes) if changes else opt_config
    try:  # what cannot run here (cuDNN on a CPU, a kernel with dropout) is a config error, not a trace error
        choose_implementation(
            train.attention,
            platform=platform or jax.default_backend(),
            dtype=as_dtype(train.compute_dtype),
            head_dim=config.head_dim,
            length=train.seq_len,
            dropout=config.attention_dropout > 0,
        )
    except AttentionError as error:
        raise ConfigError(f"train.{error}") from None
    return OPTForCausalLM(
        config,
        dtype=as_dtype(train.compute_dtype),
        param_dtype=as_dtype(train.param_dtype),
        scan_layers=train.scan_layers,
        remat_policy=train.remat_policy,
        embed_dropout=config.dropout if train.embed_dropout else 0.0,
        attention=train.attention,
        platform=platform,
    )


def learning_rate_schedule(optim: OptimSection, max_steps: int) -> Callable:
    """metaseq's polynomial_decay with power 1: update k (1-based) of the warmup uses lr * k / warmup,
    so the first update is not wasted at lr 0; then linear (or cosine) decay to end_lr_ratio * lr at
    max_steps."""
    peak, warmup, end = optim.lr, optim.warmup_steps, optim.lr * optim.end_lr_ratio
    decay_steps = max(1, max_steps - warmup)

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = peak * jnp.minimum(1.0, (count + 1.0) / max(1, warmup)) if warmup else peak
        progress = jnp.clip((count - warmup) / decay_steps, 0.0, 1.0)
        if optim.schedule == "linear":
            decayed = peak + (end - peak) * progress
        elif optim.schedule == "cosine":
            decayed = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        else:
            decayed = jnp.asarray(peak, jnp.float32)
        return jnp.where(count < warmup, warm, decayed)

    return schedule


def weight_decay_mask(params) -> Any:
    """True where weight decay applies: everything but biases and LayerNorm parameters (by name, since
    under scan_layers a bias is [layers, d] and its rank says nothing). Works on boxed params too (the
    name is the last dict key of the path, not the box's attribute)."""

    def decays(path, _):
        name = next((entry.key for entry in reversed(path) if hasattr(entry, "key")), "")
        return name not in NO_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
    optim: OptimSection, max_steps: int, trainable: Trainable = None
) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay, float32 moments) after global-norm clipping. With `trainable`
    (train/trainable.py) the frozen parameters are partitioned off: their updates are zero and the
    optimizer state holds no moments for them (absent, not zeros)."""
    adamw = optax.adamw(
        learning_rate_schedule(optim, max_steps),
        b1=optim.b1,
        b2=optim.b2,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        mask=weight_decay_mask,
        mu_dtype=jnp.float32,
    )
    tx = optax.chain(optax.clip_by_global_norm(optim.clip_norm), adamw) if optim.clip_norm > 0 else adamw
    if trainable is None:
        return tx

    def labels(params):
        # Labelled on the unboxed tree, so a frozen parameter's box goes whole (a box around nothing
        # would still claim a sharding).
        mask = trainable_mask(nn.meta.unbox(params), trainable)
        return jax.tree.map(lambda keep: "trained" if keep else "frozen", mask)

    return optax.partition({"trained": tx, "frozen": optax.set_to_zero()}, labels)


def _state_from(params, tx, dropout_key) -> TrainState:
    zero = jnp.zeros((), jnp.int32)
    return TrainState(
        step=zero,
        params=params,
        opt_state=tx.init(params),
        rng=dropout_key,
        nonfinite_in_a_row=zero,
        nonfinite_total=zero,
    )


def state_shardings(model: OPTForCausalLM, tx, mesh, rules=DEFAULT_RULES) -> tuple[TrainState, TrainState]:
    """(abstract state, shardings), both TrainState trees; nothing is allocated. The optimizer state is
    built from the boxed params, so its moments carry the params' logical names (counters: none, so
    replicated)."""
    boxed = abstract_params(model)
    boxed_state = jax.eval_shape(lambda: _state_from(boxed, tx, jax.random.PRNGKey(0)))
    return nn.meta.unbox(boxed_state), logical_shardings(boxed_state, mesh, rules)


def create_train_state(
    model: OPTForCausalLM, tx, mesh, seed: int, params=None, rules=DEFAULT_RULES
) -> tuple[TrainState, TrainState]:
    """(state, shardings). Random params (seed) unless `params` is given; either way every array is
    created in its shards by one jitted init (a 30B model is never whole on one device)."""
    _, shardings = state_shardings(model, tx, mesh, rules)
    init_key, dropout_key = jax.random.split(jax.random.PRNGKey(seed))
    with on_mesh(mesh, rules):
        if params is None:
            sample = jnp.ones((1, 8), jnp.int32)
            init = jax.jit(
                lambda k, d: _state_from(nn.meta.unbox(model.init(k, sample)["params"]), tx, d),
                out_shardings=shardings,
            )
            state = init(init_key, dropout_key)
        else:
            params = jax.device_put(params, shardings.params)
            init = jax.jit(
                lambda p, d: _state_from(p, tx, d),
                in_shardings=(shardings.params, shardings.rng),
                out_shardings=shardings,
            )
            state = init(params, dropout_key)
    return state, shardings
