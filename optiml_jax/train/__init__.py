"""Fine-tuning: the train state and its shardings (state.py), which parameters train (trainable.py), the
jitted steps (steps.py) and the fused LM-head loss (loss.py), training-state checkpoints and the workdir
(checkpointing.py), the memory estimate (memory.py), FLOPs and MFU (throughput.py), metrics.jsonl /
TensorBoard (metrics_log.py), and the loop (loop.py) with its hooks (hooks.py: the registry;
run_hooks.py: the run's own), the job they share (context.py) and clean stops (interrupt.py).
`python -m optiml_jax.finetune` is the CLI."""

from optiml_jax.train.checkpointing import checkpoint_manager, restore_checkpoint, save_checkpoint
from optiml_jax.train.hooks import Hooks
from optiml_jax.train.loop import RunResult, load_model_and_tokenizer, train_and_evaluate
from optiml_jax.train.state import (
    TrainingError,
    TrainState,
    build_model,
    create_train_state,
    learning_rate_schedule,
    make_optimizer,
    state_shardings,
    weight_decay_mask,
)
from optiml_jax.train.steps import evaluate_loss, global_batch, lm_loss, make_eval_step, make_train_step
from optiml_jax.train.throughput import flops_per_token, measure_matmul_peak

__all__ = [
    "Hooks",
    "RunResult",
    "TrainState",
    "TrainingError",
    "build_model",
    "checkpoint_manager",
    "create_train_state",
    "evaluate_loss",
    "flops_per_token",
    "global_batch",
    "learning_rate_schedule",
    "lm_loss",
    "load_model_and_tokenizer",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "measure_matmul_peak",
    "restore_checkpoint",
    "save_checkpoint",
    "state_shardings",
    "train_and_evaluate",
    "weight_decay_mask",
]
