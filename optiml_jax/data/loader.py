"""Batch iterators: an infinite, host-sharded, exactly resumable train loader and a one-pass eval loader.

Rows of the global batch are independent sub-streams. Row r of every training batch is packed, greedily
and in order, from the mixture stream's examples r, r + B, r + 2B, ... (B = global batch size): row r's
k-th batch holds the next examples of that sub-stream that fit. So:

* Host sharding. A process owns rows `[process_index * local, (process_index + 1) * local)` and only
  ever templates, tokenises and packs the examples of its own rows. It walks the (cheap, no-text) task
  draws of the whole stream to find them, and skips the others without touching them. The global batch
  is the same whatever the process count.
* Exact resume. The state is, per row, the stream index of the first example of that row's sub-stream
  not contained in any batch handed out so far (a row that closes because the next example does not fit
  restarts at that example). Rebuilding the stream there (a cheap replay of task draws, see mixing.py)
  with empty packers reproduces every later batch bit for bit, on any number of processes.
  With several processes each knows only its own rows' positions: `get_state()` and `stats()` are then
  collective (every process must call them) and use the `allgather` given to the loader.

Batch dict (numpy, local rows only; see packing.py for the exact layout):
    input_ids, targets, segment_ids, positions: int32 [local_batch, seq_len]
    loss_mask: float32 [local_batch, seq_len]
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections import deque
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np

from optiml_jax.data.demonstrations import DemonstrationsConfig, Demonstrator
from optiml_jax.data.holdout import Holdout, holdout_problem, holdout_tag
from optiml_jax.data.mixing import MixtureStream
from optiml_jax.data.mixture import MixturePlan, group_counts
from optiml_jax.data.packing import (
    PACK_COUNTERS,
    Packer,
    PackStats,
    TokenizedExample,
    Tokenizer,
    empty_row,
    row_arrays,
    stack_rows,
    tokenize_examples,
)
from optiml_jax.data.records import AllGather, Shard, locate
from optiml_jax.data.sources import DataError, Example, SkipStats
from optiml_jax.tokenizer import PROMPT_ADD_BOS

logger = logging.getLogger(__name__)

STATE_KIND = "optiml_jax.data.TrainLoader"
STATE_VERSION = 2  # 1: one global stream index (rows filled one after another from one stream)
# Examples of this process's rows tokenised per encode_batch call (amortises the per-call overhead).
TOKENIZE_CHUNK = 256


def _local_rows(global_batch_size: int, process_index: int, process_count: int) -> tuple[int, int]:
    for name, value in (("global_batch_size", global_batch_size), ("process_count", process_count)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if (
        isinstance(process_index, bool)
        or not isinstance(process_index, int)
        or not 0 <= process_index < process_count
    ):
        raise ValueError(
            f"process_index must be in [0, process_count={process_count}), got {process_index!r}"
        )
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the process count "
            f"{process_count}; every process must get the same number of rows"
        )
    local = global_batch_size // process_count
    return process_index * local, (process_index + 1) * local


def _check_seq_len(seq_len: int) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")


def _gather(local: Sequence[int], process_count: int, allgather: Optional[AllGather]) -> np.ndarray:
    """Every process's `local` int64 vector, concatenated in process order."""
    local = np.asarray(local, np.int64)
    if process_count == 1:
        return local
    if allgather is None:
        raise ValueError(
            f"process_count={process_count}: this needs the loader's `allgather` (e.g. jax."
            f"experimental.multihost_utils.process_allgather), since a process knows only its own rows"
        )
    return np.asarray(allgather(local), np.int64).reshape(-1)


def _row_starts(state: dict, batch_size: int) -> list[int]:
    """Per-row resume positions from a saved state, for a batch of `batch_size` rows."""
    # One stream index s: each row restarts at the first of its examples (i % batch_size == row) at or
    # after s, so nothing before s is repeated and nothing after it skipped.
    if state.get("version") == 1:
        index = state.get("stream_index")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise DataError(f"TrainLoader state has a bad stream_index {index!r}")
        logger.warning(
            "resuming from a version-1 data state (one stream): the data continues at stream index "
            "%d, with rows laid out the current way from there",
            index,
        )
        return [index + (r - index) % batch_size for r in range(batch_size)]
    starts = state.get("row_starts")
    if (
        not isinstance(starts, list)
        or not starts
        or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in starts)
        or any(i % len(starts) != r for r, i in enumerate(starts))
    ):
        raise DataError(f"TrainLoader state has bad row_starts {starts!r:.200}")
    if len(starts) == batch_size:
        return starts
    # Another batch size: each new row continues after the furthest old row (skips, never repeats).
    after = max(starts)
    return [after + (r - after) % batch_size for r in range(batch_size)]


