"""Tokenising (src, tgt) pairs and greedily packing whole examples into fixed-length rows.

Token layout of one example (OPT-IML, opt_formats.md §5.1):

    tokens = encode(src.rstrip(" "), add_bos=False) + encode(" " + tgt.rstrip(), add_bos=False) + [eos]

No BOS (metaseq fine-tuning data has none; tokenizer.PROMPT_ADD_BOS, the prompt convention evaluation
and generation share). metaseq encodes the joined string and finds the boundary as
`len(encode(src))`; we encode the two halves separately and concatenate, so the boundary is exact by
construction: a BPE merge across the joining space can never move target text into the "source" part.
With GPT-2's pre-tokenizer the space attaches to the first target word either way, so the ids are the
same in practice.

Row layout. Within each example, input = tokens[:-1] and target = tokens[1:], so an example of n tokens
takes n - 1 slots of a row and no target ever crosses into the next example. The loss mask is 1 where
the target is a target-side token, including the final `</s>`. This is metaseq's block of
`seq_len + 1` tokens minus, per example, the slot where `</s>` is an *input* whose target (the next
example's first source token, or padding) is always masked out: same loss, one slot saved per example.
Each packed row (numpy, length seq_len):

    input_ids   int32  token ids, pad_id (1) after the last example
    targets     int32  next-token ids, pad_id on padding
    loss_mask   float32 1.0 on target tokens (tgt + </s>), 0.0 on source tokens and padding; 1.0 on
                every predicted token of a whole-sequence example (num_source 0: data.mixture's
                `loss: all` text) and on a source's `loss_spans` (demonstrations' outputs, loss: suffix)
    segment_ids int32  1, 2, 3, ... per example in the row; 0 = padding
    positions   int32  0, 1, 2, ... restarting for each example (the model adds OPT's offset 2); 0 on pads

Greedy packing: examples are appended in stream order while they fit; an example that does not fit
closes the row (the rest is padded) and starts the next one. A row that becomes exactly full is closed
at once. Nothing is reordered, so the rows are a pure function of the example sequence.

Overlong examples (more than seq_len + 1 tokens) are cut from the LEFT of the source, keeping the
whole target and `</s>` (the paper's behaviour, IML §3.3), as long as at least one source token is left
to predict the first target token. If the target alone does not fit (tgt + `</s>` > seq_len tokens),
`overlong="drop"` drops the example and `overlong="truncate"` keeps the last source token and the first
seq_len target tokens (the `</s>` is lost). Each case is counted in `PackStats`.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Optional, Protocol, Sequence

import numpy as np

from optiml_jax.tokenizer import PROMPT_ADD_BOS

OVERLONG_CHOICES = ("truncate", "drop")
BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


class Tokenizer(Protocol):
    eos_id: int
    pad_id: int
    bos_id: int

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str], add_bos: bool = True) -> list[list[int]]: ...


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
    tokens: tuple[int, ...]  # source ids + target ids + eos
    num_source: int  # how many leading tokens are source (no loss when predicted)
    source: str = ""  # where the example came from, for messages
    # [start, end) token ranges of the source trained on all the same (demonstrations' outputs, loss: suffix)
    loss_spans: tuple[tuple[int, int], ...] = ()


# What PackStats counts (tokens = row slots holding an example).
PACK_COUNTERS = (
    "examples",
    "rows",
    "tokens",
    "loss_tokens",
    "pad_tokens",
    "source_truncated",
    "target_truncated",
    "overlong_dropped",
    "empty_dropped",
)


class PackStats(Counter):
    """Counts of PACK_COUNTERS."""

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.items()))


def tokenize_examples(
    examples: Sequence, tokenizer: Tokenizer, add_bos: bool = PROMPT_ADD_BOS
) -> list[TokenizedExample]:
    """`examples` have `.src`, `.tgt` and `.source` (sources.Example). See the module doc for the layout.

    Two optional attributes change the loss: `whole_sequence` (True: every token is trained on, as the
    pre-training text of data.mixture's `loss: all` slices) and `src_pieces` ((text, trained) pairs
    making up `src`, each encoded on its own like src and tgt: demonstrations whose outputs are trained
    on, see demonstrations.py). `add_bos`: `</s>` before each source (data.add_bos; the prompt convention)."""
    pieces = [getattr(e, "src_pieces", None) or ((e.src, False),) for e in examples]
    srcs = []
    for p in pieces:
        srcs.extend(text for text, _ in p[:-1])
        srcs.append(p[-1][0].rstrip(" "))
    tgts = [" " + e.tgt.rstrip() for e in examples]
    src_ids = tokenizer.encode_batch(srcs, add_bos=add_bos) if srcs else []
    tgt_ids = tokenizer.encode_batch(tgts, add_bos=False) if tgts else []
    eos, out, k = tokenizer.eos_id, [], 0
    for e, p, t in zip(examples, pieces, tgt_ids):
        source, spans = [], []
        for (_, trained), ids in zip(p, src_ids[k : k + len(p)]):
            if trained and ids:
                spans.append((len(source), len(source) + len(ids)))
            source.extend(ids)
        k += len(p)
        num_source = 0 if getattr(e, "whole_sequence", False) else len(source)
        out.append(TokenizedExample((*source, *t, eos), num_source, e.source, tuple(spans)))
    return out


def fit_to_length(
    example: TokenizedExample, seq_len: int, overlong: str, stats: Optional[PackStats] = None
) -> Optional[TokenizedExample]:
    """The example cut to at most seq_len + 1 tokens (seq_len row slots), or None if dropped."""
    tokens, num_source = example.tokens, example.num_source
    limit = seq_len + 1
    if len(tokens) < 2:
        # Nothing to predict (an empty source and a target that encoded to no ids).
        _count(stats, "empty_dropped")
        return None
    if len(tokens) <= limit:
        return example
    num_target = len(tokens) - num_source  # includes eos
    keep_source = limit - num_target
    if num_source >= 1 and keep_source >= 1:
        _count(stats, "source_truncated")
        cut = num_source - keep_source
        return dataclasses.replace(
            example, tokens=tokens[cut:], num_source=keep_source, loss_spans=_shift(example.loss_spans, cut)
        )
    if overlong == "drop":
        _count(stats, "overlong_dropped")
        return None
    _count(stats, "target_truncated")
    keep_source = min(1, num_source)
    start = num_source - keep_source
    return dataclasses.replace(
        example, tokens=tokens[start : start + limit], num_source=keep_source, loss_spans=()
    )


def _shift(spans: tuple[tuple[int, int], ...], cut: int) -> tuple[tuple[int, int], ...]:
    """Loss spans after cutting `cut` tokens from the left (the first token left is never predicted)."""
    shifted = ((max(a - cut, 1), b - cut) for a, b in spans)
    return tuple((a, b) for a, b in shifted if a < b)


def _count(stats: Optional[PackStats], key: str) -> None:
    if stats is not None:
        stats[key] += 1


class Packer:
    """Greedy packer. `add()` returns the rows (lists of examples) closed by adding one example.

    Rows are returned as lists of `TokenizedExample`s; `row_arrays` turns one into arrays, so a host
    only builds the arrays of the rows it keeps.
    """

    def __init__(self, seq_len: int, overlong: str = "truncate", stats: Optional[PackStats] = None):
        if overlong not in OVERLONG_CHOICES:
            raise ValueError(f"overlong must be one of {OVERLONG_CHOICES}, got {overlong!r}")
        self.seq_len = seq_len
        self.overlong = overlong
        self.stats = stats if stats is not None else PackStats()
        self._row: list[TokenizedExample] = []
        self._used = 0

    @property
    def pending(self) -> bool:
        return bool(self._row)

    def add(self, example: TokenizedExample) -> list[list[TokenizedExample]]:
        example = fit_to_length(example, self.seq_len, self.overlong, self.stats)
        if example is None:
            return []
        closed = []
        slots = len(example.tokens) - 1
        if self._used + slots > self.seq_len:
            closed.append(self._close())
        self._row.append(example)
        self._used += slots
        self.stats["examples"] += 1
        if self._used == self.seq_len:
            closed.append(self._close())
        return closed

    def flush(self) -> Optional[list[TokenizedExample]]:
        """The partly filled row, if any (eval uses it; training never does)."""
        return self._close() if self._row else None

    def reset(self) -> None:
        self._row, self._used = [], 0

    def _close(self) -> list[TokenizedExample]:
        row = self._row
        self.stats["rows"] += 1
        self.stats["pad_tokens"] += self.seq_len - self._used
        self.stats["tokens"] += self._used
        self.stats["loss_tokens"] += sum(loss_tokens(e) for e in row)
        self.reset()
        return row


def loss_tokens(example: TokenizedExample) -> int:
    """How many of the example's row slots are trained on."""
    spans = sum(b - a for a, b in example.loss_spans)
    return len(example.tokens) - max(example.num_source, 1) + spans


