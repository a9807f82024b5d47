"""Fine-tuning OPT / OPT-IML: train state, the jitted train and eval steps, and the training loop.

Shaped like flax's lm1b example (`create_train_state`, `train_step`, `eval_step`, `train_and_evaluate`),
with MaxText's sharding: params and optimizer state are created directly in their shards from the
model's logical axis names, and the step is one jitted function with explicit in/out shardings and a
donated state.

Loss. The mean token cross-entropy over every target token of the GLOBAL batch: the sum of CE over
loss_mask divided by the global count of target tokens (metaseq's `sample_size = ntokens`). With
gradient accumulation every microbatch divides by the count of the whole batch, so the summed
gradient is the big-batch gradient and the update does not depend on train.grad_accum_steps.

Determinism. The dropout key of step s is fold_in(base_key, s) (then fold_in(., microbatch)); JAX's
partitionable threefry makes the random bits independent of the mesh, so one device and a pod slice
draw the same masks, and a resumed run the same masks as an uninterrupted one. A checkpoint holds
params, Adam state, step, the base key, the non-finite counters and the data loader position.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from optiml_jax.fileio import barrier
from optiml_jax.config import ConfigError, OPTConfig
from optiml_jax.eval.metrics import ALL_METRICS
from optiml_jax.loss import weighted_head_cross_entropy
from optiml_jax.metrics import MetricsWriter
from optiml_jax.model import OPTForCausalLM, lm_head_weights
from optiml_jax.run_config import OptimSection, RunConfig, TrainSection, resolve_path
from optiml_jax.sharding import DEFAULT_RULES, abstract_params, logical_shardings, make_mesh, replicated

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
BATCH_SPEC = PartitionSpec(("data", "fsdp"), None)  # rows over every data-parallel axis
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


# ---------------------------------------------------------------------- model and optimizer
def build_model(opt_config: OPTConfig, train: TrainSection) -> OPTForCausalLM:
    """The model with the run's dropout, dtypes, scan and remat settings."""
    changes = {}
    if train.dropout is not None:
        changes["dropout"] = train.dropout
    if train.attention_dropout is not None:
        changes["attention_dropout"] = train.attention_dropout
    config = opt_config.replace(**changes) if changes else opt_config
    return OPTForCausalLM(config, dtype=DTYPES[train.compute_dtype], param_dtype=DTYPES[train.param_dtype],
                          scan_layers=train.scan_layers, remat_policy=train.remat_policy,
                          embed_dropout=config.dropout if train.embed_dropout else 0.0)


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
    under scan_layers a bias is [layers, d] and its rank says nothing)."""
    def decays(path, _):
        name = getattr(path[-1], "key", str(path[-1]))
        return name not in NO_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim: OptimSection, max_steps: int) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay, float32 moments) after global-norm clipping."""
    adamw = optax.adamw(learning_rate_schedule(optim, max_steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                        weight_decay=optim.weight_decay, mask=weight_decay_mask, mu_dtype=jnp.float32)
    if optim.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optim.clip_norm), adamw)
    return adamw


# ---------------------------------------------------------------------- sharded state
def _opt_state_shardings(opt_abstract, params_abstract, param_shardings, mesh):
    """Every params-shaped subtree of the optimizer state (Adam mu, nu) is sharded like the params;
    the rest (step counters) is replicated."""
    params_def = jax.tree.structure(params_abstract)
    return jax.tree.map(lambda node: param_shardings if jax.tree.structure(node) == params_def
                        else replicated(mesh),
                        opt_abstract, is_leaf=lambda node: jax.tree.structure(node) == params_def)


def state_shardings(model: OPTForCausalLM, tx, mesh, rules=DEFAULT_RULES) -> tuple[TrainState, TrainState]:
    """(abstract state, shardings), both TrainState trees; nothing is allocated."""
    boxed = abstract_params(model)
    param_shardings = logical_shardings(boxed, mesh, rules)
    params_abstract = nn.meta.unbox(boxed)
    opt_abstract = jax.eval_shape(tx.init, params_abstract)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    abstract = TrainState(step=scalar, params=params_abstract, opt_state=opt_abstract,
                          rng=jax.eval_shape(lambda: jax.random.PRNGKey(0)),
                          nonfinite_in_a_row=scalar, nonfinite_total=scalar)
    repl = replicated(mesh)
    shardings = TrainState(step=repl, params=param_shardings,
                           opt_state=_opt_state_shardings(opt_abstract, params_abstract, param_shardings, mesh),
                           rng=repl, nonfinite_in_a_row=repl, nonfinite_total=repl)
    return abstract, shardings


