"""The fine-tuning loop: `train_and_evaluate(cfg)` runs (or resumes) the job a RunConfig describes.

Shaped like flax's lm1b example: set up (model, data, sharded state, jitted steps), then the steps, with
the hooks (train/hooks.py: metrics lines, checkpoints, evaluations, the final model, samples) at their
cadences. Metrics are read one step late, so the host never stalls the device; SIGTERM or Ctrl-C saves a
checkpoint and stops at the next step (train/interrupt.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Optional

import jax
from tqdm.auto import tqdm

from optiml_jax.checkpoints.pretrained import load_pretrained
from optiml_jax.config import ConfigError, OPTConfig
from optiml_jax.data import build_loaders
from optiml_jax.eval.runner import settings_from_config, tasks_from_config
from optiml_jax.paths import is_preset, preset_config, resolve_model_path, resolve_path
from optiml_jax.run_config import RunConfig
from optiml_jax.sharding import DEFAULT_RULES, make_mesh
from optiml_jax.tokenizer import OPTTokenizer
from optiml_jax.train.checkpointing import checkpoint_manager, prepare_workdir, restore_checkpoint
from optiml_jax.train.context import Run, RunResult
from optiml_jax.train.hooks import Hooks
from optiml_jax.train.interrupt import StopRequest
from optiml_jax.train.memory import check_memory
from optiml_jax.train.metrics_log import MetricsWriter
from optiml_jax.train.run_hooks import default_hooks, sample_heldout
from optiml_jax.train.state import (
    TrainingError,
    build_model,
    create_train_state,
    make_optimizer,
    state_shardings,
)
from optiml_jax.train.steps import global_batch, make_eval_step, make_train_step
from optiml_jax.train.suite_hook import check_suite
from optiml_jax.train.throughput import run_throughput
from optiml_jax.train.trainable import Trainable

__all__ = ["RunResult", "load_model_and_tokenizer", "sample_heldout", "train_and_evaluate"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- set-up
def load_model_and_tokenizer(cfg: RunConfig, mesh, rules=DEFAULT_RULES, load_weights: bool = True):
    """(OPTConfig, params or None, tokenizer) for cfg.model: `preset:NAME` (random init later) or a
    checkpoint directory / hub id (params loaded into their shards unless load_weights is False)."""
    params, tokenizer = None, None
    if is_preset(cfg.model):
        opt_config = preset_config(cfg.model)
    elif load_weights:
        loaded = load_pretrained(
            resolve_path(cfg.model),
            dtype=cfg.train.param_dtype,
            scan_layers=cfg.train.scan_layers,
            mesh=mesh,
            rules=rules,
            load_tokenizer=cfg.tokenizer is None,
        )
        opt_config, params, tokenizer = loaded.config, loaded.params, loaded.tokenizer
    else:  # resuming: the architecture only; the weights come from the run's checkpoint
        path = resolve_model_path(cfg.model)
        opt_config = OPTConfig.from_json_file(path / "config.json")
        if cfg.tokenizer is None:
            tokenizer = OPTTokenizer.from_pretrained(path)
    if cfg.tokenizer is not None:
        tokenizer = OPTTokenizer.from_pretrained(resolve_path(cfg.tokenizer))
    if tokenizer is None:
        raise ConfigError(f"tokenizer is not set and {cfg.model} has no tokenizer files")
    if tokenizer.vocab_size > opt_config.vocab_size:
        raise ConfigError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{opt_config.vocab_size}"
        )
    return opt_config, params, tokenizer


def _data_config_resolved(cfg: RunConfig):
    def fix(value):
        if value is None:
            return None
        if isinstance(value, tuple):
            return tuple(resolve_path(v) for v in value)
        return resolve_path(value)

    data = cfg.data
    return dataclasses.replace(
        data,
        train=fix(data.train),
        eval=fix(data.eval),
        train_tasks=fix(data.train_tasks),
        eval_tasks=fix(data.eval_tasks),
    )


def _check_batch_layout(cfg: RunConfig, mesh) -> None:
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = cfg.train.batch_size // cfg.train.grad_accum_steps
    if micro % data_parallel:
        raise ConfigError(
            f"train.batch_size / train.grad_accum_steps = {micro} sequences per microbatch is not "
            f"divisible by the data-parallel devices (mesh.data x mesh.fsdp = {data_parallel})"
        )
    eval_batch = cfg.eval_batch_size
    if eval_batch % data_parallel:
        raise ConfigError(
            f"eval batch size {eval_batch} is not divisible by mesh.data x mesh.fsdp = {data_parallel}"
        )
    tasks_batch = cfg.eval.tasks.batch_size if cfg.eval.tasks is not None else None
    if tasks_batch and tasks_batch % data_parallel:
        raise ConfigError(
            f"eval.tasks.batch_size={tasks_batch} is not divisible by mesh.data x mesh.fsdp = {data_parallel}"
        )
    if cfg.train.batch_size % jax.process_count():
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is not divisible by the {jax.process_count()} processes"
        )


def _set_up(cfg: RunConfig, workdir: Path, mesh, manager, rules, trainable: Trainable) -> Run:
    """Model, data, state (restored or created in its shards), jitted steps and the metrics writer."""
    resuming = manager.latest_step() is not None
    # The architecture and tokenizer first (no weights): the memory check comes before any allocation.
    opt_config, _, tokenizer = load_model_and_tokenizer(cfg, mesh, rules, load_weights=False)
    if cfg.train.seq_len > opt_config.max_position_embeddings:
        raise ConfigError(
            f"train.seq_len={cfg.train.seq_len} exceeds the model's max_position_embeddings="
            f"{opt_config.max_position_embeddings}"
        )
    check_memory(cfg.train, opt_config, mesh, rules, trainable)
    params = None
    if not resuming and not is_preset(cfg.model):
        opt_config, params, tokenizer = load_model_and_tokenizer(cfg, mesh, rules, load_weights=True)
    model = build_model(opt_config, cfg.train)
    tx = make_optimizer(cfg.optim, cfg.train.max_steps, trainable)
    loader, eval_loader = build_loaders(
        _data_config_resolved(cfg),
        tokenizer,
        seed=cfg.seed,
        batch_size=cfg.train.batch_size,
        eval_batch_size=cfg.eval_batch_size,
        seq_len=cfg.train.seq_len,
    )
    check_suite(cfg)  # eval.suite's bad entries, before any training step
    task_eval = None
    if cfg.eval.tasks is not None:
        task_eval = (
            tasks_from_config(cfg.eval.tasks, eval_loader.tasks if eval_loader else None, resolve_path),
            settings_from_config(cfg.eval.tasks, cfg.eval_batch_size, cfg.data.add_bos),
        )
    skipped = {k: v for k, v in loader.skip_stats.as_dict().items() if v}
    if skipped and jax.process_index() == 0:
        log.warning(
            "training data: skipped %s (data.on_error=%s; the counts are logged as data/skipped/* in "
            "metrics)",
            skipped,
            cfg.data.on_error,
        )
    if resuming:
        abstract, shardings = state_shardings(model, tx, mesh, rules)
        state, data_state = restore_checkpoint(manager, abstract, shardings)
        loader.set_state(data_state)
        log.info("resumed from %s at step %d", workdir / "checkpoints", int(state.step))
    else:
        state, shardings = create_train_state(model, tx, mesh, cfg.seed, params=params, rules=rules)
    start_step = int(jax.device_get(state.step))
    # Lines the dead run logged after its last checkpoint go; at start_step only the train line stays
    # (evaluation at start_step, when due, runs again).
    writer = MetricsWriter(
        workdir,
        enabled=jax.process_index() == 0,
        resume_step=start_step,
        keep=lambda record: any(k.startswith("train/") for k in record),
    )
    return Run(
        cfg=cfg,
        workdir=workdir,
        mesh=mesh,
        rules=rules,
        manager=manager,
        opt_config=opt_config,
        tokenizer=tokenizer,
        model=model,
        loader=loader,
        eval_loader=eval_loader,
        task_eval=task_eval,
        state=state,
        train_step=make_train_step(model, tx, cfg.train, cfg.optim, mesh, shardings, rules, trainable),
        eval_step=make_eval_step(model, mesh, shardings.params, rules),
        writer=writer,
        result=RunResult(step=start_step, state=state, model=model, losses={}, eval_losses={}),
        throughput=run_throughput(cfg.train, opt_config, mesh.size),
        nonfinite_in_a_row=int(jax.device_get(state.nonfinite_in_a_row)),
    )


# ---------------------------------------------------------------------- the loop
def _record(run: Run, hooks: Hooks, step: int, metrics) -> None:
    """Reads one step's metrics (a step late), runs the hooks that read only them (a non-finite step's
    at once, so it is on record), stops a run of non-finite steps."""
    train = run.cfg.train
    run.metrics = m = jax.device_get(metrics)
    loss = float(m["loss"])
    run.result.losses[step] = loss
    run.nonfinite_in_a_row = int(m["nonfinite_in_a_row"])
    run.window.losses.append(loss)
    run.window.steps += 1
    if run.bar is not None:
        run.bar.update(1)
        run.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
    due = hooks.at_end(reads_state=False) if step == train.max_steps else hooks.every(step, reads_state=False)
    if not due and int(m["nonfinite"]):
        due = [h for h in hooks.hooks if not h.reads_state and (h.every or h.at_end)]
    Hooks.run(due, run, step)
    if run.nonfinite_in_a_row >= train.max_nonfinite_in_a_row:
        raise TrainingError(
            f"step {step}: {run.nonfinite_in_a_row} non-finite losses or gradients in a row "
            f"(train.max_nonfinite_in_a_row={train.max_nonfinite_in_a_row}); stopping"
        )


def _steps(run: Run, hooks: Hooks, stop: StopRequest, start_step: int, end_step: int) -> None:
    """Steps start_step..end_step with the hooks due after each, until `stop` says otherwise."""
    cfg, max_steps = run.cfg, run.cfg.train.max_steps
    run.window.restart()
    pending = None  # (step, metrics on device): read one step late so the host never stalls the device
    for step in range(start_step, end_step):
        batch = global_batch(next(run.loader), run.mesh, cfg.train.batch_size)
        run.state, metrics = run.train_step(run.state, batch)
        if pending is not None:
            _record(run, hooks, *pending)
        else:  # the first step's time is mostly compilation: do not count it in tokens/s
            jax.block_until_ready(metrics)
            run.window.restart(steps=-1)
        pending, done = (step + 1, metrics), step + 1
        due = hooks.every(done, reads_state=True) if done < max_steps else []
        if due:
            _record(run, hooks, *pending)  # a step's metrics line comes before its checkpoint
            pending, started = None, time.perf_counter()
            Hooks.run(due, run, done)
            run.window.exclude(time.perf_counter() - started)
        if stop.should_stop(done):
            break
    if pending is not None:
        _record(run, hooks, *pending)


def _train(run: Run, hooks: Hooks, progress: bool, stop_after_steps: Optional[int]) -> RunResult:
    result, max_steps = run.result, run.cfg.train.max_steps
    start_step = result.step
    end_step = max_steps if stop_after_steps is None else min(max_steps, start_step + stop_after_steps)
    if progress and run.is_main:
        run.bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
    try:
        with StopRequest() as stop:
            Hooks.run(hooks.at_start(start_step), run, start_step)
            _steps(run, hooks, stop, start_step, end_step)
            _end(run, hooks, stop)
    except TrainingError as e:
        run.manager.wait_until_finished()
        run.writer.close()
        latest = run.manager.latest_step()
        where = (
            f"the last good checkpoint is {run.workdir / 'checkpoints' / str(latest)}"
            if latest is not None
            else "no checkpoint was written"
        )
        raise TrainingError(f"{e}; {where}") from None
    finally:
        if run.bar is not None:
            run.bar.close()
            run.bar = None
        run.writer.close()
    return result


def _end(run: Run, hooks: Hooks, stop: StopRequest) -> None:
    """The end hooks at train.max_steps; the preemption hooks when the run stopped before it."""
    result = run.result
    result.step, result.state = int(jax.device_get(run.state.step)), run.state
    if result.step >= run.cfg.train.max_steps:
        Hooks.run(hooks.at_end(), run, result.step)
        return
    result.interrupted = True  # keep the position for the next invocation
    Hooks.run(hooks.on_preemption(), run, result.step)
    if stop.stopped and run.is_main:
        log.warning("stopped at step %d (%s); checkpoint saved", result.step, stop.reason)


def train_and_evaluate(
    cfg: RunConfig,
    *,
    devices=None,
    rules=DEFAULT_RULES,
    progress: bool = True,
    stop_after_steps: Optional[int] = None,
    overwrite: bool = False,
    hooks: Optional[Hooks] = None,
    is_trainable: Trainable = None,
) -> RunResult:
    """Runs (or resumes, when cfg.workdir has a checkpoint) the fine-tuning job described by `cfg`.

    Start-up, before anything is allocated or compiled: the workdir is checked (train/checkpointing.py's
    prepare_workdir: files a run did not write, a saved config that would change the result; `overwrite`
    clears the old run instead), `cfg` is saved as workdir/config.yaml, and the per-device memory
    estimate is printed and checked (InsufficientMemoryError when it cannot fit). A workdir whose run
    already reached train.max_steps is left as it is (RunResult.already_finished).

    hooks: more hooks (train/hooks.py), run after the run's own at each step. is_trainable: a predicate
    on "/"-joined parameter paths, in place of train.trainable (train/trainable.py).
    stop_after_steps: return after that many steps of this invocation, as a preemption would (saving
    a checkpoint first); for tests of exact resume.
    """
    # Absolute from the start: the working directory is process-wide and may change while the run is
    # under way (eval/suite_lm_eval.py changes it while lm_eval runs, a user's hook may too), and what is
    # written then, from this thread or a background one, would follow a relative workdir. abspath, not
    # resolve: messages show the path through the links the user spelled.
    workdir = Path(os.path.abspath(cfg.workdir))
    mesh = make_mesh(cfg.mesh, devices=devices)
    _check_batch_layout(cfg, mesh)
    finished_at = prepare_workdir(workdir, cfg.to_dict(), overwrite)
    if finished_at is not None:
        if jax.process_index() == 0:
            log.warning(
                "%s holds a run that finished at step %d (train.max_steps=%d): nothing to do; raise "
                "train.max_steps to train on, or pass --overwrite to start afresh",
                workdir,
                finished_at,
                cfg.train.max_steps,
            )
        final = workdir / "final"
        return RunResult(
            step=finished_at,
            state=None,
            model=None,
            losses={},
            eval_losses={},
            final_dir=str(final) if final.is_dir() else None,
            already_finished=True,
        )
    trainable = is_trainable if is_trainable is not None else cfg.train.trainable
    manager = checkpoint_manager(str(workdir), cfg.checkpoint.keep, cfg.checkpoint.async_save)
    try:
        run = _set_up(cfg, workdir, mesh, manager, rules, trainable)
        all_hooks = default_hooks(
            cfg, eval_loss_data=run.eval_loader is not None, task_eval=run.task_eval is not None
        )
        return _train(run, all_hooks.extend(hooks or Hooks()), progress, stop_after_steps)
    finally:
        try:
            manager.wait_until_finished()
        finally:
            manager.close()
