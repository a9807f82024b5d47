"""Log-likelihood scoring: how likely the model finds each continuation of a context, computed exactly
as Hugging Face's OPTForCausalLM (float32) and lm-evaluation-harness's `hf` model score it, faster.

    scorer = Scorer(model, params, tokenizer)
    scorer.score([("The capital of France is", " Paris"), ...])      # -> [Score(logprob, tokens, is_greedy)]
    scorer.score_options("Q: 2 + 2 =", [" 3", " 4", " 5"])          # the context computed once

Conventions (lm_eval's): with text, the continuation's tokens are `encode(context + continuation)[
len(encode(context)):]`, trailing spaces of the context moving into the continuation; an empty context
is the BOS token; `add_bos` (default, as OPT's Hugging Face tokenizer does) starts every text with
`</s>`. A pair longer than the model's positions keeps its last `max_length + 1` tokens (the context
is cut from the left). `is_greedy`: every continuation token is the argmax of its position's logits.

How it is fast. Requests with the same (possibly truncated) context form one *unit*: a row segment
holding the context once, then each option's tokens but the last (an option's first token is
predicted by the context's last position, which all options share) as branches of that segment
(`model.SEGMENT_BRANCH_SHIFT`): each branch attends to the context and to itself only, with
positions continuing the context's. Units are packed greedily into rows of `row_length` tokens,
rows into batches split over the mesh's data-parallel axes; each batch is padded to a row-length
bucket and a scored-positions bucket (a bounded number of compiles), and the LM head runs only at
the scored positions. HF instead runs context + option through the model once per option and
projects every position onto the vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from optiml_jax.eval.generation import data_parallel_size, device_rows, prompt_buckets, to_host
from optiml_jax.model import branch_segment_ids, lm_head_logits
from optiml_jax.sharding import DEFAULT_RULES, on_mesh

DEFAULT_ROW_LENGTH = 512  # longer rows pack more units but attend across all of them (masked, still computed)
TokenIds = Sequence[int]
Pair = tuple[Union[str, TokenIds], Union[str, TokenIds]]


@dataclasses.dataclass(frozen=True)
class Score:
    logprob: float  # sum over the continuation's tokens of log p(token | everything before it)
    tokens: int  # continuation tokens scored
    is_greedy: bool  # greedy decoding would have produced exactly these tokens


def encode_pair(
    tokenizer, context: str, continuation: str, add_bos: bool = True
) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm_eval's TemplateLM splits a text pair."""
    if not context:
        ids = tokenizer.encode(continuation, add_bos=False)
        bos = tokenizer.bos_id
        return ([bos], ids) if not ids or ids[0] != bos else (ids[:1], ids[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_bos=add_bos)
    context_ids = tokenizer.encode(context, add_bos=add_bos)
    return context_ids, whole[len(context_ids) :]


@dataclasses.dataclass
class _Unit:
    """One context and the options scored after it: (request, option, option ids)."""

    context: tuple[int, ...]
    options: list[tuple[int, int, tuple[int, ...]]]

    @property
    def length(self) -> int:  # row slots: the context, then each option but its last token
        return len(self.context) + sum(len(ids) - 1 for _, _, ids in self.options)

    @property
    def scored(self) -> int:
        return sum(len(ids) for _, _, ids in self.options)


class Scorer:
    """Compiled log-likelihood scoring with one model (see the module doc). `batch_size` rows of
    `row_length` tokens per forward pass, split over the mesh's data-parallel devices."""

    def __init__(
        self,
        model,
        params,
        tokenizer=None,
        *,
        batch_size: int = 8,
        row_length: int = DEFAULT_ROW_LENGTH,
        max_length: Optional[int] = None,
        add_bos: bool = True,
        mesh=None,
        rules=DEFAULT_RULES,
    ):
        if batch_size < 1 or batch_size % data_parallel_size(mesh):
            raise ValueError(
                f"batch_size {batch_size} is not a positive multiple of the mesh's data-parallel "
                f"devices (data x fsdp = {data_parallel_size(mesh)})"
            )
        self.model = model.clone(remat_policy="none") if model.remat_policy != "none" else model
        self.params = nn.meta.unbox(params)
        self.tokenizer, self.batch_size, self.add_bos = tokenizer, batch_size, add_bos
        self.max_length = max_length or model.config.max_position_embeddings
        self.row_length = max(16, row_length)
        self.mesh, self.rules = mesh, rules
        self.shapes: set[tuple[int, int]] = set()  # (row length, scored positions) of the batches run

    # ------------------------------------------------------------------ public API
    def score(self, pairs: Sequence[Pair]) -> list[Score]:
        """One Score per (context, continuation) pair, as text or token ids."""
        encoded = [self._encode(context, continuation) for context, continuation in pairs]
        groups = [(context, [continuation]) for context, continuation in encoded]
        return [scores[0] for scores in self.score_groups(groups)]

    def score_options(
        self, context: Union[str, TokenIds], options: Sequence[Union[str, TokenIds]]
    ) -> list[Score]:
        """One Score per option continuing the same context (computed once)."""
        encoded = [self._encode(context, option) for option in options]
        return self.score_groups([(encoded[0][0], [ids for _, ids in encoded])])[0] if encoded else []

    def score_groups(self, groups: Sequence[tuple[TokenIds, Sequence[TokenIds]]]) -> list[list[Score]]:
        """Token ids: for each (context, [continuation, ...]) group, one Score per continuation."""
        units = self._units(groups)
        results = [[None] * len(options) for _, options in groups]
        rows = _pack(units, self.row_length)
        pending = None
        with self._mesh_context():
            for start in range(0, len(rows), self.batch_size):
                batch_rows = rows[start : start + self.batch_size]
                outputs = self._dispatch(batch_rows)
                if pending is not None:
                    self._collect(*pending, results)
                pending = (batch_rows, outputs)
            if pending is not None:
                self._collect(*pending, results)
        return results

    # ------------------------------------------------------------------ internals
    def _encode(self, context, continuation) -> tuple[list[int], list[int]]:
        if isinstance(context, str) or isinstance(continuation, str):
            if not (isinstance(context, str) and isinstance(continuation, str)) or self.tokenizer is None:
                raise TypeError(
                    "give context and continuation both as text (with a tokenizer) or both as token ids"
                )
            return encode_pair(self.tokenizer, context, continuation, self.add_bos)
        return [int(t) for t in context], [int(t) for t in continuation]

    def _units(self, groups) -> list[_Unit]:
        """Requests by (truncated) context, split where a unit would not fit in the longest row."""
        limit, vocab = self.max_length, self.model.config.vocab_size
        by_context: dict[tuple[int, ...], _Unit] = {}
        for g, (context, options) in enumerate(groups):
            for o, option in enumerate(options):
                option = tuple(int(t) for t in option)
                if not option:
                    raise ValueError(f"request {g}: the continuation has no tokens")
                if len(option) > limit:
                    raise ValueError(
                        f"request {g}: a continuation of {len(option)} tokens exceeds the model's "
                        f"{limit} positions"
                    )
                if any(not 0 <= t < vocab for t in (*context, *option)):
                    raise ValueError(f"request {g}: a token id outside [0, {vocab})")
                # lm_eval: the input is (context + option)[-(limit + 1):][:-1]
                kept = tuple(context)[max(0, len(context) + len(option) - limit - 1) :]
                if not kept:
                    raise ValueError(f"request {g}: an empty context (give at least one token, e.g. BOS)")
                by_context.setdefault(kept, _Unit(kept, [])).options.append((g, o, option))
        units = []
        for unit in by_context.values():
            current = _Unit(unit.context, [])
            for option in unit.options:
                if current.options and current.length + len(option[2]) - 1 > max(self.row_length, limit):
                    units.append(current)
                    current = _Unit(unit.context, [])
                current.options.append(option)
            units.append(current)
        return units

    def _buckets(self, rows) -> tuple[int, int]:
        longest = max(sum(u.length for u in row) for row in rows)
        scored = max(sum(u.scored for u in row) for row in rows)
        length = next(b for b in prompt_buckets(max(self.row_length, self.max_length)) if b >= longest)
        return length, next(b for b in _scored_buckets(length) if b >= scored)

    def _dispatch(self, rows):
        length, scored = self._buckets(rows)
        self.shapes.add((length, scored))
        arrays = _row_arrays(
            rows, self.batch_size, length, scored, self.tokenizer.pad_id if self.tokenizer else 1
        )
        arrays = {k: device_rows(v, self.mesh, self.rules) for k, v in arrays.items()}
        return _score_compiled(self.model, self.params, **arrays)

    def _collect(self, rows, outputs, results):
        logprobs, greedy = (to_host(x) for x in outputs)
        for r, row in enumerate(rows):
            k = 0
            for unit in row:
                for g, o, ids in unit.options:
                    n = len(ids)
                    results[g][o] = Score(
                        float(logprobs[r, k : k + n].sum(dtype=np.float64)),
                        n,
                        bool(greedy[r, k : k + n].all()),
                    )
                    k += n

    def _mesh_context(self):

        return on_mesh(self.mesh, self.rules)


def _scored_buckets(length: int) -> tuple[int, ...]:
    buckets, size = [], 16
    while size < length:
        buckets.append(size)
        size *= 2
    return tuple(buckets) + (length,)


def _pack(units: list[_Unit], row_length: int) -> list[list[_Unit]]:
    """Units, longest first, into rows of at most row_length slots (a longer unit gets a row to itself)."""
    rows, used = [], 0
    for unit in sorted(units, key=lambda u: -u.length):
        if rows and used + unit.length <= row_length:
            rows[-1].append(unit)
            used += unit.length
        else:
            rows.append([unit])
            used = unit.length
    return rows


def _row_arrays(rows, batch_size: int, length: int, scored: int, pad_id: int) -> dict[str, np.ndarray]:
    """The model inputs of a batch of packed rows and where to read its scores (dummy rows at the end)."""
    ids = np.full((batch_size, length), pad_id, np.int32)
    positions = np.zeros((batch_size, length), np.int32)
    segments = np.zeros((batch_size, length), np.int32)
    valid = np.zeros((batch_size, length), np.int32)
    score_at = np.zeros((batch_size, scored), np.int32)
    targets = np.zeros((batch_size, scored), np.int32)
    for r, row in enumerate(rows):
        slot, k = 0, 0
        for u, unit in enumerate(row, start=1):
            n = len(unit.context)
            ids[r, slot : slot + n], positions[r, slot : slot + n] = unit.context, np.arange(n)
            segments[r, slot : slot + n] = u
            last_context_slot = slot + n - 1
            slot += n
            for b, (_, _, option) in enumerate(unit.options, start=1):
                m = len(option) - 1  # inputs: all but the last token
                ids[r, slot : slot + m], positions[r, slot : slot + m] = option[:-1], n + np.arange(m)
                segments[r, slot : slot + m] = branch_segment_ids(u, b)
                score_at[r, k], score_at[r, k + 1 : k + 1 + m] = last_context_slot, slot + np.arange(m)
                targets[r, k : k + m + 1] = option
                slot, k = slot + m, k + m + 1
        valid[r, :slot] = 1
    return {
        "input_ids": ids,
        "positions": positions,
        "segment_ids": segments,
        "valid": valid,
        "score_at": score_at,
        "targets": targets,
    }


@functools.partial(jax.jit, static_argnames=("model",))
def _score_compiled(model, params, input_ids, positions, segment_ids, valid, score_at, targets):
    """(log p(target), target == argmax) at each scored position [batch, scored]."""
    hidden = model.apply(
        {"params": params},
        input_ids,
        attention_mask=valid,
        position_ids=positions,
        segment_ids=segment_ids,
        return_hidden=True,
        segment_branches=True,
    )
    picked = jnp.take_along_axis(hidden, score_at[..., None], axis=1)  # [batch, scored, embed]
    batch, scored, embed = picked.shape
    logits = lm_head_logits(model, params, picked.reshape(batch * scored, embed)).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    flat_targets = targets.reshape(-1, 1)
    chosen = jnp.take_along_axis(log_probs, flat_targets, axis=-1)[:, 0]
    greedy = jnp.argmax(logits, axis=-1) == flat_targets[:, 0]
    return chosen.reshape(batch, scored), greedy.reshape(batch, scored)


def score(model, params, tokenizer, pairs: Sequence[Pair], **options) -> list[Score]:
    """`Scorer(model, params, tokenizer, **options).score(pairs)`."""
    return Scorer(model, params, tokenizer, **options).score(pairs)