def create_train_state(model: OPTForCausalLM, tx, mesh, seed: int, params=None,
                       rules=DEFAULT_RULES) -> tuple[TrainState, TrainState]:
    """(state, shardings). Random params (seed) unless `params` is given; either way every array is
    created in its shards by one jitted init (a 30B model is never whole on one device)."""
    _, shardings = state_shardings(model, tx, mesh, rules)
    init_key, dropout_key = jax.random.split(jax.random.PRNGKey(seed))
    zero = jnp.zeros((), jnp.int32)

    def state_from(params, dropout_key):
        return TrainState(step=zero, params=params, opt_state=tx.init(params), rng=dropout_key,
                          nonfinite_in_a_row=zero, nonfinite_total=zero)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        if params is None:
            sample = jnp.ones((1, 8), jnp.int32)
            init = jax.jit(lambda k, d: state_from(nn.meta.unbox(model.init(k, sample)["params"]), d),
                           out_shardings=shardings)
            state = init(init_key, dropout_key)
        else:
            params = jax.device_put(params, shardings.params)
            init = jax.jit(state_from, in_shardings=(shardings.params, shardings.rng), out_shardings=shardings)
            state = init(params, dropout_key)
    return state, shardings


# ---------------------------------------------------------------------- steps
def lm_loss(model, params, batch, weights, deterministic, dropout_key=None, head_positions="weighted"):
    """sum(weights * token CE) over the batch, the LM head fused with the loss and run only where
    weights != 0 unless head_positions="all" (see loss.py)."""
    rngs = None if deterministic else {"dropout": dropout_key}
    hidden = model.apply({"params": params}, batch["input_ids"], position_ids=batch["positions"],
                         segment_ids=batch["segment_ids"], deterministic=deterministic, rngs=rngs,
                         return_hidden=True)
    return weighted_head_cross_entropy(hidden, lm_head_weights(model.config, params), batch["targets"], weights,
                                       positions=head_positions)


def make_train_step(model, tx, train: TrainSection, optim: OptimSection, mesh, shardings: TrainState,
                    rules=DEFAULT_RULES):
    """The jitted `train_step(state, batch) -> (state, metrics)`; the input state is donated."""
    accum = train.grad_accum_steps
    schedule = learning_rate_schedule(optim, train.max_steps)
    micro_spec = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"), None))

    def train_step(state: TrainState, batch: dict):
        step_key = jax.random.fold_in(state.rng, state.step)
        total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)

        def loss_fn(params, microbatch, index):
            # Weighted by the whole batch's count of target tokens: the microbatch losses add up.
            return lm_loss(model, params, microbatch, microbatch["loss_mask"] / total_tokens, False,
                           jax.random.fold_in(step_key, index), train.head_positions)

        grad_fn = jax.value_and_grad(loss_fn)
        if accum == 1:
            loss, grads = grad_fn(state.params, batch, 0)
        else:
            def split(x):  # microbatch a = rows a, a+A, a+2A...: each stays spread over every device
                b, s = x.shape
                x = jnp.swapaxes(x.reshape(b // accum, accum, s), 0, 1)
                return jax.lax.with_sharding_constraint(x, micro_spec)

            microbatches = jax.tree.map(split, batch)

            def body(carry, xs):
                loss_sum, grad_sum = carry
                index, microbatch = xs
                loss, grads = grad_fn(state.params, microbatch, index)
                grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
                grad_sum = jax.lax.with_sharding_constraint(grad_sum, shardings.params)
                return (loss_sum + loss, grad_sum), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                            (jnp.arange(accum), microbatches))
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(operands):
            params, opt_state, grads = operands
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        # A non-finite loss or gradient leaves params and Adam state untouched (and is counted). A cond,
        # not a select of old and new trees: that select read and wrote params and both Adam moments once
        # more (0.77 s vs 0.36 s for the update of the 125m shape on CPU).
        params, opt_state = jax.lax.cond(finite, update, lambda operands: operands[:2],
                                         (state.params, state.opt_state, grads))
        bad = (~finite).astype(jnp.int32)
        applied = state.step - state.nonfinite_total  # the optimizer's own count of applied updates
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng,
                               nonfinite_in_a_row=(state.nonfinite_in_a_row + bad) * bad,
                               nonfinite_total=state.nonfinite_total + bad)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(applied), "target_tokens": total_tokens,
                   "nonfinite": bad, "nonfinite_in_a_row": new_state.nonfinite_in_a_row,
                   "nonfinite_total": new_state.nonfinite_total}
        return new_state, metrics

    batch_shardings = {key: NamedSharding(mesh, BATCH_SPEC) for key in
                       ("input_ids", "targets", "loss_mask", "segment_ids", "positions")}
    jitted = jax.jit(train_step, in_shardings=(shardings, batch_shardings),
                     out_shardings=(shardings, replicated(mesh)), donate_argnums=(0,))

    def run(state, batch):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted(state, batch)

    def lower(state, batch):  # (abstract) state and batch -> jax.stages.Lowered, e.g. for memory_analysis()
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted.lower(state, batch)

    run.lower = lower
    return run


