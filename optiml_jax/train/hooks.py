"""The loop's hooks: what runs beside the training steps (checkpoints, evaluations, logging, samples), each
a function `fn(run, step)` registered with its cadence, as Levanter's `Trainer.add_hook(fn, every=N)`.

    hooks = Hooks()
    hooks.add(profile, every=100)                    # after every 100th step
    hooks.add(save, every=500, at_end=True, on_preemption=True)
    train_and_evaluate(cfg, hooks=hooks)             # after the run's own hooks

`run` is the running job (train/context.py: its config, state, model, writer, `report(line)`...).
A hook that reads only the step's metrics (`reads_state=False`: the console and metrics.jsonl lines) runs
when they are read, one step late, so the host never stalls the device; one that reads the state
(checkpoints, evaluations) runs right after its step, with that step's metrics logged first.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

HookFn = Callable[[Any, int], None]


@dataclasses.dataclass(frozen=True)
class Hook:
    fn: HookFn
    every: int = 0  # after every `every`-th step before train.max_steps (0: none); the end runs at_end's
    at_start: bool = False  # also at the step the run starts or resumes from, when `every` divides it
    at_end: bool = False  # once, when train.max_steps is reached
    on_preemption: bool = False  # once, when SIGTERM / Ctrl-C or stop_after_steps stops the run early
    reads_state: bool = True

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0


class Hooks:
    """The registry `_steps` asks which hooks are due; hooks run in the order they were added."""

    def __init__(self, hooks: tuple[Hook, ...] = ()):
        self.hooks: list[Hook] = list(hooks)

    def add(
        self,
        fn: HookFn,
        *,
        every: int = 0,
        at_start: bool = False,
        at_end: bool = False,
        on_preemption: bool = False,
        reads_state: bool = True,
    ) -> "Hooks":
        self.hooks.append(Hook(fn, every, at_start, at_end, on_preemption, reads_state))
        return self

    def extend(self, other: "Hooks") -> "Hooks":
        self.hooks.extend(other.hooks)
        return self

    def every(self, step: int, *, reads_state: bool) -> list[Hook]:
        """Hooks whose cadence falls on `step` (not counting at_end: the end runs its own list)."""
        return [h for h in self.hooks if h.reads_state == reads_state and h.due(step)]

    def at_start(self, step: int) -> list[Hook]:
        return [h for h in self.hooks if h.at_start and h.due(step)]

    def at_end(self, *, reads_state: bool = True) -> list[Hook]:
        return [h for h in self.hooks if h.at_end and h.reads_state == reads_state]

    def on_preemption(self) -> list[Hook]:
        return [h for h in self.hooks if h.on_preemption]

    @staticmethod
    def run(hooks: list[Hook], run, step: int) -> None:
        for hook in hooks:
            hook.fn(run, step)
