"""lm-evaluation-harness on optiml-jax models: the model class `optiml_jax`.

    pip install -e '.[eval]'
    python -m optiml_jax.lm_eval --model optiml_jax \
        --model_args pretrained=DIR,dtype=float32 --tasks TASK [...]

or in Python, after `import optiml_jax.lm_eval`:

    lm_eval.simple_evaluate(model="optiml_jax", model_args="pretrained=DIR", tasks=[...])

lm_eval's own CLI only knows the models of its own package, so `python -m optiml_jax.lm_eval` registers
this one and hands every argument over to lm_eval's CLI (optiml_jax/cli/lm_eval.py). model_args
that cannot give a model (a dtype outside float32/bfloat16/float16, a mesh that does not fit the
devices, a missing model directory) are one line on stderr and exit status 2, as lm_eval's own bad
arguments are.

The class behaves as lm_eval's `hf` model does on OPT, so their scores agree (tested): text is
encoded with `</s>` first (OPT's Hugging Face tokenizer adds it; `add_bos_token=False` in model_args
turns it off), an empty context is `</s>`, the context is cut from the left to fit
`max_length` (the model's positions), `loglikelihood_rolling` uses lm_eval's own windows, and
`generate_until` decodes the new tokens alone and cuts them at the `until` strings. Log-likelihoods
come from optiml_jax.eval.scoring (a context shared by several requests is computed once), answers
from the evaluation's bucketed generation.

model_args: pretrained (a directory, ours or Hugging Face's, or a hub id), dtype (float32, bfloat16,
float16), batch_size, max_length, add_bos_token, mesh ("data=-1,fsdp=1,tensor=1"), row_length
(scoring rows, tokens), tokenizer (a directory).
"""

from __future__ import annotations

import json
import logging
from typing import Optional

import jax
import lm_eval.models  # noqa: F401  (registers lm_eval's own models: ours must not be the only one)
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from optiml_jax.checkpoints.pretrained import load_pretrained
from optiml_jax.config import ConfigError, dtype_name
from optiml_jax.eval.generation import data_parallel_size, generate_token_ids
from optiml_jax.eval.scoring import Scorer
from optiml_jax.paths import resolve_model_path
from optiml_jax.sharding import MeshConfig, make_mesh
from optiml_jax.tokenizer import OPTTokenizer

log = logging.getLogger(__name__)
MODEL_NAME = "optiml_jax"


def _as_bool(value) -> bool:
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {value!r}")
        return value.lower() in ("true", "1")
    return bool(value)