def make_eval_step(model, mesh, param_shardings, rules=DEFAULT_RULES):
    """The jitted `eval_step(params, batch) -> (sum of CE over target tokens, number of target tokens)`."""
    def eval_step(params, batch):
        return lm_loss(model, params, batch, batch["loss_mask"], True), jnp.sum(batch["loss_mask"])

    batch_shardings = {key: NamedSharding(mesh, BATCH_SPEC) for key in
                       ("input_ids", "targets", "loss_mask", "segment_ids", "positions")}
    jitted = jax.jit(eval_step, in_shardings=(param_shardings, batch_shardings), out_shardings=replicated(mesh))

    def run(params, batch):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted(params, batch)

    return run


def global_batch(local_batch: dict, mesh, global_batch_size: int) -> dict:
    """Global arrays from this process's rows (each host reads only its share of the batch)."""
    sharding = NamedSharding(mesh, BATCH_SPEC)
    return {key: jax.make_array_from_process_local_data(sharding, value, (global_batch_size,) + value.shape[1:])
            for key, value in local_batch.items()}


def evaluate(eval_step, params, loader, mesh, batch_size: int, max_batches: int = 0) -> dict:
    """Mean CE over every target token of the eval set (or its first max_batches batches)."""
    ce_sum, count, batches = 0.0, 0.0, 0
    for local in loader:
        ce, n = eval_step(params, global_batch(local, mesh, batch_size))
        ce_sum, count, batches = ce_sum + float(ce), count + float(n), batches + 1
        if max_batches and batches >= max_batches:
            break
    loss = ce_sum / max(count, 1.0)
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)), "eval/target_tokens": count}


def evaluate_tasks(model, params, tokenizer, task_eval, mesh, rules, workdir: Path, step: int, writer) -> dict:
    """eval.tasks at `step`: answers generated or ranked and scored by optiml_jax.eval, logged as scalars and written to
    workdir/eval/<step>/ (predictions.jsonl, metrics.json, report.md) by process 0."""
    from optiml_jax.eval.runner import evaluate, metric_scalars, write_results

    tasks, settings = task_eval
    outcome = evaluate(model, params, tokenizer, tasks, settings, mesh=mesh, rules=rules)
    outcome.metrics["settings"]["step"] = step
    writer.write(step, metric_scalars(outcome.metrics))
    if jax.process_index() == 0:
        write_results(workdir / "eval" / str(step), outcome, overwrite=True, title=f"Held-out tasks at step {step}")
    return outcome.metrics


# ---------------------------------------------------------------------- throughput accounting
def flops_per_token(config: OPTConfig, seq_len: int) -> dict:
    """Model FLOPs per trained token (forward + backward = 3 x forward, no remat counted):
    6 N_nonembedding (weight matmuls) + 6 d V (the tied LM head) + 12 L S d (attention scores and
    values, the labelled "attention" term)."""
    dense = 6 * config.num_params(include_embeddings=False)
    head = 6 * config.word_embed_proj_dim * config.vocab_size
    attention = 12 * config.num_hidden_layers * seq_len * config.hidden_size
    return {"dense": dense, "lm_head": head, "attention": attention, "total": dense + head + attention}


def measure_matmul_peak(dtype=jnp.float32, size: int = 2048, repeats: int = 5, device=None) -> float:
    """FLOP/s of a large square matmul on one device: the roofline MFU is measured against."""
    device = device or jax.local_devices()[0]
    a = jax.device_put(jnp.ones((size, size), dtype), device)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


# ---------------------------------------------------------------------- checkpoints
def checkpoint_manager(workdir: str, keep: int, async_save: bool):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


def save_checkpoint(manager, state: TrainState, data_state: dict, force: bool = False) -> None:
    import orbax.checkpoint as ocp

    step = int(jax.device_get(state.step))
    if manager.latest_step() == step:
        return
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
                 force=force)


