"""`pipeline("text-generation", model=...)`: the Hugging Face pipeline call that OPT-IML's model card shows.

    from optiml_jax import pipeline
    generator = pipeline("text-generation", model="facebook/opt-iml-max-1.3b")  # or a local directory
    generator("What is the capital of USA?")  # -> [{"generated_text": "What is the capital of USA? ..."}]

As in transformers: `generated_text` starts with the prompt unless `return_full_text=False`; a list of
prompts gives a list of such lists; `do_sample=False` (the default) is greedy and ignores the sampling
settings; sampling defaults to temperature 1.0, top_k 50 and top_p 1.0 (transformers' GenerationConfig
defaults). One difference: transformers stops at 20 tokens *in total* unless told otherwise; here the
default is `max_new_tokens=20`, since an instruction prompt alone is often longer than that.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Union

import numpy as np

from optiml_jax.config import OPTConfig
from optiml_jax.generate import GenerationConfig, complete_texts, generate

TASKS = ("text-generation",)
HF_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}


@dataclasses.dataclass
class TextGenerationPipeline:
    """A loaded model and tokenizer; call it with a prompt or a list of prompts."""
    model: Any  # OPTForCausalLM
    params: Any
    tokenizer: Any  # OPTTokenizer
    config: OPTConfig
    batch_size: int = 8  # prompts generated together as one left-padded batch
    seed: int = 0  # seeds the per-call sampling seeds: repeated calls differ, a rerun repeats them

    def __post_init__(self):
        self._seeds = np.random.default_rng(self.seed)

    def __call__(self, text_inputs: Union[str, Sequence[str]], *, max_new_tokens: int = 20,
                 min_new_tokens: int = 0, do_sample: bool = False, temperature: Optional[float] = None,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
                 return_full_text: bool = True) -> list:
        """[{"generated_text": ...}] for one prompt; a list of those for a list of prompts.

        `seed` fixes this call's sampling; without it each call draws the next seed of the pipeline.
        """
        single = isinstance(text_inputs, str)
        prompts = [text_inputs] if single else list(text_inputs)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError("text_inputs must be a string or a non-empty list of strings")
        if do_sample:
            settings = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
            settings = {k: HF_SAMPLING_DEFAULTS[k] if v is None else v for k, v in settings.items()}
            if settings["temperature"] <= 0:
                raise ValueError(f"temperature must be > 0 when sampling, got {settings['temperature']}")
            seed = int(self._seeds.integers(2**31)) if seed is None else seed
        else:  # greedy, as transformers does with do_sample=False (which only warns about the rest)
            settings, seed = {"temperature": 0.0, "top_k": 0, "top_p": 1.0}, 0
        config = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, seed=seed,
                                  eos_token_id=self.config.eos_token_id, pad_token_id=self.config.pad_token_id,
                                  **settings)
        results = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start:start + self.batch_size]
            prompt_ids = [self.tokenizer.encode(p) for p in chunk]
            out = generate(self.model, self.params, prompt_ids, config)
            for prompt, completion in zip(chunk, complete_texts(self.tokenizer, prompt_ids, out.token_ids())):
                text = prompt + completion if return_full_text else completion
                results.append([{"generated_text": text}])
        return results[0] if single else results


def pipeline(task: str = "text-generation", model=None, *, dtype=None, scan_layers: bool = False,
             tokenizer=None, batch_size: int = 8, seed: int = 0) -> TextGenerationPipeline:
    """A text-generation pipeline for an OPT model: a local directory, a hub id, or a `Pretrained`.

    `tokenizer` overrides the model directory's tokenizer (an OPTTokenizer or a directory).
    Layers load unscanned by default: decoding runs them separately anyway (see
    `generate.decode_with_separate_layers`), and loading them so saves a copy per call.
    """
    if task not in TASKS:
        raise ValueError(f"unsupported task {task!r}; optiml_jax supports {', '.join(TASKS)}")
    if model is None:
        raise ValueError("pipeline() needs model= (a model directory, a hub id, or a Pretrained)")
    from optiml_jax.checkpoints.pretrained import Pretrained, load_pretrained
    from optiml_jax.tokenizer import OPTTokenizer

    loaded = model if isinstance(model, Pretrained) else load_pretrained(
        model, dtype=dtype, scan_layers=scan_layers, load_tokenizer=tokenizer is None)
    if tokenizer is not None and not isinstance(tokenizer, OPTTokenizer):
        tokenizer = OPTTokenizer.from_pretrained(tokenizer)
    tokenizer = tokenizer or loaded.tokenizer
    if tokenizer is None:
        raise ValueError(f"{loaded.path} has no tokenizer files (vocab.json + merges.txt or tokenizer.json); "
                         f"pass tokenizer=")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return TextGenerationPipeline(loaded.model, loaded.params, tokenizer, loaded.config, batch_size, seed)


__all__ = ["pipeline", "TextGenerationPipeline"]
