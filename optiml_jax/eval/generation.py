"""Greedy generation of many prompts for evaluation: length-sorted, in a few fixed shapes, data-parallel.

Prompts are sorted by length (longest first, so a batch that does not fit in memory fails at once) and
cut into batches of `batch_size`; each batch is left-padded to the smallest of a few prompt-length
buckets (from 64, growing by 2**(1/4), up to the longest prompt the context allows), the last batch is filled
with one-token dummy prompts, and the new-token budget is fixed for the run. So at most
`len(prompt_buckets(...))` programs are compiled, however many prompts there are.

Data parallelism: with a mesh, every batch is one global array split by rows over the mesh's
data-parallel axes (`data` and `fsdp`; params are sharded by the same logical rules as in training).
Every process builds the same batches (the plan depends only on the prompts) and holds the rows of its
own devices; the generated tokens are then gathered to every process. The same call therefore serves
one CPU, a GPU box and a multi-host launch.

A prompt longer than the context allows (max_position_embeddings - max_new_tokens) keeps its last
tokens: the end of an instruction prompt is the instance and the answer cue. Such prompts are counted.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from optiml_jax.generate import (
    GenerationConfig,
    complete_texts,
    cut_at_stop,
    generate_padded,
    left_pad,
    round_up,
    stop_token_mask,
)
from optiml_jax.sharding import DEFAULT_RULES, batch_sharding, on_mesh

SMALLEST_BUCKET = 64


@dataclasses.dataclass
class GenerationStats:
    prompts: int = 0
    truncated: int = 0  # prompts cut from the left to fit the context
    batches: int = 0
    programs: int = 0  # distinct batch shapes run (each compiled once per process, unless already cached)
    new_tokens: int = 0  # generated, EOS and stop tokens included
    seconds: float = 0.0

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["instances_per_s"] = round(self.prompts / self.seconds, 3) if self.seconds else 0.0
        out["seconds"] = round(self.seconds, 3)
        return out


def prompt_buckets(room: int, smallest: int = SMALLEST_BUCKET) -> tuple[int, ...]:
    """Padded prompt lengths for prompts of at most `room` tokens: `smallest`, then growing by 2**(1/4)
    (rounded up to a multiple of 32), then `room`. A batch wastes at most 19% of its prompt slots on
    bucket padding, with about 4 programs per doubling of prompt length (power-of-two buckets wasted
    up to 50%, which on CPU cost 1.4x the prefill time of HF's exact padding)."""
    buckets, k = [], 0
    while True:
        length = round_up(math.ceil(smallest * 2 ** (k / 4)), 32)
        if length >= room:
            break
        if not buckets or length > buckets[-1]:
            buckets.append(length)
        k += 1
    return tuple(buckets) + (room,)


def data_parallel_size(mesh) -> int:
    return 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]


def device_rows(array: np.ndarray, mesh, rules=DEFAULT_RULES):
    """A [batch, length] host array (the same on every process) as a device array split by rows like the
    model's inputs (sharding.batch_sharding); one device without a mesh."""
    if mesh is None:
        return jnp.asarray(array)
    return jax.make_array_from_callback(array.shape, batch_sharding(mesh, rules), lambda index: array[index])


def to_host(array) -> np.ndarray:
    if jax.process_count() > 1 and not array.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(array)


def generate_completions(
    model, params, tokenizer, prompts: Sequence[Sequence[int]], *, stop: Sequence[str] = (), **decoding
) -> tuple[list[str], list[bool], GenerationStats]:
    """Completions of token-id `prompts`, in their order: (texts, truncated flags, stats).

    `decoding` is `generate_token_ids`' keyword arguments: `max_new_tokens` and `batch_size` (both
    required), `mesh`, `rules`, `progress` (and `temperature`, `seed`: greedy by default). A completion
    ends at EOS or after `max_new_tokens`; it is decoded with the prompt (so a character split across the
    boundary comes out whole), cut before the first of the `stop` strings, and stripped.
    """
    stop = [s for s in stop if s]
    new_ids, kept, truncated, stats = generate_token_ids(
        model, params, tokenizer, prompts, stop=stop, **decoding
    )
    texts = [cut_at_stop(text, stop).strip() for text in complete_texts(tokenizer, kept, new_ids)]
    return texts, truncated, stats