def _all_processes_agree(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def restore_checkpoint(manager, abstract: TrainState, shardings: TrainState) -> tuple[TrainState, dict]:
    """The latest READABLE checkpoint, restored straight into its shards, and the saved data loader state.

    Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it when complete, so a step
    being written when the process died is never listed. A listed step that cannot be read (a truncated
    or deleted array file, a disk error) is reported by a warning naming it, moved to
    `<workdir>/checkpoints_corrupt/<step>` (so that the step can be written again), and the previous
    one is used.
    """
    import orbax.checkpoint as ocp

    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    directory = Path(str(manager.directory))
    bad = []
    try:
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                         data=ocp.args.JsonRestore()))
                ok = isinstance(restored["data"], dict)
                error = None if ok else "no data loader state"
            except Exception as e:  # orbax / tensorstore raise many types for unreadable data
                ok, error = False, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            if _all_processes_agree(ok):
                return restored["state"], restored["data"]
            log.warning("checkpoint %s is unreadable or incomplete (%s); falling back to the previous checkpoint",
                        directory / str(step), error or "unreadable on another process")
            bad.append(step)
        raise TrainingError(f"no readable checkpoint in {directory} (tried steps {bad}); fix or remove them, or "
                            f"pass --overwrite to start afresh")
    finally:
        if bad:
            _quarantine(directory, bad)
            manager.reload()


def _quarantine(directory: Path, steps) -> None:
    if jax.process_index() == 0:
        import shutil

        target_root = directory.parent / "checkpoints_corrupt"
        target_root.mkdir(parents=True, exist_ok=True)
        for step in steps:
            target = target_root / f"{step}-{int(time.time())}"
            shutil.move(str(directory / str(step)), str(target))
            log.warning("moved the unreadable checkpoint %s to %s", directory / str(step), target)
    barrier("optiml_jax:quarantine")


def _has_checkpoints(workdir: Path) -> bool:
    directory = workdir / "checkpoints"
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def prepare_workdir(cfg: RunConfig, workdir: Path, overwrite: bool) -> None:
    """Refuses to resume under a config that changes the result (ConfigError listing the keys) unless
    `overwrite`, which clears the old run (checkpoints, metrics, TensorBoard, final model); then saves
    the resolved config as workdir/config.yaml. Every process checks; process 0 writes."""
    import shutil

    import yaml

    from optiml_jax.run_config import resume_conflicts

    is_main = jax.process_index() == 0
    saved_path = workdir / "config.yaml"
    if overwrite:
        if is_main:
            for name in ("checkpoints", "checkpoints_corrupt", "tensorboard", "final"):
                shutil.rmtree(workdir / name, ignore_errors=True)
            for name in ("metrics.jsonl", "config.yaml"):
                (workdir / name).unlink(missing_ok=True)
        barrier("optiml_jax:overwrite")
    elif _has_checkpoints(workdir):
        if saved_path.is_file():
            try:
                saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{saved_path}: not valid YAML ({str(e).splitlines()[0]}); pass --overwrite to "
                                  f"start afresh") from None
            conflicts = resume_conflicts(saved, cfg.to_dict())
            if conflicts:
                raise ConfigError(f"{workdir} holds checkpoints of a run with a different config ("
                                  f"{'; '.join(conflicts)}): resuming would not give the same result; restore those "
                                  f"settings, use another workdir, or pass --overwrite to start afresh")
        else:
            log.warning("%s has checkpoints but no config.yaml: cannot check that they match this config", workdir)
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = saved_path.with_name("config.yaml.tmp")
        tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
        os.replace(tmp, saved_path)
    barrier("optiml_jax:prepare_workdir")


def memory_limit_bytes(cfg: RunConfig, mesh) -> Optional[int]:
    """OPTIML_JAX_MEMORY_LIMIT_GIB, else train.memory_limit_gib, else what one local device of the mesh has."""
    from optiml_jax.memory import GiB, device_memory_bytes

    env = os.environ.get("OPTIML_JAX_MEMORY_LIMIT_GIB")
    if env:
        try:
            return int(float(env) * GiB)
        except ValueError:
            raise ConfigError(f"OPTIML_JAX_MEMORY_LIMIT_GIB={env!r} is not a number") from None
    if cfg.train.memory_limit_gib > 0:
        return int(cfg.train.memory_limit_gib * GiB)
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    return device_memory_bytes(local[0] if local else None)


def check_memory(cfg: RunConfig, opt_config: OPTConfig, mesh, rules=DEFAULT_RULES):
    """Prints the per-device estimate (process 0) and raises InsufficientMemoryError when it cannot fit;
    called before anything is allocated or compiled."""
    from optiml_jax.memory import GiB, check_fits, estimate_training_memory

    t = cfg.train
    estimate = estimate_training_memory(opt_config, mesh_shape=dict(mesh.shape), global_batch=t.batch_size,
                                        seq_len=t.seq_len, grad_accum_steps=t.grad_accum_steps,
                                        remat_policy=t.remat_policy, compute_dtype=t.compute_dtype,
                                        param_dtype=t.param_dtype, rules=rules, scan_layers=t.scan_layers)
    available = memory_limit_bytes(cfg, mesh)
    if jax.process_index() == 0:
        limit = f"{available / GiB:.3f} GiB per device available" if available else "device memory unknown"
        log.info("%s\n  (%s)", estimate.table(), limit)
    check_fits(estimate, available)
    return estimate


