"""`pipeline("text-generation", model=...)`: the Hugging Face pipeline call that OPT-IML's model card shows.

    from optiml_jax import pipeline
    generator = pipeline("text-generation", model="facebook/opt-iml-max-1.3b")  # or a local directory
    generator("What is the capital of USA?")  # -> [{"generated_text": "What is the capital of USA? ..."}]

As in transformers: `generated_text` starts with the prompt unless `return_full_text=False`; a list of
prompts gives a list of such lists; `do_sample=False` (the default) is greedy and ignores the sampling
settings; sampling defaults to temperature 1.0, top_k 50 and top_p 1.0 (transformers' GenerationConfig
defaults). `num_return_sequences` (sampling only, as in transformers), `repetition_penalty`,
`stop_sequence` (generation ends at the token that completes the string, which stays in the text; it
may begin in the prompt), `max_length` (prompt tokens, any BOS included, plus new ones; the prompt is
first cut to it, as transformers' tokenizer does) and `batch_size` mean what they mean there; batching never
changes a greedy result. One difference: transformers stops at 20 tokens *in total* unless told
otherwise; here the default is `max_new_tokens=20`, since an instruction prompt alone is often longer.
Another: prompts are encoded without a leading `</s>`, as fine-tuning and evaluation see them (the
project's prompt convention, tokenizer.PROMPT_ADD_BOS); `add_bos=True` prepends it as transformers'
OPT tokenizer does, and then the ids and the answers are transformers' own.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from typing import Any, Optional, Sequence, Union

import numpy as np

from optiml_jax.checkpoints.pretrained import Pretrained, load_pretrained
from optiml_jax.config import OPTConfig
from optiml_jax.generate import (
    PROMPT_BUCKET,
    GenerationConfig,
    check_prompts,
    complete_texts,
    generate_padded,
    left_pad,
    round_up,
    stop_token_mask,
)
from optiml_jax.sharding import DEFAULT_RULES, on_mesh
from optiml_jax.tokenizer import PROMPT_ADD_BOS, OPTTokenizer

TASKS = ("text-generation",)
HF_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}
DEFAULT_MAX_NEW_TOKENS = 20


@dataclasses.dataclass
class TextGenerationPipeline:
    """A loaded model and tokenizer; call it with a prompt or a list of prompts."""

    model: Any  # OPTForCausalLM
    params: Any
    tokenizer: Any  # OPTTokenizer
    config: OPTConfig
    batch_size: int = 8  # prompts generated together as one left-padded batch
    seed: int = 0  # seeds the per-call sampling seeds: repeated calls differ, a rerun repeats them
    mesh: Any = None  # a jax Mesh: batches run on it, rows split over its data-parallel axes
    rules: Any = None  # the logical axis rules the params were placed by (sharding.DEFAULT_RULES)
    add_bos: bool = PROMPT_ADD_BOS  # start prompts with </s> (transformers' OPT tokenizer does)

    def __post_init__(self):
        self._seeds = np.random.default_rng(self.seed)
        self._stop_masks = {}

    def __call__(
        self,
        text_inputs: Union[str, Sequence[str]],
        *,
        max_new_tokens: Optional[int] = None,
        max_length: Optional[int] = None,
        min_new_tokens: int = 0,
        do_sample: bool = False,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        repetition_penalty: Optional[float] = None,
        num_return_sequences: int = 1,
        stop_sequence: Union[str, Sequence[str], None] = None,
        batch_size: Optional[int] = None,
        seed: Optional[int] = None,
        return_full_text: bool = True,
        return_tensors: bool = False,
    ) -> list:
        """[{"generated_text": ...}] (num_return_sequences of them) for one prompt; a list of those for a
        list of prompts.

        `seed` fixes this call's sampling; without it each call draws the next seed of the pipeline.
        `return_tensors=True` gives token ids instead of text, as transformers does:
        [{"generated_token_ids": prompt ids + new ids}].
        With both `max_new_tokens` and `max_length`, the first sets the budget and the second still
        cuts the prompt (transformers does the same).
        """
        single = isinstance(text_inputs, str)
        prompts = [text_inputs] if single else list(text_inputs)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError("text_inputs must be a string or a non-empty list of strings")
        batch_size = self.batch_size if batch_size is None else _positive_int("batch_size", batch_size)
        copies = _positive_int("num_return_sequences", num_return_sequences)
        if copies > 1 and not do_sample:  # transformers' own message
            raise ValueError(
                "Greedy methods (do_sample != True) without beam search do not support "
                f"`num_return_sequences` different than 1 (got {copies})."
            )
        stops = [stop_sequence] if isinstance(stop_sequence, str) else list(stop_sequence or [])
        if not all(isinstance(s, str) and s for s in stops):
            raise ValueError(
                f"stop_sequence must be a non-empty string or a list of them, got {stop_sequence!r}"
            )
        config = self._generation_config(
            do_sample,
            temperature,
            top_k,
            top_p,
            seed,
            min_new_tokens,
            1.0 if repetition_penalty is None else repetition_penalty,
        )

        prompt_ids = self.tokenizer.encode_batch(prompts, add_bos=self.add_bos)
        if max_length is not None:
            prompt_ids = [ids[: _positive_int("max_length", max_length)] for ids in prompt_ids]
        budgets = [_budget(ids, max_new_tokens, max_length) for ids in prompt_ids]
        check_prompts(self.model, prompt_ids, budgets)
        # each prompt's copies are neighbouring rows of one batch (transformers' repeat_interleave);
        # every row draws its own random numbers
        rows = [
            (i, ids, budget)
            for i, (ids, budget) in enumerate(zip(prompt_ids, budgets))
            for _ in range(copies)
        ]
        stop_mask = self._stop_mask(tuple(stops))
        results = [[] for _ in prompts]
        with self._on_mesh():
            for index, start in enumerate(range(0, len(rows), batch_size * copies)):
                chunk = rows[start : start + batch_size * copies]
                chunk_config = dataclasses.replace(
                    config, max_new_tokens=max(budget for _, _, budget in chunk), seed=config.seed + index
                )
                new_ids = self._generate_rows([ids for _, ids, _ in chunk], chunk_config, stop_mask)
                for (i, ids, budget), new in zip(chunk, new_ids):
                    new = new[:budget]  # the batch ran to its longest budget; a greedy row is the same alone
                    if stops:
                        new = new[: self._stop_point(ids, new, stops)]
                    if return_tensors:
                        results[i].append({"generated_token_ids": list(ids) + list(new)})
                        continue
                    completion = complete_texts(self.tokenizer, [ids], [new])[0]
                    results[i].append(
                        {"generated_text": prompts[i] + completion if return_full_text else completion}
                    )
        return results[0] if single else results

    def _generation_config(
        self, do_sample, temperature, top_k, top_p, seed, min_new_tokens, repetition_penalty
    ) -> GenerationConfig:
        if do_sample:
            settings = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
            settings = {k: HF_SAMPLING_DEFAULTS[k] if v is None else v for k, v in settings.items()}
            if settings["temperature"] <= 0:
                raise ValueError(f"temperature must be > 0 when sampling, got {settings['temperature']}")
            seed = int(self._seeds.integers(2**31)) if seed is None else seed
        else:  # greedy, as transformers does with do_sample=False (which only warns about the rest)
            settings, seed = {"temperature": 0.0, "top_k": 0, "top_p": 1.0}, 0
        return GenerationConfig(
            min_new_tokens=min_new_tokens,
            seed=seed,
            repetition_penalty=repetition_penalty,
            eos_token_id=self.config.eos_token_id,
            pad_token_id=self.config.pad_token_id,
            **settings,
        )

    def _generate_rows(self, prompts: list, config: GenerationConfig, stop_mask) -> list[list[int]]:
        """Generated ids (EOS kept) of each prompt, as one left-padded batch split over the mesh."""
        from optiml_jax.eval.generation import data_parallel_size, device_rows  # here: eval is slow to import

        spare = -len(prompts) % data_parallel_size(self.mesh)  # rows every data-parallel device can take
        batch = list(prompts) + [prompts[-1]] * spare
        ids, mask = left_pad(batch, config.pad_token_id, round_up(max(len(p) for p in batch), PROMPT_BUCKET))
        tokens, _, lengths = generate_padded(
            self.model,
            self.params,
            device_rows(ids, self.mesh, self._rules),
            device_rows(mask, self.mesh, self._rules),
            config,
            stop_mask=stop_mask,
        )
        tokens, lengths = np.asarray(tokens), np.asarray(lengths)
        return [tokens[r, : lengths[r]].tolist() for r in range(len(prompts))]

    @property
    def _rules(self):

        return self.rules or DEFAULT_RULES

    def _on_mesh(self):

        return on_mesh(self.mesh, self._rules)

    def _stop_mask(self, stops: tuple):
        """Tokens that hold a stop string on their own: the loop may end a row there (a string spread
        over several tokens is found by _stop_point afterwards)."""
        if stops not in self._stop_masks:
            self._stop_masks[stops] = stop_token_mask(self.tokenizer, stops, self.config.vocab_size)
        return self._stop_masks[stops]

    def _stop_point(self, prompt: Sequence[int], new: Sequence[int], stops: Sequence[str]) -> int:
        """How many of `new` to keep: up to the first token that completes a stop string, as
        transformers' StopStringCriteria matches on a byte-level vocabulary: on the tokens' bytes,
        the prompt's included, by an occurrence that ends inside a generated token."""
        prompt_bytes = b"".join(map(self._token_bytes, prompt))
        text = prompt_bytes + b"".join(map(self._token_bytes, new))
        ends = list(np.cumsum([len(prompt_bytes)] + [len(self._token_bytes(t)) for t in new])[1:])
        first_end = None
        for stop in (s.encode("utf-8") for s in stops):
            found = text.find(stop, max(0, len(prompt_bytes) - len(stop) + 1))
            if found >= 0 and (first_end is None or found + len(stop) < first_end):
                first_end = found + len(stop)
        return len(new) if first_end is None else bisect.bisect_left(ends, first_end) + 1

    def _token_bytes(self, token_id: int) -> bytes:
        return _token_bytes(self.tokenizer, int(token_id))