@register_model(MODEL_NAME)
class OptimlJaxLM(TemplateLM):
    """An OPT model of optiml_jax behind lm_eval's LM interface (see the module doc)."""

    def __init__(
        self,
        pretrained: str,
        dtype: str = "float32",
        batch_size=8,
        max_length: Optional[int] = None,
        add_bos_token=True,
        mesh: str = "data=-1",
        row_length: int = 512,
        tokenizer: Optional[str] = None,
        max_batch_size=None,
        device=None,
        **unused,
    ):
        super().__init__()
        try:  # the configuration first, before anything is loaded or compiled
            dtype_name(dtype)
            self._mesh = make_mesh(MeshConfig.parse(mesh))
            resolve_model_path(pretrained)
        except (ValueError, OSError) as e:
            raise ConfigError(f"model_args: {e}") from None
        try:
            loaded = load_pretrained(
                pretrained,
                dtype=dtype,
                scan_layers=jax.default_backend() != "cpu",
                mesh=self._mesh,
                load_tokenizer=tokenizer is None,
            )
        except (ValueError, FileNotFoundError, NotADirectoryError) as e:  # missing or damaged model files
            raise ConfigError(f"model_args: {e}") from None
        tokenizer = OPTTokenizer.from_pretrained(tokenizer) if tokenizer else loaded.tokenizer
        if tokenizer is None:
            raise ConfigError(f"{pretrained} has no tokenizer files; pass tokenizer=DIR in model_args")
        self._attach(
            loaded.model, loaded.params, tokenizer, batch_size, max_length, add_bos_token, row_length
        )

    @classmethod
    def from_model(
        cls,
        model,
        params,
        tokenizer,
        *,
        mesh,
        batch_size=8,
        max_length=None,
        add_bos_token=True,
        row_length=512,
    ) -> "OptimlJaxLM":
        """The model of a model already in memory (a suite run, a fine-tuning step): nothing is loaded."""
        self = cls.__new__(cls)
        TemplateLM.__init__(self)
        self._mesh = mesh
        self._attach(model, params, tokenizer, batch_size, max_length, add_bos_token, row_length)
        return self

    def _attach(self, model, params, tokenizer, batch_size, max_length, add_bos_token, row_length) -> None:
        # lm_eval's "auto" searches for the largest batch that fits; we take 8 rows per device instead
        devices = data_parallel_size(self._mesh)
        wanted = (
            8 * devices if batch_size in (None, "") or str(batch_size).startswith("auto") else int(batch_size)
        )
        self._batch_size = max(1, wanted // devices) * devices  # a multiple of the data-parallel devices
        self._model, self._params, self.tokenizer = model, params, tokenizer
        self._max_length = int(max_length) if max_length else model.config.max_position_embeddings
        self.add_bos_token = _as_bool(add_bos_token)
        self._scorer = Scorer(
            self._model,
            self._params,
            self.tokenizer,
            batch_size=self._batch_size,
            row_length=int(row_length),
            max_length=self._max_length,
            add_bos=self.add_bos_token,
            mesh=self._mesh,
        )

    # ------------------------------------------------------------------ what lm_eval asks of a model
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return MODEL_NAME

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        add_bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.tokenizer.encode(string, add_bos=add_bos)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(
            [t for t in tokens if t < self.tokenizer.vocab_size], skip_special_tokens=skip_special_tokens
        )

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context ids, continuation ids); one group per context."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, (_, context, _) in enumerate(requests):
            groups.setdefault(tuple(context), []).append(index)
        keys = list(groups)
        scores = self._scorer.score_groups(
            [(list(key), [requests[i][2] for i in groups[key]]) for key in keys]
        )
        out: list = [None] * len(requests)
        for key, group_scores in zip(keys, scores):
            for index, score in zip(groups[key], group_scores):
                out[index] = (score.logprob, score.is_greedy)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Every token of each document scored once, in lm_eval's windows of max_length tokens."""
        windows, owners = [], []
        for index, (text,) in enumerate(
            tqdm([r.args for r in requests], disable=disable_tqdm, desc="rolling")
        ):
            for context, continuation in map(
                lm_eval_utils.make_disjoint_window,
                lm_eval_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        scores = self._scorer.score_groups([(context, [continuation]) for context, continuation in windows])
        for index, (score,) in zip(owners, scores):
            totals[index] += score.logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample) continuations, cut at the request's `until` strings."""
        by_kwargs: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            by_kwargs.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        eos_text = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        out: list = [None] * len(requests)
        for _key, indices in by_kwargs.items():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            until = until + [eos_text] if eos_text not in until else until
            max_gen_toks = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = (
                float(kwargs.pop("temperature", 0.0) or 0.0) if kwargs.pop("do_sample", False) else 0.0
            )
            if kwargs:
                log.warning(
                    "generate_until: ignoring generation settings %s (greedy or temperature sampling only)",
                    sorted(kwargs),
                )
            prompts = [self.tok_encode(requests[i].args[0]) for i in indices]
            new_ids, _, _, _ = generate_token_ids(
                self._model,
                self._params,
                self.tokenizer,
                prompts,
                max_new_tokens=max_gen_toks,
                batch_size=self._batch_size,
                stop=until,
                mesh=self._mesh,
                progress=not disable_tqdm,
                temperature=temperature,
            )
            for i, ids in zip(indices, new_ids):
                text = self.tok_decode(ids)
                for stop in until:
                    text = text.split(stop)[0]
                out[i] = text
        return out
