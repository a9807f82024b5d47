"""The run's own hooks (train/hooks.py): the train-metrics line, checkpoints, the eval loss, held-out task
metrics, the final model and greedy samples, and `default_hooks(cfg)` registering them at their cadences.
Each is a function `fn(run, step)` of the running job (train/context.py)."""

from __future__ import annotations

import datetime
import logging

import jax
import numpy as np

from optiml_jax.data.mixture import share_scalars
from optiml_jax.eval.metrics import ALL_METRICS
from optiml_jax.eval.runner import METRICS_FILE, evaluate, metric_scalars, write_results
from optiml_jax.generate import complete_texts, generate
from optiml_jax.run_config import RunConfig
from optiml_jax.tokenizer import PROMPT_ADD_BOS
from optiml_jax.train.checkpointing import save_checkpoint, save_final_model
from optiml_jax.train.context import Run
from optiml_jax.train.hooks import Hooks
from optiml_jax.train.steps import evaluate_loss
from optiml_jax.train.suite_hook import suite_hook

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- train metrics
def log_train_metrics(run: Run, step: int) -> None:
    """The window's train scalars to metrics.jsonl / TensorBoard and one line on the console (step,
    loss, learning rate, tokens/s, MFU, ETA), as HF Trainer and MaxText print, bar or no bar."""
    m, window, throughput = run.metrics, run.window, run.throughput
    elapsed = window.seconds_per_step() * window.steps
    tokens_per_s = throughput["tokens_per_step"] * window.steps / elapsed if elapsed > 0 else 0.0
    mfu = tokens_per_s * throughput["flops_per_token"] / throughput["peak_flops"]
    loss = float(np.mean(window.losses)) if window.losses else float(m["loss"])
    scalars = {
        "train/loss": loss,
        "train/step_loss": float(m["loss"]),
        "train/lr": float(m["lr"]),
        "train/grad_norm": float(m["grad_norm"]),
        "train/tokens_per_s": tokens_per_s,
        "train/mfu": mfu,
        "train/target_tokens": float(m["target_tokens"]),
        "train/nonfinite": int(m["nonfinite"]),
        "train/nonfinite_in_a_row": int(m["nonfinite_in_a_row"]),
        "train/nonfinite_total": int(m["nonfinite_total"]),
    }
    scalars.update({f"data/{k}": v for k, v in run.loader.stats().items()})
    scalars.update(share_scalars(run.loader.mixture_counts()))  # data.mixture's realised shares
    run.writer.write(step, scalars)
    max_steps = run.cfg.train.max_steps
    eta = datetime.timedelta(seconds=round(window.seconds_per_step() * (max_steps - step)))
    skipped = f", {int(m['nonfinite_total'])} non-finite step(s) skipped" if int(m["nonfinite_total"]) else ""
    run.report(
        f"step {step}/{max_steps}: loss {loss:.4f}, lr {float(m['lr']):.3g}, {tokens_per_s:,.0f} tokens/s, "
        f"MFU {mfu:.1%}, ETA {eta}{skipped}"
    )
    window.restart()


# ---------------------------------------------------------------------- checkpoints
def checkpoint(run: Run, step: int, force: bool = False) -> None:
    """Saves unless the state is inside a run of non-finite steps (the last good checkpoint stays)."""
    if run.nonfinite_in_a_row:
        log.warning(
            "step %d: not checkpointing during %d non-finite step(s) in a row", step, run.nonfinite_in_a_row
        )
        return
    save_checkpoint(run.manager, run.state, run.loader.get_state(), force=force)


def last_checkpoint(run: Run, step: int) -> None:
    """The checkpoint a stopped or finished run leaves, written before the hook returns."""
    checkpoint(run, step, force=True)
    run.manager.wait_until_finished()


# ---------------------------------------------------------------------- evaluation
def eval_loss(run: Run, step: int) -> None:
    scalars = evaluate_loss(
        run.eval_step,
        run.state.params,
        run.eval_loader,
        run.mesh,
        run.cfg.eval_batch_size,
        run.cfg.eval.max_batches,
    )
    run.result.eval_losses[step] = scalars["eval/loss"]
    run.writer.write(step, scalars)
    run.report(f"step {step}: eval loss {scalars['eval/loss']:.4f}")


