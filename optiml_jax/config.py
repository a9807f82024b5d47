"""OPTConfig: the architecture of an OPT model, read from and written to Hugging Face `config.json`.

Field names and defaults are Hugging Face's `OPTConfig` (transformers 4.46 / 5.x), so a hub
`config.json` round-trips. Runtime choices that are not part of the architecture (compute dtype,
scanned layers, remat, embedding dropout) are arguments of the model, not fields here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Optional

import yaml

# The dtypes a model may compute in or be stored as, everywhere (CLIs, run configs, converter, loader).
DTYPES = ("float32", "bfloat16", "float16")
# Where the LM head and loss run (train.head_positions; train/loss.py): on the positions that carry
# loss only, or on every position. Defined here, below run_config, which validates the name.
HEAD_POSITIONS = ("weighted", "all")
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def dtype_name(value) -> str:
    """The canonical name ("float32", "bfloat16", "float16") of a dtype given by name, alias (bf16...)
    or dtype object; ValueError naming the choices otherwise."""
    import numpy as np

    if isinstance(value, str):
        name = _DTYPE_ALIASES.get(value.lower(), value.lower())
    else:
        import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so np.dtype() knows its name)

        try:
            name = np.dtype(value).name
        except TypeError:
            name = str(value)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {value!r}; use one of {', '.join(DTYPES)}")
    return name


def as_dtype(value):
    """The numpy dtype (bfloat16 through ml_dtypes, which JAX uses too) of a name, alias or dtype;
    None stays None."""
    if value is None:
        return None
    import ml_dtypes
    import numpy as np

    name = dtype_name(value)
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


# Keys that PretrainedConfig (or an old hub config.json) writes but that do not change the
# architecture. They are accepted and dropped; anything else unknown is an error, because a typo in
# a field name would otherwise silently give a different model.
_IGNORED_HF_KEYS = frozenset(
    {
        "_name_or_path",
        "architectures",
        "torch_dtype",
        "dtype",
        "transformers_version",
        "model_type",
        "prefix",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "torchscript",
        "id2label",
        "label2id",
        "num_labels",
        "is_encoder_decoder",
        "is_decoder",
        "add_cross_attention",
        "pruned_heads",
        "chunk_size_feed_forward",
        "problem_type",
        "finetuning_task",
        "tokenizer_class",
        "task_specific_params",
        "decoder_start_token_id",
        "sep_token_id",
        "cross_attention_hidden_size",
        "tf_legacy_loss",
        "use_bfloat16",
        "_attn_implementation",
        "_commit_hash",
        "attn_implementation",
        # generation settings that old configs carried
        "max_length",
        "min_length",
        "do_sample",
        "early_stopping",
        "num_beams",
        "num_beam_groups",
        "diversity_penalty",
        "temperature",
        "top_k",
        "top_p",
        "typical_p",
        "repetition_penalty",
        "length_penalty",
        "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size",
        "bad_words_ids",
        "num_return_sequences",
        "output_scores",
        "return_dict_in_generate",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "remove_invalid_values",
        "exponential_decay_length_penalty",
        "suppress_tokens",
        "begin_suppress_tokens",
        "epsilon_cutoff",
        "eta_cutoff",
    }
)
# OPT has no activation dropout; old hub configs store 0.0. A non-zero value would be a model HF
# also ignores, so we refuse it rather than pretend to honour it.
_MUST_BE_ZERO_KEYS = ("activation_dropout",)
# JSON key -> dataclass field, where Python forbids or discourages the JSON spelling.
_JSON_TO_FIELD = {"_remove_final_layer_norm": "remove_final_layer_norm"}
_FIELD_TO_JSON = {v: k for k, v in _JSON_TO_FIELD.items()}


def is_whole_number(value) -> bool:
    """An int and not a bool: bool subclasses int, and a setting of True must not pass as 1."""
    return isinstance(value, int) and not isinstance(value, bool)


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it."""