class _RowSlot:
    """One row of the global batch: its packer and the rows it has closed but not yet handed out."""

    def __init__(self, start: int, packer: Packer):
        self.next_index = start  # next sub-stream example to pack
        self.resume_index = start  # first sub-stream example not in a handed-out row (the saved state)
        self.packer = packer
        self.ready: deque[tuple[list[TokenizedExample], int]] = deque()


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """How a loader lays its rows out, the same for a run's train and eval loaders (build_loaders): rows of
    `seq_len` tokens, examples longer than a row truncated or dropped (`overlong`, see packing.py), `</s>`
    before each source with `add_bos` (data.add_bos), and the rows dealt over the processes of `shard` (its
    allgather is needed when there are several, see the module doc)."""

    seq_len: int
    overlong: str = "truncate"
    add_bos: bool = PROMPT_ADD_BOS
    shard: Shard = Shard()

    def __post_init__(self):
        _check_seq_len(self.seq_len)
        Packer(self.seq_len, self.overlong)  # validates `overlong` now rather than at the first batch

    @classmethod
    def from_keywords(
        cls,
        *,
        seq_len: int,
        overlong: str = "truncate",
        process_index: int = 0,
        process_count: int = 1,
        allgather: Optional[AllGather] = None,
        add_bos: bool = PROMPT_ADD_BOS,
    ) -> "RowLayout":
        """The layout as the loaders' keywords give it (as they took it before there was a RowLayout)."""
        return cls(seq_len, overlong, add_bos, Shard(process_index, process_count, allgather))


