"""Text generation with a KV cache: greedy or sampled (temperature, top-k, top-p), batched, left-padded.

The whole of one `generate` call -- the prompt pass (prefill) and every decode step -- is one jitted
function: the KV cache is preallocated at its final length and the decode loop runs over fixed shapes,
so nothing recompiles from one token to the next. Between calls, the prompt length and the new-token
budget are rounded up to buckets (`PROMPT_BUCKET`, `NEW_TOKENS_BUCKET`), so a different prompt or
`max_new_tokens` within the same buckets reuses the compiled program; only a new batch size, bucket,
model, greedy/sampling switch, loop or cache layout compiles again.

How the loop runs is chosen per platform (`decode_plan`; GenerationConfig.loop / .cache_layout
override it, and every choice gives the same tokens):
  * loop "while": a `lax.while_loop` that ends once every row has finished. XLA on GPU copies its
    predicate to the host at every token, stalling the launch of the next step; "fixed" instead runs
    every step of the bucket's capacity with finished rows (and steps past max_new_tokens) masked:
    no host round-trip, at the price of the steps after the last EOS and up to NEW_TOKENS_BUCKET - 1
    past the budget (ask for a multiple of it to waste none).
  * cache layout "cpu" or "standard": see `OPTAttention._update_cache`.
Weights are cast to the compute dtype once per call, before the loop: the modules cast them at each
use, which inside the loop meant reading (and converting) float32 weights at every step.

Semantics follow Hugging Face `generate`: prompts are left-padded with `pad_token_id`, generation stops
for a row at its EOS (which is kept), later positions of a finished row hold `pad_token_id`, and the
loop ends when every row has finished or `max_new_tokens` are produced. `repetition_penalty` is HF's
RepetitionPenaltyLogitsProcessor: the logit of every token already in the row (its prompt, padding
excluded, and what it generated) is divided by the penalty when positive and multiplied when negative.
Sampling then applies temperature, top-k, then top-p, as HF's logits warpers do. The log-probability
returned for each generated token is under the model's own distribution (log-softmax of the raw
logits), before any of that.

The command line (`optiml-generate`, `python -m optiml_jax.generate`) is optiml_jax/cli/generate.py.
Prompts are encoded without a leading `</s>`, as fine-tuning and evaluation encode them; `add_bos`
(`--add-bos`) prepends it as transformers' OPT tokenizer does (docs/evaluation.md, "Prompt convention").
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from optiml_jax.checkpoints import mapping as weights
from optiml_jax.config import is_whole_number
from optiml_jax.model import OPTForCausalLM, lm_head_logits, positions_from_mask
from optiml_jax.model.opt import CACHE_LAYOUTS

# Prompts are left-padded to a multiple of this, and the new-token budget is rounded up to a multiple
# of NEW_TOKENS_BUCKET: the compiled program depends on these rounded shapes only.
PROMPT_BUCKET = 32
NEW_TOKENS_BUCKET = 32

LOOPS = ("auto", "while", "fixed")
# On CPU (2 cores, OPT-125m shapes, 30-token prompts) the two loops cost the same per step (batch 1:
# 15.4 vs 15.0 ms/token, batch 8: 26.7 vs 28.1, 64 new tokens), so the while loop's early stop at the
# last EOS and at the budget wins (20 new tokens: 16.6 vs 25.3 ms/token, the fixed loop running 31).
CPU_LOOP = "while"


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """How to pick tokens. `temperature == 0` is greedy; otherwise tokens are sampled.
    `loop` and `cache_layout` say how the decode loop runs ("auto": per platform, see decode_plan)."""

    max_new_tokens: int = 20
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    seed: int = 0
    eos_token_id: Optional[int] = 2  # None: never stop early
    pad_token_id: int = 1
    min_new_tokens: int = 0  # EOS cannot be picked before this many tokens (as HF's min_new_tokens)
    repetition_penalty: float = 1.0  # HF's; 1.0: off
    loop: str = "auto"  # LOOPS
    cache_layout: str = "auto"  # "auto" or one of model.opt.CACHE_LAYOUTS

    def __post_init__(self):
        if not is_whole_number(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not is_whole_number(self.min_new_tokens) or self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be a non-negative integer, got {self.min_new_tokens!r}")
        if (
            not isinstance(self.temperature, (int, float))
            or not math.isfinite(self.temperature)
            or self.temperature < 0
        ):
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if not is_whole_number(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not self.do_sample and (self.top_k or self.top_p < 1.0):
            raise ValueError("top_k / top_p only apply when sampling; set temperature > 0")
        if not is_whole_number(self.seed) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if (
            isinstance(self.repetition_penalty, bool)
            or not isinstance(self.repetition_penalty, (int, float))
            or not math.isfinite(self.repetition_penalty)
            or self.repetition_penalty <= 0
        ):
            raise ValueError(
                f"repetition_penalty must be a number > 0 (1.0 = off), got {self.repetition_penalty!r}"
            )
        if self.loop not in LOOPS:
            raise ValueError(f"loop must be one of {', '.join(LOOPS)}, got {self.loop!r}")
        if self.cache_layout not in ("auto", *CACHE_LAYOUTS):
            raise ValueError(
                f"cache_layout must be one of auto, {', '.join(CACHE_LAYOUTS)}, got {self.cache_layout!r}"
            )

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0


@dataclasses.dataclass
class GenerationOutput:
    """Generated tokens of a batch, in prompt order.

    tokens: [batch, max_new_tokens] ids; after a row's EOS (included) the row holds pad_token_id.
    logprobs: [batch, max_new_tokens] log p(token) under the unmodified model; 0 after the EOS.
    lengths: [batch] tokens generated per row, its EOS included.
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray

    def token_ids(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]

    def token_logprobs(self) -> list[list[float]]:
        return [row[:n].tolist() for row, n in zip(self.logprobs, self.lengths)]


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def left_pad(
    prompts: Sequence[Sequence[int]], pad_token_id: int, length: int
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask), each [len(prompts), length], every prompt right-aligned after padding."""
    ids = np.full((len(prompts), length), pad_token_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids[row, length - len(prompt) :] = prompt
            mask[row, length - len(prompt) :] = 1
    return ids, mask


def generate(
    model: OPTForCausalLM,
    params: Any,
    prompts,
    config: Optional[GenerationConfig] = None,
    *,
    attention_mask=None,
    stop_mask=None,
    **config_overrides,
) -> GenerationOutput:
    """Continues each prompt. `prompts` is a list of token-id lists (any lengths), or a 2-D array of ids
    with `attention_mask` (1 = real token; padding on either side is dropped first).

    Keyword arguments are GenerationConfig fields: `generate(model, params, prompts, max_new_tokens=8)`.
    `stop_mask` (bool [vocab], see `stop_token_mask`) ends a row at any marked token, which is kept.
    """
    config = dataclasses.replace(config or GenerationConfig(), **config_overrides)
    prompts = _as_prompt_lists(prompts, attention_mask)
    check_prompts(model, prompts, config.max_new_tokens)
    ids, mask = left_pad(prompts, config.pad_token_id, round_up(max(len(p) for p in prompts), PROMPT_BUCKET))
    tokens, logprobs, lengths = generate_padded(
        model, params, jnp.asarray(ids), jnp.asarray(mask), config, stop_mask=stop_mask
    )
    n = config.max_new_tokens
    return GenerationOutput(
        tokens=np.asarray(tokens)[:, :n], logprobs=np.asarray(logprobs)[:, :n], lengths=np.asarray(lengths)
    )


def check_prompts(model: OPTForCausalLM, prompts: Sequence[Sequence[int]], max_new_tokens) -> None:
    """ValueError naming the first prompt that is empty, holds an id outside the model's vocabulary, or
    with `max_new_tokens` (one for all, or one per prompt) runs past the model's positions."""
    if not prompts:
        raise ValueError("no prompts given")
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    limit = model.config.max_position_embeddings
    for i, (prompt, budget) in enumerate(zip(prompts, budgets)):
        if not prompt:
            raise ValueError(f"prompt {i} is empty; give at least one token (e.g. the BOS id 2)")
        bad = [t for t in prompt if not 0 <= t < model.config.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id(s) {bad[:5]} outside [0, {model.config.vocab_size})")
        if len(prompt) + budget > limit:
            raise ValueError(
                f"prompt {i} of {len(prompt)} tokens plus max_new_tokens={budget} exceeds the "
                f"model's {limit} positions"
            )


def generate_padded(
    model: OPTForCausalLM,
    params: Any,
    ids: jax.Array,
    mask: jax.Array,
    config: GenerationConfig,
    *,
    stop_mask=None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The compiled program on left-padded `ids` / `mask` [batch, prompt_len] (device arrays, possibly
    sharded over a mesh: call under `jax.set_mesh` and the logical axis rules then). Returns device
    arrays (tokens, logprobs [batch, capacity], lengths [batch]) without waiting for them; the capacity
    is max_new_tokens rounded up to NEW_TOKENS_BUCKET, every column past max_new_tokens padding."""
    arguments, settings = decode_program(model, params, ids, mask, config, stop_mask=stop_mask)
    return _generate_compiled(*arguments, **settings)


def decode_program(model, params, ids, mask, config: GenerationConfig, *, stop_mask=None, platform=None):
    """(arguments, static settings) of the decode program for `platform` (None: the running backend):
    what `generate_padded` runs, and what `--aot` compiles for a target (aot/decode.py)."""
    vocab = model.config.vocab_size
    stop_mask = jnp.zeros((vocab,), bool) if stop_mask is None else jnp.asarray(stop_mask, bool)
    if stop_mask.shape != (vocab,):
        raise ValueError(f"stop_mask must be a bool [{vocab}] array, got shape {stop_mask.shape}")
    loop, cache_layout = decode_plan(config, platform)
    arguments = (
        model,
        nn.meta.unbox(params),
        ids,
        mask,
        jnp.int32(config.max_new_tokens),
        jnp.int32(config.min_new_tokens),
        jax.random.PRNGKey(config.seed),
        jnp.float32(config.temperature or 1.0),
        jnp.int32(config.top_k),
        jnp.float32(config.top_p),
        jnp.float32(config.repetition_penalty),
        stop_mask,
    )
    settings = dict(
        new_tokens_capacity=round_up(config.max_new_tokens, NEW_TOKENS_BUCKET),
        do_sample=config.do_sample,
        unstack_layers=decode_with_separate_layers(model),
        eos_token_id=-1 if config.eos_token_id is None else config.eos_token_id,
        pad_token_id=config.pad_token_id,
        loop=loop,
        cache_layout=cache_layout,
    )
    return arguments, settings


def decode_plan(config: GenerationConfig, platform: Optional[str] = None) -> tuple[str, str]:
    """(loop, cache layout) for `config` on `platform` (default: jax's default backend).

    "auto" picks, on CPU, CPU_LOOP and the "cpu" layout (tuned for its batched matmuls, see
    `OPTAttention._update_cache`); elsewhere the "fixed" loop (no per-token host round-trip of the
    while loop's predicate) and the "standard" layout, whose attention is the usual batched dot.
    """
    on_cpu = (platform or jax.default_backend()) == "cpu"
    loop = config.loop if config.loop != "auto" else (CPU_LOOP if on_cpu else "fixed")
    layout = config.cache_layout if config.cache_layout != "auto" else ("cpu" if on_cpu else "standard")
    return loop, layout


def stop_token_mask(tokenizer, stop_strings: Sequence[str], vocab_size: int) -> np.ndarray:
    """bool [vocab_size]: tokens whose own text contains one of `stop_strings`. Generating one means
    the stop string has appeared, so the decode loop may end that row there; a stop string spread over
    several tokens is not caught here and is cut afterwards (`cut_at_stop`), so the text is the same
    either way and only the loop may run longer."""
    mask = np.zeros((vocab_size,), bool)
    stop_strings = [s for s in stop_strings if s]
    if not stop_strings:
        return mask
    texts = tokenizer.decode_batch([[i] for i in range(min(vocab_size, tokenizer.vocab_size))])
    for token_id, text in enumerate(texts):
        if "\ufffd" not in text and any(s in text for s in stop_strings):  # U+FFFD: a partial character
            mask[token_id] = True
    return mask


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """`text` up to (without) the earliest occurrence of any stop string."""
    cut = len(text)
    for stop in stop_strings:
        if stop:
            found = text.find(stop)
            if 0 <= found < cut:
                cut = found
    return text[:cut]


def _as_prompt_lists(prompts, attention_mask) -> list[list[int]]:
    if attention_mask is not None or (hasattr(prompts, "ndim") and prompts.ndim == 2):
        ids = np.asarray(prompts)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        if ids.shape != mask.shape:
            raise ValueError(f"attention_mask shape {mask.shape} differs from the ids' {ids.shape}")
        return [[int(t) for t, m in zip(row, row_mask) if m] for row, row_mask in zip(ids, mask)]
    if isinstance(prompts, (str, bytes)) or (prompts and isinstance(prompts[0], (int, np.integer))):
        raise TypeError("prompts must be a list of token-id lists (a batch), not a single prompt")
    return [[int(t) for t in prompt] for prompt in prompts]


# ---------------------------------------------------------------------- token choice


def filter_logits(logits: jax.Array, top_k, top_p) -> jax.Array:
    """HF's top-k then top-p warpers: logits outside the kept set become -inf.

    top-k keeps the k largest (ties with the k-th too); top-p then keeps the smallest prefix, by
    descending probability among those, whose mass before it is below top_p (so at least one token).
    `top_k` 0 and `top_p` 1 switch each off; both are traced values, so changing them does not
    recompile.
    """
    vocab = logits.shape[-1]
    descending = -jnp.sort(-logits, axis=-1)
    rank = jnp.arange(vocab)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    in_top_k = rank < k
    probs = jax.nn.softmax(jnp.where(in_top_k, descending, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = in_top_k & ((mass_before < top_p) | (top_p >= 1.0))
    threshold = jnp.take_along_axis(descending, kept.sum(-1, keepdims=True) - 1, axis=-1)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample_logits(key, logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """One token id per row, drawn from softmax(filtered logits / temperature)."""
    scaled = logits.astype(jnp.float32) / temperature
    # Sorting the vocabulary costs more than the rest of the choice; skip it when nothing is filtered.
    scaled = jax.lax.cond((top_k > 0) | (top_p < 1.0), filter_logits, lambda x, *_: x, scaled, top_k, top_p)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------- the compiled program


def decode_with_separate_layers(model: OPTForCausalLM) -> bool:
    """Whether a scanned model (weights stacked on a layer axis) decodes with its layers split apart.

    On CPU a scanned stack decoded ~3x slower (XLA copied each layer's weights out of the stack at
    every step); splitting costs one copy of the layer weights per call instead. Elsewhere that
    copy could exhaust accelerator memory, and the scanned path is kept.
    """
    return model.scan_layers and jax.default_backend() == "cpu"


def weights_in_compute_dtype(params: Any, dtype) -> Any:
    """`params` with every kernel and embedding table in `dtype`. The modules cast these at each use
    anyway, so the values are the same; the rest (biases, LayerNorm's scale and bias, which LayerNorm
    reads in float32) is small and kept as stored."""

    def cast(path, leaf):
        if getattr(path[-1], "key", None) in ("kernel", "embedding") and jnp.issubdtype(
            leaf.dtype, jnp.floating
        ):
            return leaf.astype(dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(cast, params)


class DecodeState(NamedTuple):
    """The decode loop's carry: everything one decode step reads and writes."""

    step: jax.Array  # decode steps run so far, the prefill's included (scalar)
    last_token: jax.Array  # [batch] the token fed to the next step
    position: jax.Array  # [batch] its position id
    done: jax.Array  # [batch] bool: EOS produced
    lengths: jax.Array  # [batch] tokens generated per row, EOS included
    seen: jax.Array  # [batch, vocab] bool: tokens in the row so far (repetition_penalty)
    cache: Any  # the model's "cache" collection
    tokens: jax.Array  # [batch, capacity]
    logprobs: jax.Array  # [batch, capacity]


@functools.partial(
    jax.jit,
    static_argnames=(
        "model",
        "new_tokens_capacity",
        "do_sample",
        "eos_token_id",
        "pad_token_id",
        "unstack_layers",
        "loop",
        "cache_layout",
    ),
)
def _generate_compiled(
    model,
    params,
    prompt_ids,
    prompt_mask,
    max_new_tokens,
    min_new_tokens,
    rng,
    temperature,
    top_k,
    top_p,
    repetition_penalty,
    stop_mask,
    *,
    new_tokens_capacity,
    do_sample,
    eos_token_id,
    pad_token_id,
    unstack_layers,
    loop,
    cache_layout,
):
    """Prefill plus the decode loop. Returns (tokens, logprobs, lengths); eos_token_id -1 = none."""
    params = weights_in_compute_dtype(params, model.dtype)  # once, before the loop reads them every step
    if unstack_layers:
        params = weights.unstack_layers(params, model.config.num_hidden_layers)
        model = model.clone(scan_layers=False)
    batch, prompt_len = prompt_ids.shape
    capacity = new_tokens_capacity
    # Cache slot s holds the token at s: the prompt in [0, prompt_len), generated tokens after it.
    # The mask marks every generated slot real up front; the model's causal-by-slot mask hides the
    # slots not yet written.
    cache_mask = jnp.concatenate([prompt_mask, jnp.ones((batch, capacity), prompt_mask.dtype)], axis=1)

    def forward(cache, ids, positions):
        hidden, variables = model.apply(
            {"params": params, "cache": cache},
            ids,
            attention_mask=cache_mask,
            position_ids=positions,
            decode=True,
            return_hidden=True,
            mutable=["cache"],
        )
        return lm_head_logits(model, params, hidden[:, -1]).astype(jnp.float32), variables["cache"]

    def choose(logits, step, seen):
        """(token, its log-probability under the raw logits) for each row."""
        # HF's order: repetition penalty, then min_new_tokens' EOS ban, then the sampling warpers
        penalized = jnp.where(logits < 0, logits * repetition_penalty, logits / repetition_penalty)
        selectable = jnp.where(seen, penalized, logits)  # a penalty of 1 leaves every logit exact
        if eos_token_id >= 0:
            too_early = step < min_new_tokens
            selectable = selectable.at[:, eos_token_id].set(
                jnp.where(too_early, -jnp.inf, selectable[:, eos_token_id])
            )
        if do_sample:
            token = sample_logits(jax.random.fold_in(rng, step), selectable, temperature, top_k, top_p)
        else:
            token = jnp.argmax(selectable, axis=-1).astype(jnp.int32)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        return token, jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]

    def record(state: DecodeState, token, logprob) -> DecodeState:
        """Writes this step's token (pad for rows finished or past the budget) and updates who is done."""
        writing = ~state.done & (state.step < max_new_tokens)
        token = jnp.where(writing, token, pad_token_id)
        logprob = jnp.where(writing, logprob, 0.0)
        done = state.done | stop_mask[token]
        if eos_token_id >= 0:
            done = done | (token == eos_token_id)
        return state._replace(
            step=state.step + 1,
            last_token=token,
            done=done,
            lengths=state.lengths + writing,
            seen=state.seen.at[jnp.arange(batch), token].set(True),
            tokens=jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, state.step)),
            logprobs=jax.lax.dynamic_update_slice(state.logprobs, logprob[:, None], (0, state.step)),
        )

    # Prefill: the whole (left-padded) prompt in one pass; its last slot is every row's last real token.
    cache = model.init_cache(batch, prompt_len + capacity, layout=cache_layout)
    logits, cache = forward(cache, prompt_ids, positions_from_mask(prompt_mask))
    rows = jnp.arange(batch)[:, None]
    state = DecodeState(
        step=jnp.int32(0),
        last_token=jnp.zeros((batch,), jnp.int32),
        position=prompt_mask.sum(axis=1).astype(jnp.int32) - 1,
        done=jnp.zeros((batch,), bool),
        lengths=jnp.zeros((batch,), jnp.int32),
        seen=jnp.zeros((batch, model.config.vocab_size), jnp.int32)
        .at[rows, prompt_ids]
        .add(prompt_mask.astype(jnp.int32))
        > 0,
        cache=cache,
        tokens=jnp.full((batch, capacity), pad_token_id, jnp.int32),
        logprobs=jnp.zeros((batch, capacity), jnp.float32),
    )
    state = record(state, *choose(logits, state.step, state.seen))
    last_position = model.config.max_position_embeddings - 1

    def decode_step(state: DecodeState) -> DecodeState:
        # masked steps past the budget may run past the position table: clamp (their output is dropped)
        position = jnp.minimum(state.position + 1, last_position)
        logits, cache = forward(state.cache, state.last_token[:, None], position[:, None])
        return record(state._replace(position=position, cache=cache), *choose(logits, state.step, state.seen))

    if loop == "while":
        keep_going = lambda state: (state.step < max_new_tokens) & ~jnp.all(state.done)
        state = jax.lax.while_loop(keep_going, decode_step, state)
    else:  # "fixed": a static trip count, so no predicate to read back per step
        state = jax.lax.fori_loop(1, capacity, lambda _, state: decode_step(state), state)
    return state.tokens, state.logprobs, state.lengths


# ---------------------------------------------------------------------- text in, text out


def complete_texts(
    tokenizer, prompt_ids: Sequence[Sequence[int]], generated: Sequence[Sequence[int]]
) -> list[str]:
    """The text each generation adds to its prompt, as HF pipelines cut it: decode prompt + completion
    together and drop the decoded prompt, so a character split across the boundary comes out whole."""
    out = []
    for prompt, new in zip(prompt_ids, generated):
        prompt_text = tokenizer.decode(prompt)
        out.append(tokenizer.decode(list(prompt) + list(new))[len(prompt_text) :])
    return out


if __name__ == "__main__":
    # the command's entry point only, never a library import: `python -m optiml_jax.generate` keeps working
    from optiml_jax.cli.generate import main

    sys.exit(main())