def eval_tasks(run: Run, step: int) -> None:
    """eval.tasks at `step`: answers generated or ranked and scored by optiml_jax.eval, logged as scalars
    and written to workdir/eval/<step>/ (predictions.jsonl, metrics.json, report.md) by process 0."""
    tasks, settings = run.task_eval
    outcome = evaluate(
        run.model, run.state.params, run.tokenizer, tasks, settings, mesh=run.mesh, rules=run.rules
    )
    metrics = outcome.metrics
    metrics["settings"]["step"] = step
    run.writer.write(step, metric_scalars(metrics))
    if run.is_main:
        write_results(
            run.workdir / "eval" / str(step), outcome, overwrite=True, title=f"Held-out tasks at step {step}"
        )
    run.result.task_metrics[step] = metrics
    overall = metrics["overall"]
    figures = ", ".join(f"{name} {overall[name]:.2f}" for name in ALL_METRICS if name in overall)
    run.report(f"step {step}: held-out tasks {figures} ({overall['instances']} instances)")


# ---------------------------------------------------------------------- the end of the run
def log_data_stats(run: Run, step: int) -> None:
    data_stats = run.loader.stats()  # collective with several processes: every process asks
    if run.is_main:
        log.info("data: %s", data_stats)
    run.writer.write(step, {f"data/{k}": v for k, v in data_stats.items()})


def final_model(run: Run, step: int) -> None:
    """workdir/final, with the held-out scores of the last step beside the weights when there are some,
    written inside it before it is renamed into place: final/ never appears without them."""
    scores = {}
    if step in run.result.task_metrics:  # eval_tasks wrote them on process 0, the one that copies them
        scores[METRICS_FILE] = run.workdir / "eval" / str(step) / METRICS_FILE
    run.result.final_dir = save_final_model(
        run.workdir / "final", run.opt_config, run.state.params, run.tokenizer, extra_files=scores
    )


def samples(run: Run, step: int) -> None:
    if jax.process_count() > 1:
        log.info("eval.num_samples: greedy samples are only generated on a single process")
        return
    run.result.samples = sample_heldout(
        run.model, run.state.params, run.tokenizer, run.eval_loader, run.cfg.eval, run.cfg.data.add_bos
    )


def sample_heldout(
    model, params, tokenizer, eval_loader, eval_cfg, add_bos: bool = PROMPT_ADD_BOS
) -> list[tuple[str, str, str]]:
    """(prompt, reference, greedy generation) for the first example of the first few eval tasks, by the
    KV-cache decoder of optiml_jax.generate (one batch; prompts cut from the left to fit the positions)."""
    max_new = eval_cfg.sample_max_new_tokens
    room = model.config.max_position_embeddings - max_new
    examples = [
        examples[0] for examples in list(eval_loader.tasks.values())[: eval_cfg.num_samples] if examples
    ]
    prompts = [(e, tokenizer.encode(e.src.rstrip(" "), add_bos=add_bos)[-room:]) for e in examples]
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


# ---------------------------------------------------------------------- the cadences
def default_hooks(cfg: RunConfig, *, eval_loss_data: bool, task_eval: bool) -> Hooks:
    """The run's hooks in the order they run at a step: the metrics line before the checkpoint, the
    checkpoint before the evaluations (a crash in evaluation keeps the step), the final model after
    the final evaluation (its scores travel with it)."""
    hooks = Hooks()
    hooks.add(log_train_metrics, every=cfg.train.log_every_steps, at_end=True, reads_state=False)
    hooks.add(checkpoint, every=cfg.checkpoint.every_steps)
    if eval_loss_data:
        hooks.add(eval_loss, every=cfg.eval.every_steps, at_start=True, at_end=True)
    if task_eval:
        hooks.add(eval_tasks, every=cfg.eval.every_steps, at_start=True, at_end=True)
    if cfg.eval.suite:
        # not at step 0: best/ is chosen among the run's own checkpoints
        hooks.add(suite_hook, every=cfg.eval.every_steps, at_end=True)
    hooks.add(last_checkpoint, at_end=True, on_preemption=True)
    hooks.add(log_data_stats, at_end=True)
    if cfg.checkpoint.save_final:
        hooks.add(final_model, at_end=True)
    if cfg.eval.num_samples and eval_loss_data:
        hooks.add(samples, at_end=True)
    return hooks