class _PackingLoader:
    """What both loaders share: `global_batch_size` rows laid out as `layout` says, this process's share of
    them (rows _lo to _hi), each packed greedily, and the counters of what was skipped and packed."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        global_batch_size: int,
        layout: Optional[RowLayout] = None,
        skip_stats: Optional[SkipStats] = None,
        **layout_keywords,
    ):
        """`layout`: the rows' RowLayout, or its settings as keywords (seq_len, overlong, add_bos,
        process_index, process_count, allgather), as the loaders took them before there was one.
        `skip_stats`: what the readers dropped."""
        if layout is None:
            layout = RowLayout.from_keywords(**layout_keywords)
        elif layout_keywords:
            raise TypeError(f"layout= and {', '.join(layout_keywords)} given together; pass one or the other")
        self.tokenizer = tokenizer
        self.global_batch_size = global_batch_size
        self.seq_len, self.overlong, self.add_bos = layout.seq_len, layout.overlong, layout.add_bos
        self.process_index, self.process_count = layout.shard.index, layout.shard.count
        self._allgather = layout.shard.allgather
        self._lo, self._hi = _local_rows(global_batch_size, self.process_index, self.process_count)
        self.skip_stats = skip_stats if skip_stats is not None else SkipStats()
        self.pack_stats = PackStats()

    def stats(self) -> dict[str, int]:
        """Flat counters for the log: "skipped/<reason>" (what the readers dropped) and "packed/<counter>"
        (summed over every process's rows; TrainLoader: since it was built, so a resumed run starts them
        at 0; EvalLoader: of the latest pass). Collective when process_count > 1."""
        return _flat_stats(
            self.skip_stats, _sum_pack_stats(self.pack_stats, self.process_count, self._allgather)
        )


class TrainLoader(_PackingLoader):
    """Infinite iterator of packed training batches from an EPS-capped task mixture."""

    def __init__(
        self,
        tasks: Mapping[str, Sequence[Example]],
        tokenizer: Tokenizer,
        *,
        eps: int = 4096,
        seed: int = 0,
        state: Optional[dict] = None,
        holdout: Holdout = None,
        plan: Optional[MixturePlan] = None,
        demonstrations: Optional[DemonstrationsConfig] = None,
        **rows,
    ):
        """`rows`: global_batch_size, the layout and skip_stats, as _PackingLoader takes them. `holdout`:
        the data.eval_holdout that `tasks` were split with (see holdout.py); it does not change the stream,
        but it is part of the state fingerprint, so a state saved under one split is refused under another.
        `plan`: data.mixture's two levels (mixture.py; its tasks replace `tasks`); `demonstrations`:
        data.demonstrations."""
        super().__init__(tokenizer, **rows)
        problem = holdout_problem(holdout)
        if problem:
            raise ValueError(f"holdout {problem}")
        self.holdout = holdout
        self.plan = plan
        if plan is not None:
            self.mixture = MixtureStream(plan.tasks, eps=eps, seed=seed, probs=plan.probs)
        else:
            self.mixture = MixtureStream(tasks, eps=eps, seed=seed)
        self.demonstrator = None
        if demonstrations is not None:
            whole = plan.whole_sequence if plan is not None else set()
            skip = frozenset(k for k, name in enumerate(self.mixture.names) if name in whole)
            self.demonstrator = Demonstrator(demonstrations, seed, skip)
        self._reset(list(range(self.global_batch_size)), 0)
        if state is not None:
            self.set_state(state)

    @property
    def fingerprint(self) -> str:
        """The mixture's fingerprint (task names and sizes, eps, seed), plus the hold-out when there is one
        (without one it is the mixture's own, so states saved before hold-outs existed stay valid)."""
        tags = [holdout_tag(self.holdout)] if self.holdout is not None else []
        if self.demonstrator is not None:
            tags.append(self.demonstrator.tag)
        if not tags:
            return self.mixture.fingerprint
        text = "|".join([self.mixture.fingerprint, *tags])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def local_batch_size(self) -> int:
        return self._hi - self._lo

    def _reset(self, row_starts: Sequence[int], batches: int) -> None:
        self._slots = [
            _RowSlot(row_starts[r], Packer(self.seq_len, self.overlong, self.pack_stats))
            for r in range(self._lo, self._hi)
        ]
        # Tokenised examples of this process's rows that the stream has passed but a row has not packed yet.
        self._buffer: dict[int, TokenizedExample] = {}
        self.mixture.seek(min(slot.next_index for slot in self._slots))
        self._batches = batches

    # ------------------------------------------------------------------ state
    def get_state(self) -> dict:
        """JSON-able position: pass it to `set_state` (or `state=`) to continue with the same batches.
        Collective when process_count > 1."""
        starts = _gather([slot.resume_index for slot in self._slots], self.process_count, self._allgather)
        return {
            "kind": STATE_KIND,
            "version": STATE_VERSION,
            "row_starts": [int(i) for i in starts],
            "batches": self._batches,
            "fingerprint": self.fingerprint,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "overlong": self.overlong,
        }

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("kind") != STATE_KIND:
            raise DataError(f"not a TrainLoader state: {state!r:.200}")
        if state.get("version") not in (1, STATE_VERSION):
            raise DataError(f"TrainLoader state version {state.get('version')!r} is not 1 or {STATE_VERSION}")
        if state.get("fingerprint") != self.fingerprint:
            raise DataError(
                "TrainLoader state was saved for a different data stream (task names or sizes, "
                "data.eps, data.eval_holdout or seed changed), so its position means nothing here; "
                "start without the saved data state to begin the new stream from the start"
            )
        starts = _row_starts(state, self.global_batch_size)
        for key in ("seq_len", "global_batch_size", "overlong"):
            if state.get(key) != getattr(self, key):
                logger.warning(
                    "resuming data with %s=%r (state was saved with %r): the stream continues "
                    "where it was, but batches differ from an uninterrupted run",
                    key,
                    getattr(self, key),
                    state.get(key),
                )
        self._reset(starts, int(state.get("batches", 0)))

    # ------------------------------------------------------------------ iteration
    def _example(self, index: int) -> TokenizedExample:
        """Stream example `index` (one of this process's rows). Walks the stream past it if needed,
        tokenising the examples of this process's rows on the way, TOKENIZE_CHUNK at a time."""
        if index not in self._buffer:
            batch, local = self.global_batch_size, self.local_batch_size
            # Walk far enough to collect about TOKENIZE_CHUNK examples of local rows in one call.
            stop = max(index + 1, self.mixture.position + TOKENIZE_CHUNK * batch // local)
            wanted, examples = [], []
            while self.mixture.position < stop:
                i, task, j = self.mixture.advance()  # a task draw: other rows' examples are never read
                row = i % batch
                if self._lo <= row < self._hi and i >= self._slots[row - self._lo].next_index:
                    wanted.append(i)
                    examples.append(self.stream_example(i, task, j))
            self._buffer.update(zip(wanted, tokenize_examples(examples, self.tokenizer, self.add_bos)))
        return self._buffer.pop(index)

    def stream_example(self, index: int, task: int, j: int):
        """Example j of stream task `task`, drawn at stream `index` (with its demonstrations, if any)."""
        if self.demonstrator is None:
            return self.mixture.example(task, j)
        return self.demonstrator(index, task, j, self.mixture.task_examples(task))

    def mixture_counts(self) -> dict[str, int]:
        """Examples the stream has drawn so far per benchmark and slice of data.mixture ({} without one):
        from the stream's running task counts, the same on every process, so not collective. The stream
        runs a little ahead of the batches handed out (it tokenises in chunks)."""
        if self.plan is None:
            return {}
        return group_counts(self.plan, self.mixture.task_counts())

    def _next_row(self, slot: _RowSlot) -> tuple[list[TokenizedExample], int]:
        """The slot's next closed row and the sub-stream index a fresh packer would continue from after it."""
        step = self.global_batch_size
        while not slot.ready:
            index = slot.next_index
            rows = slot.packer.add(self._example(index))
            slot.next_index += step
            for k, row in enumerate(rows):
                # A row closes either because the example does not fit (it then starts the next row: resume
                # at `index`) or because the example filled it exactly (resume after it).
                filled_by_example = k == len(rows) - 1 and not slot.packer.pending
                slot.ready.append((row, index + step if filled_by_example else index))
        return slot.ready.popleft()

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = []
        for slot in self._slots:
            row, slot.resume_index = self._next_row(slot)
            rows.append(row_arrays(row, self.seq_len, self.tokenizer.pad_id))
        self._batches += 1
        return stack_rows(rows)


def _sum_pack_stats(stats: PackStats, process_count: int, allgather: Optional[AllGather]) -> PackStats:
    if process_count == 1:
        return stats
    # Every process sends every counter in the same order, whichever ones it has touched.
    totals = _gather([stats[k] for k in PACK_COUNTERS], process_count, allgather)
    totals = totals.reshape(process_count, len(PACK_COUNTERS)).sum(0)
    return PackStats({k: int(v) for k, v in zip(PACK_COUNTERS, totals) if v})


def _flat_stats(skip_stats: SkipStats, pack_stats: PackStats) -> dict[str, int]:
    out = {f"skipped/{k}": v for k, v in skip_stats.as_dict().items()}
    out.update({f"packed/{k}": v for k, v in pack_stats.as_dict().items()})
    return out


class EvalLoader(_PackingLoader):
    """One pass over a finite dataset (tasks by name, examples in file order). Example j goes to row j % B
    of the global batch (B rows), and each row packs its examples greedily like training; batch k holds
    every row's k-th packed row, or an all-padding row (loss_mask 0, segment_ids 0) for a row that has
    run out. A process tokenises only the examples of its own rows; every process yields the same number
    of batches (with several processes, one allgather per pass agrees on it). Iterating again starts
    over. The loss over a pass does not depend on the row layout (segments never attend to each other)."""

    def __init__(self, tasks: Mapping[str, Sequence[Example]], tokenizer: Tokenizer, **rows):
        """`rows`: global_batch_size, the layout and skip_stats, as _PackingLoader takes them."""
        super().__init__(tokenizer, **rows)
        self.tasks = {name: tasks[name] for name in sorted(tasks)}

    @property
    def num_examples(self) -> int:
        return sum(len(v) for v in self.tasks.values())

    def _pack_own_rows(self, packer_stats: PackStats) -> list[list[list[TokenizedExample]]]:
        """For each of this process's rows, its packed rows for the whole pass."""
        sequences = list(self.tasks.values())
        ends = np.cumsum([len(examples) for examples in sequences])
        out = []
        for row in range(self._lo, self._hi):
            packer = Packer(self.seq_len, self.overlong, packer_stats)
            mine = []  # examples row, row + B, ... of all tasks end to end, the only ones this row reads
            for j in range(row, self.num_examples, self.global_batch_size):
                task, i = locate(ends, j)
                mine.append(sequences[task][i])
            packed = []
            for start in range(0, len(mine), TOKENIZE_CHUNK):
                for example in tokenize_examples(
                    mine[start : start + TOKENIZE_CHUNK], self.tokenizer, self.add_bos
                ):
                    packed.extend(packer.add(example))
            last = packer.flush()
            if last is not None:
                packed.append(last)
            out.append(packed)
        return out

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        self.pack_stats = PackStats()
        rows = self._pack_own_rows(self.pack_stats)
        num_batches = int(_gather([max(map(len, rows))], self.process_count, self._allgather).max())
        pad_id = self.tokenizer.pad_id
        for k in range(num_batches):
            yield stack_rows(
                [
                    row_arrays(packed[k], self.seq_len, pad_id)
                    if k < len(packed)
                    else empty_row(self.seq_len, pad_id)
                    for packed in rows
                ]
            )