@dataclasses.dataclass(frozen=True)
class OPTConfig:
    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    remove_final_layer_norm: bool = False
    word_embed_proj_dim: Optional[int] = None
    dropout: float = 0.1
    attention_dropout: float = 0.0
    num_attention_heads: int = 12
    activation_function: str = "relu"
    layerdrop: float = 0.0
    init_std: float = 0.02
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True

    def __post_init__(self):
        if self.word_embed_proj_dim is None:
            object.__setattr__(self, "word_embed_proj_dim", self.hidden_size)
        self.validate()

    # ------------------------------------------------------------------ derived facts
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def has_projections(self) -> bool:
        """350m-style: token embeddings are narrower than the residual stream."""
        return self.word_embed_proj_dim != self.hidden_size

    @property
    def has_final_layer_norm(self) -> bool:
        return self.do_layer_norm_before and not self.remove_final_layer_norm

    @property
    def num_positions(self) -> int:
        """Rows of the learned position table: OPT offsets positions by 2."""
        return self.max_position_embeddings + 2

    def num_params(self, include_embeddings: bool = True) -> int:
        h, f, layers = self.hidden_size, self.ffn_dim, self.num_hidden_layers
        bias = 1 if self.enable_bias else 0
        ln = 2 if self.layer_norm_elementwise_affine else 0
        per_layer = 4 * h * h + 4 * h * bias + 2 * h * f + (f + h) * bias + 2 * ln * h
        total = layers * per_layer
        if self.has_final_layer_norm:
            total += ln * h
        if self.has_projections:
            total += 2 * h * self.word_embed_proj_dim
        if include_embeddings:
            total += self.vocab_size * self.word_embed_proj_dim + self.num_positions * h
            if not self.tie_word_embeddings:
                total += self.vocab_size * self.word_embed_proj_dim
        return total

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "ffn_dim",
            "max_position_embeddings",
            "num_attention_heads",
            "word_embed_proj_dim",
        ):
            value = getattr(self, name)
            if not is_whole_number(value) or value <= 0:
                raise ConfigError(f"OPTConfig.{name} must be a positive integer, got {value!r}")
        for name in ("dropout", "attention_dropout", "layerdrop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"OPTConfig.{name} must be a number in [0, 1), got {value!r}")
        for name in (
            "do_layer_norm_before",
            "remove_final_layer_norm",
            "enable_bias",
            "layer_norm_elementwise_affine",
            "tie_word_embeddings",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"OPTConfig.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if not is_whole_number(value) or not 0 <= value < self.vocab_size:
                raise ConfigError(
                    f"OPTConfig.{name} must be a token id in [0, vocab_size={self.vocab_size}), got {value!r}"
                )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"OPTConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        # activation_function is checked by the model, which owns the table (model/layers.ACTIVATIONS)
        if not isinstance(self.init_std, (int, float)) or self.init_std <= 0:
            raise ConfigError(f"OPTConfig.init_std must be positive, got {self.init_std!r}")

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "OPTConfig":
        """Builds a config from HF `config.json` keys; `source` names the file in errors."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        model_type = data.get("model_type", "opt")
        if model_type != "opt":
            raise ConfigError(f"{source}: model_type is {model_type!r}, expected 'opt'")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        unknown = []
        for key, value in data.items():
            name = _JSON_TO_FIELD.get(key, key)
            if name in fields:
                kwargs[name] = value
            elif key in _MUST_BE_ZERO_KEYS:
                if value not in (0, 0.0, None):
                    raise ConfigError(f"{source}: {key}={value!r} is not supported (OPT has no {key})")
            elif key not in _IGNORED_HF_KEYS:
                unknown.append(key)
        if unknown:
            raise ConfigError(f"{source}: unknown OPT config key(s): {', '.join(sorted(unknown))}")
        if isinstance(kwargs.get("eos_token_id"), list):
            ids = kwargs["eos_token_id"]
            if len(ids) != 1:
                raise ConfigError(f"{source}: eos_token_id={ids!r}; only one EOS id is supported")
            kwargs["eos_token_id"] = ids[0]
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_dict(self) -> dict:
        """HF `config.json` content (loadable by `transformers.OPTConfig.from_pretrained`)."""
        out: dict[str, Any] = {"architectures": ["OPTForCausalLM"], "model_type": "opt"}
        for f in dataclasses.fields(self):
            out[_FIELD_TO_JSON.get(f.name, f.name)] = getattr(self, f.name)
        return out

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "OPTConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data, source=str(path))

    def to_json_file(self, path: str | os.PathLike) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    def replace(self, **changes) -> "OPTConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "OPTConfig":
        """`name` is a size ("125m", "opt-1.3b", "facebook/opt-iml-max-30b") or a YAML/JSON file."""
        path = Path(name)
        if path.suffix in (".yaml", ".yml", ".json") and path.is_file():
            return cls.from_file(path).replace(**overrides) if overrides else cls.from_file(path)
        key = preset_key(name)
        file = presets_dir() / f"opt-{key}.yaml"
        if not file.is_file():
            raise ConfigError(f"unknown OPT preset {name!r}; known presets: {', '.join(preset_names())}")
        config = cls.from_file(file)
        return config.replace(**overrides) if overrides else config

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "OPTConfig":
        path = Path(path)
        if path.suffix == ".json":
            return cls.from_json_file(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        return cls.from_dict(data or {}, source=str(path))


# Files that ship inside the package (setup.cfg's package_data), so an installed wheel has them too:
# the run configs (configs/), the model presets (configs/models/), the demo tokenizer and the SNI sample.
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
# The shipped SNI sample: 8 tasks of SNI's train split, a few of its test split (its README.md lists them).
SNI_SAMPLE_DIR = ASSETS_DIR / "data" / "sni"


# Names that stand for a shipped data set wherever a data path is asked for, from any directory.
def presets_dir() -> Path:
    """The model presets: configs/models/ (optiml_jax/assets/configs links to the repository's configs/)."""
    return ASSETS_DIR / "configs" / "models"


def preset_key(name: str) -> str:
    key = name.lower().split("/")[-1]
    for prefix in ("opt-iml-max-", "opt-iml-", "opt-"):
        if key.startswith(prefix):
            key = key[len(prefix) :]
            break
    return key


def preset_names() -> list[str]:
    return sorted(p.stem[len("opt-") :] for p in presets_dir().glob("opt-*.yaml"))