def row_arrays(row: Sequence[TokenizedExample], seq_len: int, pad_id: int = 1) -> dict[str, np.ndarray]:
    """The arrays of one packed row (see the module doc); an empty `row` is an all-padding row."""
    out = empty_row(seq_len, pad_id)
    offset = 0
    for segment, example in enumerate(row, start=1):
        tokens = np.asarray(example.tokens, dtype=np.int32)
        n = len(tokens) - 1
        end = offset + n
        if end > seq_len:
            raise ValueError(f"row overflows seq_len={seq_len} at {example.source or 'an example'}")
        out["input_ids"][offset:end] = tokens[:-1]
        out["targets"][offset:end] = tokens[1:]
        # Slot i predicts token i + 1, a target token iff i + 1 >= num_source.
        out["loss_mask"][offset + max(example.num_source - 1, 0) : end] = 1.0
        for a, b in example.loss_spans:
            out["loss_mask"][offset + a - 1 : offset + b - 1] = 1.0
        out["segment_ids"][offset:end] = segment
        out["positions"][offset:end] = np.arange(n, dtype=np.int32)
        offset = end
    return out


def empty_row(seq_len: int, pad_id: int = 1) -> dict[str, np.ndarray]:
    return {
        "input_ids": np.full(seq_len, pad_id, np.int32),
        "targets": np.full(seq_len, pad_id, np.int32),
        "loss_mask": np.zeros(seq_len, np.float32),
        "segment_ids": np.zeros(seq_len, np.int32),
        "positions": np.zeros(seq_len, np.int32),
    }


def stack_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.stack([r[key] for r in rows]) for key in BATCH_KEYS}