def _token_bytes(tokenizer, token_id: int) -> bytes:
    """A token's bytes: its vocabulary string through GPT-2's byte-to-character table, as
    transformers reads a byte-level vocabulary (special tokens such as `</s>` are their own spelling)."""
    token = tokenizer.id_to_token(token_id) or ""
    table = _byte_decoder()
    if all(char in table for char in token):
        return bytes(table[char] for char in token)
    return tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict:
    """GPT-2's bytes_to_unicode table inverted (openai/gpt-2 encoder.py, MIT licence): printable
    Latin-1 bytes are their own character, the other bytes map to 256, 257, ... in order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: b for b in kept}
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + len(chars) - len(kept)
    return {chr(c): b for b, c in chars.items()}


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _budget(prompt_ids: Sequence[int], max_new_tokens: Optional[int], max_length: Optional[int]) -> int:
    """New tokens for one prompt: max_new_tokens, else what max_length leaves after the prompt."""
    if max_new_tokens is not None:
        return _positive_int("max_new_tokens", max_new_tokens)
    if max_length is None:
        return DEFAULT_MAX_NEW_TOKENS
    if len(prompt_ids) >= max_length:  # transformers refuses it too
        raise ValueError(
            f"a prompt of {len(prompt_ids)} tokens leaves nothing to generate under "
            f"max_length={max_length} (which counts the prompt's tokens); raise max_length or "
            f"give max_new_tokens"
        )
    return max_length - len(prompt_ids)


def pipeline(
    task: str = "text-generation",
    model=None,
    *,
    dtype=None,
    scan_layers: bool = False,
    tokenizer=None,
    batch_size: int = 8,
    seed: int = 0,
    mesh=None,
    rules=None,
    attention: Optional[str] = None,
    add_bos: bool = PROMPT_ADD_BOS,
    torch_dtype=None,
    device=None,
) -> TextGenerationPipeline:
    """A text-generation pipeline for an OPT model: a local directory, a hub id, or a `Pretrained`.

    `tokenizer` overrides the model directory's tokenizer (an OPTTokenizer or a directory).
    Layers load unscanned by default: decoding runs them separately anyway on CPU (see
    `generate.decode_with_separate_layers`), and loading them so saves a copy per call.
    `mesh` (a jax Mesh, see sharding.make_mesh) places the params in their shards by `rules` and runs
    every batch on it. `attention` goes to load_pretrained (the kernel of whole-sequence passes of the
    loaded model); generation itself, prompt pass included, attends over its KV cache either way.
    `add_bos=True` starts every prompt with `</s>`, as transformers' OPT tokenizer does (the default
    encodes prompts as fine-tuning and evaluation do; see docs/evaluation.md, "Prompt convention").

    Hugging Face's `torch_dtype` is `dtype` (a torch dtype or its name; "auto" is the default,
    float32). `device` is accepted so transformers code runs unchanged, and ignored: JAX runs on its
    default backend (JAX_PLATFORMS chooses it); `mesh=` spreads the model over several devices.
    """
    del device  # see the docstring: placement is JAX's default device, or the mesh
    if torch_dtype is not None:
        name = str(torch_dtype).removeprefix("torch.")
        if dtype is not None and name != "auto" and name != str(dtype):
            raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} differ; give one")
        dtype = dtype if name == "auto" else name
    if task not in TASKS:
        raise ValueError(f"unsupported task {task!r}; optiml_jax supports {', '.join(TASKS)}")
    if model is None:
        raise ValueError("pipeline() needs model= (a model directory, a hub id, or a Pretrained)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")

    if isinstance(model, Pretrained):
        given = [name for name, value in (("dtype", dtype), ("attention", attention)) if value is not None]
        if given:
            raise ValueError(
                f"{' and '.join(given)} apply when pipeline() loads the model; this one is "
                f"loaded already (pass its directory, or set them in load_pretrained)"
            )
        loaded = model
    else:
        # attention only when asked: load_pretrained's own default picks per platform
        options = {} if attention is None else {"attention": attention}
        loaded = load_pretrained(
            model,
            dtype=dtype,
            scan_layers=scan_layers,
            mesh=mesh,
            rules=rules,
            load_tokenizer=tokenizer is None,
            **options,
        )
    if tokenizer is not None and not isinstance(tokenizer, OPTTokenizer):
        tokenizer = OPTTokenizer.from_pretrained(tokenizer)
    tokenizer = tokenizer or loaded.tokenizer
    if tokenizer is None:
        raise ValueError(
            f"{loaded.path} has no tokenizer files (vocab.json + merges.txt or tokenizer.json); "
            f"pass tokenizer="
        )
    return TextGenerationPipeline(
        loaded.model,
        loaded.params,
        tokenizer,
        loaded.config,
        batch_size,
        seed,
        mesh=mesh,
        rules=rules,
        add_bos=bool(add_bos),
    )


__all__ = ["pipeline", "TextGenerationPipeline"]
