"""The fine-tuning loop: `train_and_evaluate(cfg)` runs (or resumes) the job a RunConfig describes.

Shaped like flax's lm1b example: set up (model, data, sharded state, jitted steps), then steps with
evaluation, checkpoints and metrics at their cadences, then the final evaluation, checkpoint and model.
Metrics are read one step late, so the host never stalls the device; SIGTERM (a preemption) saves a
checkpoint and stops at the next step.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np

from optiml_jax.config import ConfigError, OPTConfig, as_dtype
from optiml_jax.eval.metrics import ALL_METRICS
from optiml_jax.eval.suite_hook import check_suite, suite_hook
from optiml_jax.model import OPTForCausalLM
from optiml_jax.run_config import RunConfig, resolve_path
from optiml_jax.sharding import DEFAULT_RULES, make_mesh
from optiml_jax.train.checkpointing import (
    checkpoint_manager,
    prepare_workdir,
    restore_checkpoint,
    save_checkpoint,
    save_final_model,
)
from optiml_jax.train.memory import check_memory
from optiml_jax.train.metrics_log import MetricsWriter
from optiml_jax.train.state import (
    TrainingError,
    TrainState,
    build_model,
    create_train_state,
    make_optimizer,
    state_shardings,
)
from optiml_jax.train.steps import evaluate_loss, global_batch, make_eval_step, make_train_step
from optiml_jax.train.throughput import flops_per_token, measure_matmul_peak

log = logging.getLogger(__name__)


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
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
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


# ---------------------------------------------------------------------- set-up
def load_model_and_tokenizer(cfg: RunConfig, mesh, rules=DEFAULT_RULES, load_weights: bool = True):
    """(OPTConfig, params or None, tokenizer) for cfg.model: `preset:NAME` (random init later) or a
    checkpoint directory / hub id (params loaded into their shards unless load_weights is False)."""
    from optiml_jax.tokenizer import OPTTokenizer

    params, tokenizer = None, None
    if cfg.model.startswith("preset:"):
        name = cfg.model[len("preset:") :]
        opt_config = OPTConfig.from_preset(
            resolve_path(name) if name.endswith((".yaml", ".yml", ".json")) else name
        )
    elif load_weights:
        from optiml_jax.checkpoints.pretrained import load_pretrained

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
    eval_batch = cfg.eval.batch_size or cfg.train.batch_size
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


@dataclasses.dataclass
class _Run:
    """What one invocation of train_and_evaluate works with; `state` advances with every step."""

    cfg: RunConfig
    workdir: Path
    mesh: Any
    rules: Any
    manager: Any
    opt_config: OPTConfig
    tokenizer: Any
    model: OPTForCausalLM
    loader: Any
    eval_loader: Any
    task_eval: Any  # (tasks, EvalSettings) of eval.tasks, or None
    state: TrainState
    train_step: Any
    eval_step: Any
    writer: MetricsWriter
    result: RunResult
    bar: Any = None
    nonfinite_in_a_row: int = 0

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0

    @property
    def eval_batch_size(self) -> int:
        return self.cfg.eval.batch_size or self.cfg.train.batch_size

    def report(self, line: str) -> None:
        if self.is_main:
            log.info("%s", line)
            if self.bar is not None:
                self.bar.write(line)


def _set_up(cfg: RunConfig, workdir: Path, mesh, manager, rules) -> _Run:
    """Model, data, state (restored or created in its shards), jitted steps and the metrics writer."""
    from optiml_jax.data import build_loaders

    resuming = manager.latest_step() is not None
    # The architecture and tokenizer first (no weights): the memory check comes before any allocation.
    opt_config, _, tokenizer = load_model_and_tokenizer(cfg, mesh, rules, load_weights=False)
    if cfg.train.seq_len > opt_config.max_position_embeddings:
        raise ConfigError(
            f"train.seq_len={cfg.train.seq_len} exceeds the model's max_position_embeddings="
            f"{opt_config.max_position_embeddings}"
        )
    check_memory(cfg, opt_config, mesh, rules)
    params = None
    if not resuming and not cfg.model.startswith("preset:"):
        opt_config, params, tokenizer = load_model_and_tokenizer(cfg, mesh, rules, load_weights=True)
    model = build_model(opt_config, cfg.train)
    tx = make_optimizer(cfg.optim, cfg.train.max_steps)
    eval_batch_size = cfg.eval.batch_size or cfg.train.batch_size
    loader, eval_loader = build_loaders(
        _data_config_resolved(cfg),
        tokenizer,
        seed=cfg.seed,
        batch_size=cfg.train.batch_size,
        eval_batch_size=eval_batch_size,
        seq_len=cfg.train.seq_len,
    )
    check_suite(cfg)  # eval.suite's bad entries, before any training step
    task_eval = None
    if cfg.eval.tasks is not None:
        from optiml_jax.eval.runner import settings_from_config, tasks_from_config

        task_eval = (
            tasks_from_config(cfg.eval.tasks, eval_loader.tasks if eval_loader else None, resolve_path),
            settings_from_config(cfg.eval.tasks, eval_batch_size),
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
    return _Run(
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
        train_step=make_train_step(model, tx, cfg.train, cfg.optim, mesh, shardings, rules),
        eval_step=make_eval_step(model, mesh, shardings.params, rules),
        writer=writer,
        result=RunResult(step=start_step, state=state, model=model, losses={}, eval_losses={}),
        nonfinite_in_a_row=int(jax.device_get(state.nonfinite_in_a_row)),
    )


# ---------------------------------------------------------------------- evaluation, logging, checkpoints
def evaluate_tasks(
    model, params, tokenizer, task_eval, mesh, rules, workdir: Path, step: int, writer
) -> dict:
    """eval.tasks at `step`: answers generated or ranked and scored by optiml_jax.eval, logged as scalars
    and written to workdir/eval/<step>/ (predictions.jsonl, metrics.json, report.md) by process 0."""
    from optiml_jax.eval.runner import evaluate, metric_scalars, write_results

    tasks, settings = task_eval
    outcome = evaluate(model, params, tokenizer, tasks, settings, mesh=mesh, rules=rules)
    outcome.metrics["settings"]["step"] = step
    writer.write(step, metric_scalars(outcome.metrics))
    if jax.process_index() == 0:
        write_results(
            workdir / "eval" / str(step), outcome, overwrite=True, title=f"Held-out tasks at step {step}"
        )
    return outcome.metrics


def _evaluate(run: _Run, step: int) -> None:
    """The eval loss and eval.tasks at `step`."""
    if run.eval_loader is not None:
        scalars = evaluate_loss(
            run.eval_step,
            run.state.params,
            run.eval_loader,
            run.mesh,
            run.eval_batch_size,
            run.cfg.eval.max_batches,
        )
        run.result.eval_losses[step] = scalars["eval/loss"]
        run.writer.write(step, scalars)
        run.report(f"step {step}: eval loss {scalars['eval/loss']:.4f}")
    if run.task_eval is not None:
        metrics = evaluate_tasks(
            run.model,
            run.state.params,
            run.tokenizer,
            run.task_eval,
            run.mesh,
            run.rules,
            run.workdir,
            step,
            run.writer,
        )
        run.result.task_metrics[step] = metrics
        overall = metrics["overall"]
        figures = ", ".join(f"{name} {overall[name]:.2f}" for name in ALL_METRICS if name in overall)
        run.report(f"step {step}: held-out tasks {figures} ({overall['instances']} instances)")
    if run.cfg.eval.suite:  # eval.suite: its selection score picks best/
        suite_hook(run, step)


@dataclasses.dataclass
class _Window:
    """Train metrics since the last logged line, for its mean loss and tokens/s."""

    started: float
    losses: list = dataclasses.field(default_factory=list)
    steps: int = 0

    def restart(self, steps: int = 0) -> None:
        self.started, self.losses, self.steps = time.perf_counter(), [], steps


def _record(run: _Run, window: _Window, step: int, metrics, throughput: dict) -> None:
    """Reads one step's metrics (a step late), logs them at the log cadence, stops a non-finite run."""
    cfg = run.cfg
    m = jax.device_get(metrics)
    loss = float(m["loss"])
    run.result.losses[step] = loss
    run.nonfinite_in_a_row = int(m["nonfinite_in_a_row"])
    window.losses.append(loss)
    window.steps += 1
    if run.bar is not None:
        run.bar.update(1)
        run.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
    if step % cfg.train.log_every_steps == 0 or step == cfg.train.max_steps or int(m["nonfinite"]):
        elapsed = time.perf_counter() - window.started
        tokens_per_s = throughput["tokens_per_step"] * window.steps / elapsed if elapsed > 0 else 0.0
        scalars = {
            "train/loss": float(np.mean(window.losses)),
            "train/step_loss": loss,
            "train/lr": float(m["lr"]),
            "train/grad_norm": float(m["grad_norm"]),
            "train/tokens_per_s": tokens_per_s,
            "train/mfu": tokens_per_s * throughput["flops_per_token"] / throughput["peak_flops"],
            "train/target_tokens": float(m["target_tokens"]),
            "train/nonfinite": int(m["nonfinite"]),
            "train/nonfinite_in_a_row": int(m["nonfinite_in_a_row"]),
            "train/nonfinite_total": int(m["nonfinite_total"]),
        }
        scalars.update({f"data/{k}": v for k, v in run.loader.stats().items()})
        run.writer.write(step, scalars)
        window.restart()
    if run.nonfinite_in_a_row >= cfg.train.max_nonfinite_in_a_row:
        raise TrainingError(
            f"step {step}: {run.nonfinite_in_a_row} non-finite losses or gradients in a row "
            f"(train.max_nonfinite_in_a_row={cfg.train.max_nonfinite_in_a_row}); stopping"
        )


