"""What one invocation of `train_and_evaluate` works with (`Run`, handed to every hook), what it returns
(`RunResult`), and the window of steps the logged train metrics average over."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Optional

import jax

from optiml_jax.config import OPTConfig
from optiml_jax.model import OPTForCausalLM
from optiml_jax.run_config import RunConfig
from optiml_jax.train.metrics_log import MetricsWriter
from optiml_jax.train.state import TrainState

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunResult:
    """What `train_and_evaluate` did: for the CLI's summary and for tests."""

    step: int
    state: Optional[TrainState]
    model: Optional[OPTForCausalLM]
    losses: dict  # step -> train loss (steps of this invocation)
    eval_losses: dict  # step -> eval loss
    task_metrics: dict = dataclasses.field(default_factory=dict)  # step -> metrics.json of eval.tasks
    interrupted: bool = False
    final_dir: Optional[str] = None
    samples: list = dataclasses.field(default_factory=list)
    already_finished: bool = False  # the workdir held a finished run: nothing was done


@dataclasses.dataclass
class Window:
    """Train metrics since the last logged line, for its mean loss, tokens/s and ETA."""

    started: float
    losses: list = dataclasses.field(default_factory=list)
    steps: int = 0

    def restart(self, steps: int = 0) -> None:
        self.started, self.losses, self.steps = time.perf_counter(), [], steps

    def exclude(self, seconds: float) -> None:
        """Time spent outside the steps (checkpoints, evaluations) does not count in tokens/s."""
        self.started += seconds

    def seconds_per_step(self) -> float:
        return (time.perf_counter() - self.started) / self.steps if self.steps > 0 else 0.0


@dataclasses.dataclass
class Run:
    """The running job; `state` advances with every step, `metrics` holds the last read step's metrics."""

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
    throughput: dict  # flops_per_token, peak_flops (all devices), tokens_per_step
    window: Window = dataclasses.field(default_factory=lambda: Window(started=time.perf_counter()))
    metrics: dict = dataclasses.field(default_factory=dict)
    bar: Any = None
    nonfinite_in_a_row: int = 0

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0

    def report(self, line: str) -> None:
        """One line on the console (process 0): through the progress bar when one is drawn, so the bar
        stays whole, else the log."""
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            log.info("%s", line)
