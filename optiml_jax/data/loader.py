"""Batch iterators: an infinite, host-sharded, exactly resumable train loader and a one-pass eval loader.

Host sharding. Every process runs the same deterministic pipeline for the whole GLOBAL batch (mixing,
tokenising, packing) and builds arrays only for its own rows `[process_index * local,
(process_index + 1) * local)`. The global batch is therefore the same whatever the process count, and
the loader state is one small global value that every process agrees on and that stays valid if a run
is restarted on a different number of hosts. The price is that every host tokenises the whole global
batch (~0.5M tokens per step for OPT-IML's 256 x 2048; cheap next to a training step).

Exact resume. The state is the stream index of the first example not contained in any row handed out
so far. Greedy packing starts a fresh row with that example, so rebuilding the mixture stream at that
index (a cheap replay of task draws, see mixing.py) with an empty packer reproduces every later batch
bit for bit. Tokenised lookahead and closed-but-unused rows are simply recomputed.

Batch dict (numpy, local rows only; see packing.py for the exact layout):
    input_ids, targets, segment_ids, positions: int32 [local_batch, seq_len]
    loss_mask: float32 [local_batch, seq_len]
"""
from __future__ import annotations

import hashlib
import logging
from collections import deque
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np

from optiml_jax.data.holdout import Holdout, holdout_problem, holdout_tag
from optiml_jax.data.mixing import MixtureStream
from optiml_jax.data.packing import (Packer, PackStats, TokenizedExample, Tokenizer, empty_row, row_arrays,
                                     stack_rows, tokenize_examples)
from optiml_jax.data.sources import DataError, Example, SkipStats

logger = logging.getLogger(__name__)

STATE_KIND = "optiml_jax.data.TrainLoader"
STATE_VERSION = 1
# Examples tokenised per encode_batch call (one call amortises the tokenizer's per-call overhead).
TOKENIZE_CHUNK = 256


def _local_rows(global_batch_size: int, process_index: int, process_count: int) -> tuple[int, int]:
    for name, value in (("global_batch_size", global_batch_size), ("process_count", process_count)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(process_index, bool) or not isinstance(process_index, int) or not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, process_count={process_count}), got {process_index!r}")
    if global_batch_size % process_count:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the process count "
                         f"{process_count}; every process must get the same number of rows")
    local = global_batch_size // process_count
    return process_index * local, (process_index + 1) * local


def _check_seq_len(seq_len: int) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")


class TrainLoader:
    """Infinite iterator of packed training batches from an EPS-capped task mixture."""

    def __init__(self, tasks: Mapping[str, Sequence[Example]], tokenizer: Tokenizer, *, global_batch_size: int,
                 seq_len: int, eps: int = 4096, seed: int = 0, overlong: str = "truncate", process_index: int = 0,
                 process_count: int = 1, state: Optional[dict] = None, skip_stats: Optional[SkipStats] = None,
                 holdout: Holdout = None):
        """`holdout`: the data.eval_holdout that `tasks` were split with (see holdout.py); it does not change
        the stream, but it is part of the state fingerprint, so a state saved under one split is refused
        under another."""
        _check_seq_len(seq_len)
        problem = holdout_problem(holdout)
        if problem:
            raise ValueError(f"holdout {problem}")
        self.holdout = holdout
        self.skip_stats = skip_stats if skip_stats is not None else SkipStats()  # what the readers dropped
        self.global_batch_size = global_batch_size
        self.seq_len = seq_len
        self.overlong = overlong
        self.process_index, self.process_count = process_index, process_count
        self._lo, self._hi = _local_rows(global_batch_size, process_index, process_count)
        self.tokenizer = tokenizer
        self.mixture = MixtureStream(tasks, eps=eps, seed=seed)
        # Counters since this loader was built (not part of the state: a resumed run starts them at 0).
        self.pack_stats = PackStats()
        self.packer = Packer(seq_len, overlong, self.pack_stats)
        self._reset(0, 0)
        if state is not None:
            self.set_state(state)

    @property
    def fingerprint(self) -> str:
        """The mixture's fingerprint (task names and sizes, eps, seed), plus the hold-out when there is one
        (without one it is the mixture's own, so states saved before hold-outs existed stay valid)."""
        if self.holdout is None:
            return self.mixture.fingerprint
        text = f"{self.mixture.fingerprint}|{holdout_tag(self.holdout)}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def local_batch_size(self) -> int:
        return self._hi - self._lo

    def _reset(self, stream_index: int, batches: int) -> None:
        self.mixture.seek(stream_index)
        self.packer.reset()
        self._lookahead: deque[tuple[int, TokenizedExample]] = deque()
        self._ready: deque[tuple[list[TokenizedExample], int]] = deque()
        self._resume_index = stream_index
        self._batches = batches

    # ------------------------------------------------------------------ state
    def get_state(self) -> dict:
        """JSON-able position: pass it to `set_state` (or `state=`) to continue with the same batches."""
        return {"kind": STATE_KIND, "version": STATE_VERSION, "stream_index": self._resume_index,
                "batches": self._batches, "fingerprint": self.fingerprint, "seq_len": self.seq_len,
                "global_batch_size": self.global_batch_size, "overlong": self.overlong}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("kind") != STATE_KIND:
            raise DataError(f"not a TrainLoader state: {state!r:.200}")
        if state.get("version") != STATE_VERSION:
            raise DataError(f"TrainLoader state version {state.get('version')!r} is not {STATE_VERSION}")
        index = state.get("stream_index")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise DataError(f"TrainLoader state has a bad stream_index {index!r}")
        if state.get("fingerprint") != self.fingerprint:
            raise DataError("TrainLoader state was saved for a different data stream (task names or sizes, "
                            "data.eps, data.eval_holdout or seed changed), so its position means nothing here; "
                            "start without the saved data state to begin the new stream from the start")
        for key in ("seq_len", "global_batch_size", "overlong"):
            if state.get(key) != getattr(self, key):
                logger.warning("resuming data with %s=%r (state was saved with %r): the stream continues "
                               "where it was, but batches differ from an uninterrupted run",
                               key, getattr(self, key), state.get(key))
        self._reset(index, int(state.get("batches", 0)))

    # ------------------------------------------------------------------ iteration
    def _next_example(self) -> tuple[int, TokenizedExample]:
        if not self._lookahead:
            drawn = [next(self.mixture) for _ in range(TOKENIZE_CHUNK)]
            tokenized = tokenize_examples([example for _, example in drawn], self.tokenizer)
            self._lookahead.extend(zip((index for index, _ in drawn), tokenized))
        return self._lookahead.popleft()

    def _next_row(self) -> tuple[list[TokenizedExample], int]:
        """The next closed row and the stream index a fresh packer would continue from after it."""
        while not self._ready:
            index, example = self._next_example()
            rows = self.packer.add(example)
            for k, row in enumerate(rows):
                # A row closes either because `example` does not fit (it then starts the next row: resume
                # at `index`) or because `example` filled it exactly (resume after it).
                filled_by_example = k == len(rows) - 1 and not self.packer.pending
                self._ready.append((row, index + 1 if filled_by_example else index))
        return self._ready.popleft()

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = []
        for r in range(self.global_batch_size):
            row, resume_index = self._next_row()
            if self._lo <= r < self._hi:
                rows.append(row_arrays(row, self.seq_len, self.tokenizer.pad_id))
        self._resume_index = resume_index
        self._batches += 1
        return stack_rows(rows)

    def stats(self) -> dict[str, int]:
        """Flat counters for the training log: "skipped/<reason>" and "packed/<counter>"."""
        return _flat_stats(self.skip_stats, self.pack_stats)


