"""Where a path or a model string points, for every command and library entry point alike.

A run config's relative paths (`data/sni`, `configs/demo.yaml`, `demo_tokenizer`) fall back to the files
shipped under optiml_jax/assets/ (`resolve_path`). A model string is `preset:NAME` (an architecture,
randomly initialised: `preset_config`), a local directory, or a hub id (`resolve_model_path`). A hub id is
tried only when the string looks like one -- `org/name`, no such local path, not starting with `./`,
`../`, `/` or `~`, not ending with a file suffix -- so a mistyped local path is "no such file or
directory", not a question to the hub.
"""

from __future__ import annotations

import os
from pathlib import Path

from optiml_jax.config import ASSETS_DIR, SNI_SAMPLE_DIR, OPTConfig

PRESET_PREFIX = "preset:"
# A string ending so names a file, never a hub repository.
_FILE_SUFFIXES = (
    *(".json", ".jsonl", ".yaml", ".yml", ".txt", ".parquet"),
    *(".bin", ".pt", ".pth", ".safetensors", ".msgpack"),
)
HUB_PATTERNS = [
    "config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]


class ModelNotFoundError(FileNotFoundError):
    """No local model directory of that name, and no hub model either: bad input (exit 2)."""


def resolve_path(value: str) -> str:
    """A relative path that exists from the working directory as is, else the shipped file of that
    name under optiml_jax/assets/ (`configs/demo.yaml`, `data/sni`, `demo_tokenizer`), so the
    shipped configs run from any directory, from a checkout or an installed wheel alike."""
    if os.path.isabs(value) or os.path.exists(value):
        return value
    candidate = ASSETS_DIR / value
    return str(candidate) if candidate.exists() else value


def is_preset(model: str) -> bool:
    return str(model).startswith(PRESET_PREFIX)


def preset_config(model: str) -> OPTConfig:
    """The architecture of `preset:NAME`: a named preset (`125m`, `opt-iml-max-1.3b`) or a config file
    (`preset:configs/tiny.yaml`, found as `resolve_path` finds it)."""
    name = str(model)[len(PRESET_PREFIX) :]
    return OPTConfig.from_preset(resolve_path(name) if name.endswith((".yaml", ".yml", ".json")) else name)


def looks_like_hub_id(name: str) -> bool:
    """`org/name` that is no local path's spelling (see the module doc)."""
    return (
        name.count("/") == 1
        and not name.startswith(("./", "../", "/", "~", "."))
        and not name.endswith("/")
        and not name.lower().endswith(_FILE_SUFFIXES)
    )


def resolve_model_path(path_or_hub_id: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a hub id fetched with huggingface_hub (config, weights,
    tokenizer files only). ModelNotFoundError when it is neither, saying what was tried."""
    path = Path(resolve_path(str(path_or_hub_id)))
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{path} is a file; pass the model directory that holds config.json")
        return path
    name = str(path_or_hub_id)
    if not looks_like_hub_id(name):
        raise ModelNotFoundError(f"{name}: no such file or directory")
    # optional dependency and start-up cost: only a hub id needs huggingface_hub
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"{name}: no such file or directory, and the hub has no model with the id {name!r}"
        ) from None
    except Exception as e:  # offline, gated repo, a network error
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise ModelNotFoundError(
            f"{name}: no such file or directory, and the hub could not be reached for the id {name!r}; "
            f"if you are offline, download the model elsewhere and pass its local directory "
            f"({type(e).__name__}: {reason})"
        ) from None


__all__ = [
    "HUB_PATTERNS",
    "ModelNotFoundError",
    "PRESET_PREFIX",
    "is_preset",
    "looks_like_hub_id",
    "preset_config",
    "resolve_model_path",
    "resolve_path",
]


DATA_ALIASES = {"sni-sample": SNI_SAMPLE_DIR}


def expand_data_alias(value: str) -> str:
    """The shipped data set `value` names (DATA_ALIASES) unless a path of that name exists here, else
    `value` unchanged. `data/sni`, the path under optiml_jax/assets/, is found by
    resolve_path as every other shipped file is."""
    return str(DATA_ALIASES[value]) if value in DATA_ALIASES and not os.path.exists(value) else value


def shipped_data(data: str, split: str | None) -> tuple[str, str | None]:
    """--data and --split, or the shipped SNI sample they name from any directory: `sni-sample`
    (DATA_ALIASES) or `data/sni` (its path under optiml_jax/assets/). A relative --split that does not
    exist from here is looked for inside the data directory, where the sample keeps its
    `splits/default/test_tasks.txt`."""
    data = resolve_path(expand_data_alias(data))
    if split and not os.path.isabs(split) and not os.path.exists(split):
        inside = os.path.join(data, split)
        split = inside if os.path.exists(inside) else split
    return data, split
