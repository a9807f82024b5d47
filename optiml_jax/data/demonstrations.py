"""MetaICL demonstrations (data.demonstrations; the paper's §4.8 ablation, off by default).

    data:
      demonstrations: {distribution: zipf, a: 4, max: 5, separator: "\\n\\n\\n", loss: target}

Example i of the stream gets k = min(Z - 1, max) demonstrations, Z ~ Zipf(a) on 1, 2, ... (a = 4: 92.4%
of examples get none), each another example of the same task, drawn uniformly. They go where the task's
prompts stop sharing text: after the task definition for task-level instructions (the paragraphs every
prompt of the task starts with, e.g. "Instructions: ...\\n\\n") and before the example for instance-level
ones (prompts that share no paragraph), each as its prompt and output, separated by `separator`.
`loss: suffix` also trains on the demonstrations' outputs (packing's loss spans); `target` (default) on
the example's target only.

Everything is a pure function of (seed, stream index): k and the demonstrations' positions come from
uniforms drawn per chunk of CHUNK stream indices from a generator seeded with (seed, chunk), so seeking
and resuming need nothing but the index, and a process draws them only for its own rows' examples.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Optional

import numpy as np

from optiml_jax.config import ConfigError
from optiml_jax.data.mixing import CHUNK
from optiml_jax.data.mixture import check_section

DISTRIBUTIONS = ("zipf",)
DEMO_LOSS_CHOICES = ("target", "suffix")
_DEMO_STREAM = 0x64656D6F  # "demo": independent of the task draws and permutations
KEY = "data.demonstrations"


@dataclasses.dataclass(frozen=True)
class DemonstrationsConfig:
    distribution: str = "zipf"
    a: float = 4.0
    max: int = 5
    separator: str = "\n\n\n"
    loss: str = "target"

    @classmethod
    def from_value(cls, value, key: str = KEY) -> "DemonstrationsConfig":
        if isinstance(value, cls):
            return value
        check_section(
            value, [f.name for f in dataclasses.fields(cls)], key, "distribution: zipf, a: 4, max: 5"
        )
        cfg = cls(**value)
        if cfg.distribution not in DISTRIBUTIONS:
            raise ConfigError(
                f"{key}.distribution={cfg.distribution!r} is not one of {', '.join(DISTRIBUTIONS)}"
            )
        a = cfg.a
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not a > 1 or not math.isfinite(a):
            raise ConfigError(f"{key}.a must be a number > 1 (Zipf's exponent), got {a!r}")
        if isinstance(cfg.max, bool) or not isinstance(cfg.max, int) or cfg.max < 0:
            raise ConfigError(f"{key}.max must be a non-negative integer, got {cfg.max!r}")
        if not isinstance(cfg.separator, str):
            raise ConfigError(f"{key}.separator must be a string, got {cfg.separator!r}")
        if cfg.loss not in DEMO_LOSS_CHOICES:
            raise ConfigError(f"{key}.loss={cfg.loss!r} is not one of {', '.join(DEMO_LOSS_CHOICES)}")
        return dataclasses.replace(cfg, a=float(a))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def count_probabilities(a: float, cap: int) -> np.ndarray:
    """P(k) for k = 0 .. cap demonstrations: P(Z - 1 = k) for Z ~ Zipf(a), the tail folded into cap."""
    z = np.arange(1, cap + 1, dtype=np.float64)
    head = z**-a
    # zeta(a) = sum_{z <= N} z^-a + the Euler-Maclaurin tail, exact to float64 at N = 10^5 for a > 1.
    n = 100_000
    zeta = (np.arange(1, n + 1, dtype=np.float64) ** -a).sum() + n ** (1 - a) / (a - 1) - 0.5 * n**-a
    probs = np.append(head / zeta, 0.0)
    probs[cap] = max(1.0 - probs[:cap].sum(), 0.0)
    return probs


@dataclasses.dataclass(frozen=True)
class Demonstrated:
    """An example with demonstrations in its prompt. `src_pieces` (loss: suffix) split the prompt into
    (text, trained) parts for packing.tokenize_examples."""

    task: str
    src: str
    tgt: str
    source: str
    demonstrations: int
    src_pieces: Optional[tuple[tuple[str, bool], ...]] = None


def shared_paragraphs(prompts: list[str]) -> str:
    """The paragraphs (ending in a blank line) every prompt starts with: a task-level instruction."""
    prefix = os.path.commonprefix(prompts)
    cut = prefix.rfind("\n\n")
    return prefix[: cut + 2] if cut >= 0 else ""


def with_demonstrations(example: Any, demos: list, cfg: DemonstrationsConfig) -> Demonstrated:
    srcs = [d.src.rstrip() for d in demos]
    shared = shared_paragraphs([example.src, *srcs])
    pieces: list[tuple[str, bool]] = []
    lead = shared
    for src, demo in zip(srcs, demos):
        pieces += [(lead + src[len(shared) :], False), (" " + demo.tgt.strip(), True)]
        lead = cfg.separator
    pieces.append((lead + example.src[len(shared) :], False))
    src = "".join(text for text, _ in pieces)
    suffix = cfg.loss == "suffix"
    return Demonstrated(
        example.task, src, example.tgt, example.source, len(demos), tuple(pieces) if suffix else None
    )


class Demonstrator:
    """Gives stream example `index` (task `task`, example `j` of it) its demonstrations."""

    def __init__(self, cfg: DemonstrationsConfig, seed: int, skip_tasks=frozenset()):
        self.cfg = cfg
        self.seed = int(seed)
        self.skip_tasks = skip_tasks  # stream task numbers that never get any (whole-sequence slices)
        self._cdf = np.cumsum(count_probabilities(cfg.a, cfg.max))
        self._chunk_id = -1
        self._uniforms = np.empty((0, 0))

    @property
    def tag(self) -> str:
        """Folded into the loader's fingerprint: other demonstrations are another stream."""
        return f"demonstrations={sorted(self.cfg.to_dict().items())!r}"

    def _draws(self, index: int) -> np.ndarray:
        chunk, offset = divmod(index, CHUNK)
        if chunk != self._chunk_id:
            rng = np.random.default_rng([self.seed, _DEMO_STREAM, chunk])
            self._uniforms, self._chunk_id = rng.random((CHUNK, 1 + self.cfg.max)), chunk
        return self._uniforms[offset]

    def count(self, index: int, task_size: int) -> int:
        """How many demonstrations example `index` gets (its task's other examples at most)."""
        k = int(np.searchsorted(self._cdf, self._draws(index)[0], side="right"))
        return min(k, self.cfg.max, task_size - 1)

    def __call__(self, index: int, task: int, j: int, examples) -> Any:
        example = examples[j]
        if task in self.skip_tasks:
            return example
        k = self.count(index, len(examples))
        if k <= 0:
            return example
        # Uniform over the task's other examples (j skipped): distinct picks are not required.
        picks = (self._draws(index)[1 : 1 + k] * (len(examples) - 1)).astype(np.int64)
        demos = [examples[int(p) + (p >= j)] for p in picks]
        return with_demonstrations(example, demos, self.cfg)