def _checkpoint(run: _Run, force: bool = False) -> None:
    """Saves unless the state is inside a run of non-finite steps (the last good checkpoint stays)."""
    if run.nonfinite_in_a_row:
        log.warning(
            "step %d: not checkpointing during %d non-finite step(s) in a row",
            int(run.state.step),
            run.nonfinite_in_a_row,
        )
        return
    save_checkpoint(run.manager, run.state, run.loader.get_state(), force=force)


def _throughput(run: _Run) -> dict:
    cfg, config = run.cfg, run.opt_config
    flops = flops_per_token(config, cfg.train.seq_len)
    peak = cfg.train.peak_flops_per_device or measure_matmul_peak(as_dtype(cfg.train.compute_dtype))
    if run.is_main:
        log.info(
            "model: %s parameters (%s without embeddings); %.3g FLOPs/token (attention %.3g); peak %.3g "
            "FLOP/s per device",
            f"{config.num_params():,}",
            f"{config.num_params(include_embeddings=False):,}",
            flops["total"],
            flops["attention"],
            peak,
        )
    return {
        "flops_per_token": flops["total"],
        "peak_flops": peak * run.mesh.size,
        "tokens_per_step": cfg.train.batch_size * cfg.train.seq_len,
    }


# ---------------------------------------------------------------------- the loop
def _steps(run: _Run, start_step: int, end_step: int, throughput: dict) -> bool:
    """Steps start_step..end_step with their evaluations and checkpoints; True when SIGTERM stopped it."""
    cfg, max_steps = run.cfg, run.cfg.train.max_steps
    window = _Window(started=time.perf_counter())
    pending = None  # (step, metrics on device): read one step late so the host never stalls the device
    with _Interrupt() as interrupt:
        for step in range(start_step, end_step):
            batch = global_batch(next(run.loader), run.mesh, cfg.train.batch_size)
            run.state, metrics = run.train_step(run.state, batch)
            if pending is not None:
                _record(run, window, *pending, throughput)
            else:  # the first step's time is mostly compilation: do not count it in tokens/s
                jax.block_until_ready(metrics)
                window.restart(steps=-1)
            pending, done = (step + 1, metrics), step + 1
            checkpoint_due = cfg.checkpoint.every_steps and done % cfg.checkpoint.every_steps == 0
            eval_due = cfg.eval.every_steps and done % cfg.eval.every_steps == 0
            if (checkpoint_due or eval_due) and done < max_steps:
                _record(
                    run, window, *pending, throughput
                )  # a step's metrics line comes before its checkpoint
                pending = None
                if checkpoint_due:
                    _checkpoint(run)
                if eval_due:
                    _evaluate(run, done)
                    window.started = time.perf_counter()
            if interrupt.should_stop(done):
                interrupted = True
                break
        else:
            interrupted = False
        if pending is not None:
            _record(run, window, *pending, throughput)
    return interrupted