def _flat_stats(skip_stats: SkipStats, pack_stats: PackStats) -> dict[str, int]:
    out = {f"skipped/{k}": v for k, v in skip_stats.as_dict().items()}
    out.update({f"packed/{k}": v for k, v in pack_stats.as_dict().items()})
    return out


class EvalLoader:
    """One pass over a finite dataset in a fixed order (tasks by name, examples in file order), packed
    greedily like training; the last row is kept and the last batch is filled up with all-padding rows
    (loss_mask 0, segment_ids 0), so every process yields the same number of batches. Iterating again
    starts over."""

    def __init__(self, tasks: Mapping[str, Sequence[Example]], tokenizer: Tokenizer, *, global_batch_size: int,
                 seq_len: int, overlong: str = "truncate", process_index: int = 0, process_count: int = 1,
                 skip_stats: Optional[SkipStats] = None):
        _check_seq_len(seq_len)
        self.skip_stats = skip_stats if skip_stats is not None else SkipStats()
        self.tasks = {name: list(tasks[name]) for name in sorted(tasks)}
        self.tokenizer = tokenizer
        self.global_batch_size = global_batch_size
        self.seq_len = seq_len
        self.overlong = overlong
        self._lo, self._hi = _local_rows(global_batch_size, process_index, process_count)
        Packer(seq_len, overlong)  # validates `overlong` now rather than at the first eval
        self.pack_stats = PackStats()  # of the latest pass

    def stats(self) -> dict[str, int]:
        return _flat_stats(self.skip_stats, self.pack_stats)

    @property
    def num_examples(self) -> int:
        return sum(len(v) for v in self.tasks.values())

    def _rows(self, packer: Packer) -> Iterator[list[TokenizedExample]]:
        examples = [e for task in self.tasks.values() for e in task]
        for start in range(0, len(examples), TOKENIZE_CHUNK):
            for example in tokenize_examples(examples[start:start + TOKENIZE_CHUNK], self.tokenizer):
                yield from packer.add(example)
        last = packer.flush()
        if last is not None:
            yield last

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        self.pack_stats = PackStats()
        packer = Packer(self.seq_len, self.overlong, self.pack_stats)
        pad_id = self.tokenizer.pad_id
        batch: list = []
        for row in self._rows(packer):
            batch.append(row)
            if len(batch) == self.global_batch_size:
                yield self._arrays(batch, pad_id)
                batch = []
        if batch:
            yield self._arrays(batch, pad_id)

    def _arrays(self, batch: list, pad_id: int) -> dict[str, np.ndarray]:
        rows = []
        for r in range(self._lo, self._hi):
            rows.append(row_arrays(batch[r], self.seq_len, pad_id) if r < len(batch)
                        else empty_row(self.seq_len, pad_id))
        return stack_rows(rows)