def generate_token_ids(
    model,
    params,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    stop: Sequence[str] = (),
    mesh=None,
    rules=DEFAULT_RULES,
    progress: bool = False,
    temperature: float = 0.0,
    seed: int = 0,
):
    """(new token ids without EOS, the prompts as kept, truncated flags, stats) for token-id `prompts`,
    in their order; greedy unless `temperature` > 0. A row ends early at a token whose text holds a
    `stop` string (the ids keep it: cut the text afterwards)."""
    config = model.config
    room = config.max_position_embeddings - max_new_tokens
    if room < 1:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
            f"{config.max_position_embeddings} positions"
        )
    if batch_size < 1 or batch_size % data_parallel_size(mesh):
        raise ValueError(
            f"the evaluation batch size {batch_size} is not a positive multiple of the mesh's "
            f"data-parallel devices (data x fsdp = {data_parallel_size(mesh)})"
        )
    cut = [list(p)[-room:] for p in prompts]
    if any(not p for p in cut):
        raise ValueError("an evaluation prompt encodes to no tokens")
    truncated = [len(p) > room for p in prompts]
    stats = GenerationStats(prompts=len(cut), truncated=sum(truncated))
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
        temperature=temperature,
        seed=seed,
    )
    stop_mask = jnp.asarray(stop_token_mask(tokenizer, [s for s in stop if s], config.vocab_size))
    decoder = model.clone(remat_policy="none") if model.remat_policy != "none" else model
    params = nn.meta.unbox(params)
    buckets = prompt_buckets(room)
    order = sorted(range(len(cut)), key=lambda i: -len(cut[i]))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    new_ids: list[Optional[list[int]]] = [None] * len(cut)
    shapes = set()
    bar = None
    if progress and jax.process_index() == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cut), desc="generate", unit="prompt", dynamic_ncols=True)

    def dispatch(rows, index):
        batch_prompts = [cut[i] for i in rows] + [[tokenizer.eos_id]] * (batch_size - len(rows))
        length = next(b for b in buckets if b >= max(len(p) for p in batch_prompts))
        shapes.add(length)
        ids, mask = left_pad(batch_prompts, tokenizer.pad_id, length)
        batch_config = dataclasses.replace(gen_config, seed=seed + index) if temperature else gen_config
        return generate_padded(
            decoder,
            params,
            device_rows(ids, mesh, rules),
            device_rows(mask, mesh, rules),
            batch_config,
            stop_mask=stop_mask,
        )

    def collect(rows, outputs):
        tokens, _, lengths = outputs
        tokens, lengths = to_host(tokens), to_host(lengths)
        for r, i in enumerate(rows):
            ids = tokens[r, : lengths[r]].tolist()
            stats.new_tokens += len(ids)
            # ids past the tokenizer (the embedding's padding rows) have no text
            new_ids[i] = [t for t in ids if t != tokenizer.eos_id and t < tokenizer.vocab_size]
        if bar is not None:
            bar.update(len(rows))

    start = time.perf_counter()
    try:
        with on_mesh(mesh, rules):
            pending = None
            for index, rows in enumerate(batches):  # dispatch the next batch before reading the last one
                outputs = dispatch(rows, index)
                if pending is not None:
                    collect(*pending)
                pending = (rows, outputs)
            if pending is not None:
                collect(*pending)
    finally:
        if bar is not None:
            bar.close()
    stats.seconds = time.perf_counter() - start
    stats.batches, stats.programs = len(batches), len(shapes)
    return new_ids, cut, truncated, stats