def _finish(run: _Run) -> None:
    """After max_steps: the final evaluation, checkpoint, data counters, model and samples."""
    cfg, workdir, done, result = run.cfg, run.workdir, run.result.step, run.result
    _evaluate(run, done)
    _checkpoint(run, force=True)
    run.manager.wait_until_finished()
    data_stats = run.loader.stats()  # collective with several processes: every process asks
    if run.is_main:
        log.info("data: %s", data_stats)
    run.writer.write(done, {f"data/{k}": v for k, v in data_stats.items()})
    run.writer.close()
    if cfg.checkpoint.save_final:
        result.final_dir = save_final_model(
            workdir / "final", run.opt_config, run.state.params, run.tokenizer
        )
        if done in result.task_metrics and run.is_main:  # the model's scores travel with it
            from optiml_jax.eval.runner import METRICS_FILE

            tmp = workdir / "final" / f".{METRICS_FILE}.tmp"
            shutil.copyfile(workdir / "eval" / str(done) / METRICS_FILE, tmp)
            os.replace(tmp, workdir / "final" / METRICS_FILE)
    if cfg.eval.num_samples and run.eval_loader is not None:
        if jax.process_count() > 1:
            log.info("eval.num_samples: greedy samples are only generated on a single process")
        else:
            result.samples = sample_heldout(
                run.model, run.state.params, run.tokenizer, run.eval_loader, cfg.eval
            )


