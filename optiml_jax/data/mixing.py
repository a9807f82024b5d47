"""Example-proportional task mixing with a per-task cap (EPS), as an infinite, seekable stream.

p(task) ∝ min(n_task, eps)  (metaseq `_get_sample_prob` with `multicorpus_sampling_maximum`; OPT-IML
uses eps = 4096, opt_formats.md §5.1). Every draw first picks a task with these probabilities, then
takes that task's next example in a per-task order that is reshuffled every time the task's examples
are used up (each task cycles through its own epochs independently).

The probabilities can also be given per task (data.mixture: fixed shares per benchmark and slice, EPS
inside each, see mixture.py); the stream works the same way with them.

Everything is a pure function of (seed, task names and sizes, eps or probabilities, stream index):
  * task draws come in chunks of CHUNK uniforms from a generator seeded with (seed, chunk number);
  * task t's order in its epoch e is a permutation seeded with (seed, crc32(name), e).
So the stream position is one integer: `seek(i)` replays only the cheap task draws (a bincount per
chunk, no tokenisation) to recover how far each task has got. Tasks are taken in sorted name order,
so the order in which files were read does not matter.
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Generic, Mapping, Optional, Sequence, TypeVar

import numpy as np

T = TypeVar("T")
CHUNK = 4096
_TASK_STREAM = 0x7461736B  # "task": keeps the draw and permutation generators independent
_PERM_STREAM = 0x7065726D  # "perm"


def mixing_weights(sizes: Sequence[int], eps: int) -> np.ndarray:
    """p(task) ∝ min(n_task, eps), as float64 summing to 1."""
    capped = np.minimum(np.asarray(sizes, dtype=np.float64), float(eps))
    if capped.ndim != 1 or capped.size == 0 or capped.sum() <= 0:
        raise ValueError(f"need at least one non-empty task to mix, got sizes {list(sizes)!r}")
    return capped / capped.sum()


class MixtureStream(Generic[T]):
    """Infinite deterministic stream over `tasks` (name -> examples). Yields (index, example)."""

    def __init__(
        self,
        tasks: Mapping[str, Sequence[T]],
        eps: int,
        seed: int,
        start: int = 0,
        probs: Optional[Mapping[str, float]] = None,
    ):
        """`probs`: task name -> probability, instead of EPS over all tasks (data.mixture's two levels,
        mixture.py, computes them); part of the fingerprint."""
        self.names = sorted(name for name, examples in tasks.items() if len(examples))
        if not self.names:
            raise ValueError("no task has any examples")
        self._tasks = [tasks[name] for name in self.names]
        self.sizes = np.array([len(t) for t in self._tasks], dtype=np.int64)
        self.eps = int(eps)
        self.seed = int(seed)
        if probs is None:
            self.probs = mixing_weights(self.sizes, self.eps)
        else:
            given = np.array([probs.get(name, 0.0) for name in self.names], np.float64)
            if not given.sum() > 0 or (given < 0).any():
                raise ValueError(f"task probabilities must be >= 0 and not all 0, got {dict(probs)!r:.200}")
            self.probs = given / given.sum()
        self._given_probs = probs is not None
        self._cdf = np.cumsum(self.probs)
        self._name_keys = [zlib.crc32(name.encode("utf-8")) for name in self.names]
        self._perms: dict[int, tuple[int, np.ndarray]] = {}
        self._chunk_id = -1
        self._chunk = np.empty(0, np.int64)
        self.seek(start)

    @property
    def fingerprint(self) -> str:
        """Identifies the stream definition (tasks, sizes, eps, seed), to refuse resuming on other data."""
        h = hashlib.sha256(f"{self.seed}|{self.eps}".encode())
        for name, size in zip(self.names, self.sizes):
            h.update(f"|{name}:{int(size)}".encode("utf-8"))
        if self._given_probs:  # only then, so that EPS-only states saved before stay valid
            h.update(np.round(self.probs, 12).tobytes())
        return h.hexdigest()[:16]

    @property
    def position(self) -> int:
        """Stream index of the next example `next()` returns."""
        return self._index

    def _draws(self, chunk: int) -> np.ndarray:
        # Inverse-CDF sampling from explicit uniforms, so the draws do not depend on how a numpy
        # version implements Generator.choice.
        rng = np.random.default_rng([self.seed, _TASK_STREAM, chunk])
        draws = np.searchsorted(self._cdf, rng.random(CHUNK), side="right")
        return np.minimum(draws, len(self.names) - 1)

    def seek(self, index: int) -> None:
        if index < 0:
            raise ValueError(f"stream index must be >= 0, got {index}")
        n_tasks = len(self.names)
        counts = np.zeros(n_tasks, np.int64)
        full, rest = divmod(index, CHUNK)
        for chunk in range(full):
            counts += np.bincount(self._draws(chunk), minlength=n_tasks)
        counts += np.bincount(self._draws(full)[:rest], minlength=n_tasks)
        self._counts = counts
        self._index = index

    def _order(self, task: int, epoch: int) -> np.ndarray:
        cached = self._perms.get(task)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, _PERM_STREAM, self._name_keys[task], epoch])
            cached = (epoch, rng.permutation(int(self.sizes[task])))
            self._perms[task] = cached
        return cached[1]

    def __iter__(self):
        return self

    def advance(self) -> tuple[int, int, int]:
        """(stream index, task number, example number in the task) of the next draw, without looking the
        example up: with lazily read tasks, the draws of other processes' rows cost no reading."""
        chunk, offset = divmod(self._index, CHUNK)
        if chunk != self._chunk_id:
            self._chunk, self._chunk_id = self._draws(chunk), chunk
        task = int(self._chunk[offset])
        epoch, j = divmod(int(self._counts[task]), int(self.sizes[task]))
        self._counts[task] += 1
        index = self._index
        self._index += 1
        return index, task, int(self._order(task, epoch)[j])

    def example(self, task: int, j: int) -> T:
        return self._tasks[task][j]

    def task_examples(self, task: int) -> Sequence[T]:
        """All examples of task number `task` (demonstrations are drawn from them)."""
        return self._tasks[task]

    def __next__(self) -> tuple[int, T]:
        index, task, j = self.advance()
        return index, self.example(task, j)

    def task_counts(self) -> dict[str, int]:
        """How many examples each task has contributed so far."""
        return {name: int(c) for name, c in zip(self.names, self._counts)}
