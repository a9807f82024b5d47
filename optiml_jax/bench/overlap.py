"""13-gram overlap between train and evaluation tasks (spec §4): for every (train task, evaluation task)
pair, the fraction of the evaluation task's examples sharing any 13-gram (whitespace tokens of the
prompt + output, lowercased) with any of the train task's examples.

Only the evaluation side is held: its n-grams as 64-bit hashes, sorted, each with the evaluation
examples that contain it (EvalIndex). The train side is streamed a task at a time (by the build's worker
processes, forked after the index is built, so they share it): a task's n-gram hashes are looked up in
the index with one vectorised search, and only the indices of the hashes found come back.

Tokens are hashed with Python's `hash` (salted per interpreter: the index and the lookups must run in
one process tree, forked, which the build does); an n-gram's hash is a polynomial of its 13 tokens'
hashes modulo 2^64. A false match needs a 64-bit collision: ~1e-2 expected over the real bench's
~4e9 train n-grams against ~6e7 evaluation ones."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

NGRAM = 13
_BASE = np.uint64(1_000_003)


def ngram_hashes(texts: list[str], n: int = NGRAM) -> tuple[np.ndarray, np.ndarray]:
    """(hashes, owner): the hash of every n-gram of every text (uint64) and the index of its text."""
    tokens = [text.lower().split() for text in texts]
    lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
    total = int(lengths.sum())
    codes = np.fromiter(map(hash, itertools.chain.from_iterable(tokens)), dtype=np.int64, count=total)
    codes = codes.view(np.uint64)
    windows = total - n + 1
    if windows <= 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    hashes = np.zeros(windows, np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            hashes = hashes * _BASE + codes[k : k + windows]
    owner = np.repeat(np.arange(len(texts), dtype=np.int64), lengths)
    inside = owner[:windows] == owner[n - 1 :]  # the window starts and ends in the same text
    return hashes[inside], owner[:windows][inside]


@dataclasses.dataclass
class EvalIndex:
    """The evaluation side: sorted unique n-gram hashes; for hash i, the examples
    `examples[starts[i]:starts[i + 1]]`; each example's task (`example_task`), each task's size."""

    hashes: np.ndarray
    starts: np.ndarray
    examples: np.ndarray
    example_task: np.ndarray
    task_sizes: np.ndarray
    task_names: list

    @classmethod
    def build(cls, texts_by_task: dict[str, list[str]]) -> "EvalIndex":
        names = list(texts_by_task)
        texts = [t for name in names for t in texts_by_task[name]]
        sizes = np.array([len(texts_by_task[name]) for name in names], dtype=np.int64)
        example_task = np.repeat(np.arange(len(names), dtype=np.int32), sizes)
        hashes, owner = ngram_hashes(texts)
        order = np.argsort(hashes, kind="stable")  # an n-gram repeated in an example: counted once later
        unique, starts = np.unique(hashes[order], return_index=True)
        return cls(
            hashes=unique,
            starts=np.append(starts, len(order)).astype(np.int64),
            examples=owner[order].astype(np.int32),
            example_task=example_task,
            task_sizes=sizes,
            task_names=names,
        )

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.hashes, self.starts, self.examples, self.example_task))

    def matches(self, texts: list[str]) -> np.ndarray:
        """Indices (into `hashes`) of the evaluation n-grams that `texts` contain."""
        if not len(self.hashes):
            return np.zeros(0, np.int64)
        hashes = ngram_hashes(texts)[0]  # not made unique first: a search is cheaper than the sort
        where = np.minimum(np.searchsorted(self.hashes, hashes), len(self.hashes) - 1)
        return np.unique(where[self.hashes[where] == hashes])

    def fractions(self, matched: np.ndarray, skip_task: str = "") -> dict[str, float]:
        """{evaluation task: fraction of its examples holding one of the `matched` n-grams}, for the
        tasks with any (`skip_task`, a fully supervised task's own held-out instances, left out)."""
        if not len(matched):
            return {}
        lengths = self.starts[matched + 1] - self.starts[matched]
        offsets = np.repeat(self.starts[matched] - np.cumsum(lengths) + lengths, lengths)
        examples = np.unique(self.examples[np.arange(int(lengths.sum())) + offsets])
        counts = np.bincount(self.example_task[examples], minlength=len(self.task_names))
        return {
            self.task_names[t]: counts[t] / self.task_sizes[t]
            for t in np.flatnonzero(counts)
            if self.task_names[t] != skip_task
        }