def _train(run: _Run, progress: bool, stop_after_steps: Optional[int]) -> RunResult:
    cfg, result, max_steps = run.cfg, run.result, run.cfg.train.max_steps
    start_step = result.step
    throughput = _throughput(run)
    end_step = max_steps if stop_after_steps is None else min(max_steps, start_step + stop_after_steps)
    if progress and run.is_main:
        from tqdm.auto import tqdm

        run.bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
    if (
        (run.eval_loader is not None or run.task_eval is not None)
        and cfg.eval.every_steps
        and start_step < max_steps
        and start_step % cfg.eval.every_steps == 0
    ):
        _evaluate(run, start_step)
    try:
        interrupted = _steps(run, start_step, end_step, throughput)
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
    result.step, result.state = int(jax.device_get(run.state.step)), run.state
    if result.step < max_steps:  # preempted or stopped early: keep the position for the next invocation
        result.interrupted = interrupted or stop_after_steps is not None
        _checkpoint(run, force=True)
        run.manager.wait_until_finished()
        run.writer.close()
        if interrupted and run.is_main:
            log.warning("stopped at step %d (preemption / SIGTERM); checkpoint saved", result.step)
        return result
    _finish(run)
    return result


def train_and_evaluate(
    cfg: RunConfig,
    *,
    devices=None,
    rules=DEFAULT_RULES,
    progress: bool = True,
    stop_after_steps: Optional[int] = None,
    overwrite: bool = False,
) -> RunResult:
    """Runs (or resumes, when cfg.workdir has a checkpoint) the fine-tuning job described by `cfg`.

    Start-up, before anything is allocated or compiled: the workdir's saved config is compared with
    `cfg` (ConfigError listing the keys that would change the result; `overwrite` clears the old run
    instead), `cfg` is saved as workdir/config.yaml, and the per-device memory estimate is printed and
    checked (InsufficientMemoryError when it cannot fit).

    stop_after_steps: return after that many steps of this invocation, as a preemption would (saving
    a checkpoint first); for tests of exact resume.
    """
    workdir = Path(cfg.workdir)
    mesh = make_mesh(cfg.mesh, devices=devices)
    _check_batch_layout(cfg, mesh)
    prepare_workdir(cfg, workdir, overwrite)
    manager = checkpoint_manager(str(workdir), cfg.checkpoint.keep, cfg.checkpoint.async_save)
    try:
        return _train(_set_up(cfg, workdir, mesh, manager, rules), progress, stop_after_steps)
    finally:
        try:
            manager.wait_until_finished()
        finally:
            manager.close()


def sample_heldout(model, params, tokenizer, eval_loader, eval_cfg) -> list[tuple[str, str, str]]:
    """(prompt, reference, greedy generation) for the first example of the first few eval tasks, by the
    KV-cache decoder of optiml_jax.generate (one batch; prompts cut from the left to fit the positions)."""
    from optiml_jax.generate import complete_texts, generate

    max_new = eval_cfg.sample_max_new_tokens
    room = model.config.max_position_embeddings - max_new
    examples = [
        examples[0] for examples in list(eval_loader.tasks.values())[: eval_cfg.num_samples] if examples
    ]
    prompts = [(e, tokenizer.encode(e.src.rstrip(" "), add_bos=False)[-room:]) for e in examples]
    prompts = [(e, ids) for e, ids in prompts if ids]
    if not prompts or room < 1:
        return []
    # Remat only matters for gradients; decoding runs the plain layers.
    decoder = model.clone(remat_policy="none") if model.remat_policy != "none" else model
    out = generate(
        decoder,
        params,
        [ids for _, ids in prompts],
        max_new_tokens=max_new,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
    )
    generated = [ids[:-1] if ids and ids[-1] == tokenizer.eos_id else ids for ids in out.token_ids()]
    texts = complete_texts(tokenizer, [ids for _, ids in prompts], generated)
    return [(e.src, e.tgt, text) for (e, _), text in zip(prompts, texts)]