# ---------------------------------------------------------------------- the loop
@dataclasses.dataclass
class RunResult:
    """What `train_and_evaluate` did: for the CLI's summary and for tests."""
    step: int
    state: TrainState
    model: OPTForCausalLM
    losses: dict  # step -> train loss (steps of this invocation)
    eval_losses: dict  # step -> eval loss
    task_metrics: dict = dataclasses.field(default_factory=dict)  # step -> metrics.json of eval.tasks
    interrupted: bool = False
    final_dir: Optional[str] = None
    samples: list = dataclasses.field(default_factory=list)


class _Interrupt:
    """SIGTERM (a preemption, `kill`) sets a flag; the loop saves a checkpoint and stops at the next step.

    With several processes the notice may reach one host only: JAX's preemption sync manager (started by
    jax.distributed.initialize) catches SIGTERM on any host and `reached_preemption_sync_point(step)`
    becomes true on every host at the same step, where all of them save and stop."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        # Several processes: JAX's preemption service owns SIGTERM (reached_preemption_sync_point).
        if threading_is_main() and jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM: saving a checkpoint and stopping after this step")
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # the preemption service is disabled
                return False
        return self.requested

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def load_model_and_tokenizer(cfg: RunConfig, mesh, rules=DEFAULT_RULES, load_weights: bool = True):
    """(OPTConfig, params or None, tokenizer) for cfg.model: `preset:NAME` (random init later) or a
    checkpoint directory / hub id (params loaded into their shards unless load_weights is False)."""
    from optiml_jax.tokenizer import OPTTokenizer

    params, tokenizer = None, None
    if cfg.model.startswith("preset:"):
        name = cfg.model[len("preset:"):]
        opt_config = OPTConfig.from_preset(resolve_path(name) if name.endswith((".yaml", ".yml", ".json")) else name)
    elif load_weights:
        from optiml_jax.checkpoints.pretrained import load_pretrained

        loaded = load_pretrained(resolve_path(cfg.model), dtype=cfg.train.param_dtype, scan_layers=cfg.train.scan_layers,
                                 mesh=mesh, rules=rules, load_tokenizer=cfg.tokenizer is None)
        opt_config, params, tokenizer = loaded.config, loaded.params, loaded.tokenizer
    else:  # resuming: the architecture only; the weights come from the run's checkpoint
        from optiml_jax.checkpoints.pretrained import resolve_model_path

        path = resolve_model_path(resolve_path(cfg.model))
        opt_config = OPTConfig.from_json_file(path / "config.json")
        if cfg.tokenizer is None:
            tokenizer = OPTTokenizer.from_pretrained(path)
    if cfg.tokenizer is not None:
        tokenizer = OPTTokenizer.from_pretrained(resolve_path(cfg.tokenizer))
    if tokenizer is None:
        raise ConfigError(f"tokenizer is not set and {cfg.model} has no tokenizer files")
    if tokenizer.vocab_size > opt_config.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                          f"{opt_config.vocab_size}")
    return opt_config, params, tokenizer


def _data_config_resolved(cfg: RunConfig):
    def fix(value):
        if value is None:
            return None
        if isinstance(value, tuple):
            return tuple(resolve_path(v) for v in value)
        return resolve_path(value)

    data = cfg.data
    return dataclasses.replace(data, train=fix(data.train), eval=fix(data.eval), train_tasks=fix(data.train_tasks),
                               eval_tasks=fix(data.eval_tasks))


def _check_batch_layout(cfg: RunConfig, mesh) -> None:
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = cfg.train.batch_size // cfg.train.grad_accum_steps
    if micro % data_parallel:
        raise ConfigError(f"train.batch_size / train.grad_accum_steps = {micro} sequences per microbatch is not "
                          f"divisible by the data-parallel devices (mesh.data x mesh.fsdp = {data_parallel})")
    eval_batch = cfg.eval.batch_size or cfg.train.batch_size
    if eval_batch % data_parallel:
        raise ConfigError(f"eval batch size {eval_batch} is not divisible by mesh.data x mesh.fsdp = {data_parallel}")
    tasks_batch = cfg.eval.tasks.batch_size if cfg.eval.tasks is not None else None
    if tasks_batch and tasks_batch % data_parallel:
        raise ConfigError(f"eval.tasks.batch_size={tasks_batch} is not divisible by mesh.data x mesh.fsdp = "
                          f"{data_parallel}")
    if cfg.train.batch_size % jax.process_count():
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by the {jax.process_count()} "
                          f"processes")


def train_and_evaluate(cfg: RunConfig, *, devices=None, rules=DEFAULT_RULES, progress: bool = True,
                       stop_after_steps: Optional[int] = None, overwrite: bool = False) -> RunResult:
    """Runs (or resumes, when cfg.workdir has a checkpoint) the fine-tuning job described by `cfg`.

    Start-up, before anything is allocated or compiled: the workdir's saved config is compared with
    `cfg` (ConfigError listing the keys that would change the result; `overwrite` clears the old run
    instead), `cfg` is saved as workdir/config.yaml, and the per-device memory estimate is printed and
    checked (InsufficientMemoryError when it cannot fit).

    stop_after_steps: return after that many steps of this invocation, as a preemption would (saving
    a checkpoint first); for tests of exact resume.
    """
    from optiml_jax.data import build_loaders

    workdir = Path(cfg.workdir)
    is_main = jax.process_index() == 0
    mesh = make_mesh(cfg.mesh, devices=devices)
    _check_batch_layout(cfg, mesh)
    prepare_workdir(cfg, workdir, overwrite)
    manager = checkpoint_manager(str(workdir), cfg.checkpoint.keep, cfg.checkpoint.async_save)
    try:
        return _train(cfg, workdir, is_main, mesh, manager, rules, progress, stop_after_steps, build_loaders)
    finally:
        try:
            manager.wait_until_finished()
        finally:
            manager.close()


def _train(cfg, workdir, is_main, mesh, manager, rules, progress, stop_after_steps, build_loaders) -> RunResult:
    resuming = manager.latest_step() is not None
    preset = cfg.model.startswith("preset:")
    # The architecture and tokenizer first (no weights): the memory check comes before any allocation.
    opt_config, _, tokenizer = load_model_and_tokenizer(cfg, mesh, rules, load_weights=False)
    if cfg.train.seq_len > opt_config.max_position_embeddings:
        raise ConfigError(f"train.seq_len={cfg.train.seq_len} exceeds the model's max_position_embeddings="
                          f"{opt_config.max_position_embeddings}")
    check_memory(cfg, opt_config, mesh, rules)
    params = None
    if not resuming and not preset:
        opt_config, params, tokenizer = load_model_and_tokenizer(cfg, mesh, rules, load_weights=True)
    model = build_model(opt_config, cfg.train)
    tx = make_optimizer(cfg.optim, cfg.train.max_steps)
    data_cfg = _data_config_resolved(cfg)
    eval_batch_size = cfg.eval.batch_size or cfg.train.batch_size
    loader, eval_loader = build_loaders(data_cfg, tokenizer, seed=cfg.seed, batch_size=cfg.train.batch_size,
                                        eval_batch_size=eval_batch_size, seq_len=cfg.train.seq_len)
    task_eval = None
    if cfg.eval.tasks is not None:
        from optiml_jax.eval.runner import settings_from_config, tasks_from_config

        task_eval = (tasks_from_config(cfg.eval.tasks, eval_loader.tasks if eval_loader else None, resolve_path),
                     settings_from_config(cfg.eval.tasks, eval_batch_size))
    skipped = {k: v for k, v in loader.skip_stats.as_dict().items() if v}
    if skipped and is_main:
        log.warning("training data: skipped %s (data.on_error=%s; the counts are logged as data/skipped/* in "
                    "metrics)", skipped, cfg.data.on_error)

    if resuming:
        abstract, shardings = state_shardings(model, tx, mesh, rules)
        state, data_state = restore_checkpoint(manager, abstract, shardings)
        loader.set_state(data_state)
        log.info("resumed from %s at step %d", workdir / "checkpoints", int(state.step))
    else:
        state, shardings = create_train_state(model, tx, mesh, cfg.seed, params=params, rules=rules)
        del params
    train_step = make_train_step(model, tx, cfg.train, cfg.optim, mesh, shardings, rules)
    eval_step = make_eval_step(model, mesh, shardings.params, rules)

    start_step = int(jax.device_get(state.step))
    # Lines the dead run logged after its last checkpoint go; at start_step only the train line stays
    # (evaluation at start_step, when due, runs again below).
    writer = MetricsWriter(workdir, enabled=is_main, resume_step=start_step,
                           keep=lambda record: any(k.startswith("train/") for k in record))
    flops = flops_per_token(opt_config, cfg.train.seq_len)
    peak = cfg.train.peak_flops_per_device or measure_matmul_peak(DTYPES[cfg.train.compute_dtype])
    peak_total = peak * mesh.size
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    if is_main:
        log.info("model: %s parameters (%s without embeddings); %.3g FLOPs/token (attention %.3g); peak %.3g "
                 "FLOP/s per device", f"{opt_config.num_params():,}",
                 f"{opt_config.num_params(include_embeddings=False):,}", flops["total"], flops["attention"], peak)

    max_steps = cfg.train.max_steps
    end_step = max_steps if stop_after_steps is None else min(max_steps, start_step + stop_after_steps)
    result = RunResult(step=start_step, state=state, model=model, losses={}, eval_losses={})

    def run_eval(step):
        if eval_loader is not None:
            scalars = evaluate(eval_step, state.params, eval_loader, mesh, eval_batch_size, cfg.eval.max_batches)
            result.eval_losses[step] = scalars["eval/loss"]
            writer.write(step, scalars)
            report(f"step {step}: eval loss {scalars['eval/loss']:.4f}")
        if task_eval is not None:
            result.task_metrics[step] = evaluate_tasks(model, state.params, tokenizer, task_eval, mesh, rules,
                                                       workdir, step, writer)
            overall = result.task_metrics[step]["overall"]
            figures = ", ".join(f"{name} {overall[name]:.2f}" for name in ALL_METRICS if name in overall)
            report(f"step {step}: held-out tasks {figures} ({overall['instances']} instances)")

    def report(line):
        if is_main:
            log.info("%s", line)
            if bar is not None:
                bar.write(line)

    bar = None
    if progress and is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
    if ((eval_loader is not None or task_eval is not None) and cfg.eval.every_steps and start_step < max_steps
            and start_step % cfg.eval.every_steps == 0):
        run_eval(start_step)

    pending = None  # (step, metrics on device): read one step late so the host never stalls the device
    window = {"loss": [], "time": time.perf_counter(), "steps": 0}
    health = {"nonfinite_in_a_row": int(jax.device_get(state.nonfinite_in_a_row))}

    def drain(pending_item):
        step, metrics = pending_item
        m = jax.device_get(metrics)
        loss = float(m["loss"])
        result.losses[step] = loss
        health["nonfinite_in_a_row"] = int(m["nonfinite_in_a_row"])
        window["loss"].append(loss)
        window["steps"] += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if step % cfg.train.log_every_steps == 0 or step == max_steps or int(m["nonfinite"]):
            now = time.perf_counter()
            elapsed = now - window["time"]
            tokens_per_s = tokens_per_step * window["steps"] / elapsed if elapsed > 0 else 0.0
            scalars = {"train/loss": float(np.mean(window["loss"])), "train/step_loss": loss,
                       "train/lr": float(m["lr"]), "train/grad_norm": float(m["grad_norm"]),
                       "train/tokens_per_s": tokens_per_s,
                       "train/mfu": tokens_per_s * flops["total"] / peak_total,
                       "train/target_tokens": float(m["target_tokens"]),
                       "train/nonfinite": int(m["nonfinite"]),
                       "train/nonfinite_in_a_row": int(m["nonfinite_in_a_row"]),
                       "train/nonfinite_total": int(m["nonfinite_total"])}
            scalars.update({f"data/{k}": v for k, v in loader.stats().items()})
            writer.write(step, scalars)
            window.update(loss=[], time=now, steps=0)
        if int(m["nonfinite_in_a_row"]) >= cfg.train.max_nonfinite_in_a_row:
            raise TrainingError(f"step {step}: {int(m['nonfinite_in_a_row'])} non-finite losses or gradients in a "
                                f"row (train.max_nonfinite_in_a_row={cfg.train.max_nonfinite_in_a_row}); stopping")

    def checkpoint(force=False):
        """Saves unless the state is inside a run of non-finite steps (the last good checkpoint stays)."""
        if health["nonfinite_in_a_row"]:
            log.warning("step %d: not checkpointing during %d non-finite step(s) in a row", int(state.step),
                        health["nonfinite_in_a_row"])
            return
        save_checkpoint(manager, state, loader.get_state(), force=force)

    interrupted = False
    with _Interrupt() as interrupt:
        try:
            for step in range(start_step, end_step):
                batch = global_batch(next(loader), mesh, cfg.train.batch_size)
                state, metrics = train_step(state, batch)
                if pending is not None:
                    drain(pending)
                else:  # the first step's time is mostly compilation: do not count it in tokens/s
                    jax.block_until_ready(metrics)
                    window["time"] = time.perf_counter()
                    window["steps"] = -1
                pending = (step + 1, metrics)
                done = step + 1
                if cfg.checkpoint.every_steps and done % cfg.checkpoint.every_steps == 0 and done < max_steps:
                    drain(pending)  # the metrics line of a step is written before its checkpoint
                    pending = None
                    checkpoint()
                if cfg.eval.every_steps and done % cfg.eval.every_steps == 0 and done < max_steps:
                    if pending is not None:
                        drain(pending)
                        pending = None
                    run_eval(done)
                    window["time"] = time.perf_counter()
                if interrupt.should_stop(done):
                    interrupted = True
                    break
            if pending is not None:
                drain(pending)
                pending = None
        except TrainingError as e:
            manager.wait_until_finished()
            writer.close()
            latest = manager.latest_step()
            where = (f"the last good checkpoint is {workdir / 'checkpoints' / str(latest)}" if latest is not None
                     else "no checkpoint was written")
            raise TrainingError(f"{e}; {where}") from None
        finally:
            if bar is not None:
                bar.close()
    done = int(jax.device_get(state.step))
    result.step, result.state = done, state
    if done < max_steps:  # preempted or stopped early: keep the position for the next invocation
        result.interrupted = interrupted or stop_after_steps is not None
        checkpoint(force=True)
        manager.wait_until_finished()
        writer.close()
        if interrupted and is_main:
            log.warning("stopped at step %d (preemption / SIGTERM); checkpoint saved", done)
        return result

    run_eval(done)
    checkpoint(force=True)
    manager.wait_until_finished()
    data_stats = loader.stats()  # collective with several processes: every process asks
    if is_main:
        log.info("data: %s", data_stats)
    writer.write(done, {f"data/{k}": v for k, v in data_stats.items()})
    writer.close()
    if cfg.checkpoint.save_final:
        result.final_dir = save_final_model(workdir / "final", opt_config, state.params, tokenizer)
        if done in result.task_metrics and is_main:  # the model's scores travel with it
            from optiml_jax.eval.runner import METRICS_FILE

            final_metrics = workdir / "eval" / str(done) / METRICS_FILE
            tmp = workdir / "final" / f".{METRICS_FILE}.tmp"
            shutil.copyfile(final_metrics, tmp)
            os.replace(tmp, workdir / "final" / METRICS_FILE)
    if cfg.eval.num_samples and eval_loader is not None:
        if jax.process_count() > 1:
            log.info("eval.num_samples: greedy samples are only generated on a single process")
        else:
            result.samples = sample_heldout(model, state.params, tokenizer, eval_loader, cfg.eval)
    return result


def save_final_model(directory: Path, opt_config: OPTConfig, params, tokenizer) -> Optional[str]:
    """The trained model in our converted format (config.json + tokenizer + Orbax params)."""
    from optiml_jax.checkpoints import model_format as checkpoint

    save_model = getattr(checkpoint, "save_model", None)
    if save_model is None:
        log.warning("optiml_jax.checkpoints.model_format.save_model is not available yet: the final model is only in the "
                    "run's training checkpoints")
        return None
    save_model(directory, opt_config, params, tokenizer, overwrite=True)
    return str(directory)


def sample_heldout(model, params, tokenizer, eval_loader, eval_cfg) -> list[tuple[str, str, str]]:
    """(prompt, reference, greedy generation) for the first example of the first few eval tasks, by the
    KV-cache decoder of optiml_jax.generate (one batch; prompts cut from the left to fit the positions)."""
    from optiml_jax.generate import complete_texts, generate

    max_new = eval_cfg.sample_max_new_tokens
    room = model.config.max_position_embeddings - max_new
    examples = [examples[0] for examples in list(eval_loader.tasks.values())[:eval_cfg.num_samples] if examples]
    prompts = [(e, tokenizer.encode(e.src.rstrip(" "), add_bos=False)[-room:]) for e in examples]
    prompts = [(e, ids) for e, ids in prompts if ids]
    if not prompts or room < 1:
        return []
    # Remat only matters for gradients; decoding runs the plain layers.
    decoder = model.clone(remat_policy="none") if model.remat_policy != "none" else model
    out = generate(decoder, params, [ids for _, ids in prompts], max_new_tokens=max_new,
                   eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    generated = [ids[:-1] if ids and ids[-1] == tokenizer.eos_id else ids for ids in out.token_ids()]
    texts = complete_texts(tokenizer, [ids for _, ids in prompts], generated)
    return [(e.src, e.tgt, text) for (e, _), text in zip(prompts, texts)]
