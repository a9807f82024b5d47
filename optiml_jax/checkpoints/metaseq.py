"""Reading metaseq (original OPT / OPT-IML) checkpoints as a stream of Hugging Face-named tensors.

Handles, per docs/spec (opt_formats.md §2, §3):
  * a consolidated file (`restored.pt`, `reshard.pt`, `reshard-model_part-0.pt` with one part);
  * model-parallel parts `*model_part-K.pt`, merged per tensor kind (vocab rows, column- and
    row-parallel halves, replicated biases and norms); a fused `qkv_proj` is split per part into
    its K, V, Q blocks before merging, never concatenated raw;
  * FSDP-flattened parts (`flat_param_0` + `shard_metadata`), unflattened, and raw FSDP shards
    `*model_part-K-shardN.pt`, concatenated per part (each shard's padding dropped) first.
Tensors stay lazy (torch_pickle.LazyTensor) until their turn, so memory holds one merged tensor.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from optiml_jax.checkpoints import torch_pickle
from optiml_jax.config import ConfigError, OPTConfig

PART_PATTERN = re.compile(r"^(?P<prefix>.*?)-?model_part-(?P<part>\d+)(?:-shard(?P<shard>\d+))?\.pt$")
# FSDP / flatten-wrapper module names that fairscale strips from parameter paths.
_WRAPPER_NAMES = ("_fsdp_wrapped_module.", "_fpw_module.")
_DROPPED_KEYS = re.compile(
    r"^(decoder\.version|decoder\.output_projection\.weight|"
    r"decoder\.embed_positions\._float_tensor)$"
)
_RENAMES = (
    ("decoder.project_in_dim.", "decoder.project_in."),
    ("decoder.project_out_dim.", "decoder.project_out."),
    ("decoder.layer_norm.", "decoder.final_layer_norm."),
)
_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


class MetaseqError(ValueError):
    """A metaseq checkpoint is incomplete or inconsistent; the message names the file and key."""


# ---------------------------------------------------------------------------------------- lazy pieces
@dataclasses.dataclass(frozen=True)
class ConcatenatedFlat:
    """Consecutive 1-D pieces (from several FSDP shards) viewed as one tensor of `shape`."""

    pieces: tuple  # of 1-D LazyTensors
    shape: tuple

    @property
    def dtype(self):
        return self.pieces[0].dtype

    def numpy(self) -> np.ndarray:
        out = np.empty(math.prod(self.shape), self.dtype)
        pos = 0
        for piece in self.pieces:
            out[pos : pos + piece.size] = piece.numpy()
            pos += piece.size
        return out.reshape(self.shape)


def _flat_slice(shards: list, start: int, stop: int, shape: tuple):
    """Elements [start, stop) of the concatenation of `shards` (unpadded 1-D LazyTensors)."""
    pieces, offset = [], 0
    for shard in shards:
        lo, hi = max(start, offset), min(stop, offset + shard.size)
        if lo < hi:
            pieces.append(shard.flat_range(lo - offset, hi - offset))
        offset += shard.size
    if len(pieces) == 1:
        return pieces[0].flat_range(0, pieces[0].size, shape)
    return ConcatenatedFlat(tuple(pieces), tuple(shape))


# ---------------------------------------------------------------------------------------- files
@dataclasses.dataclass
class MetaseqFiles:
    """parts[k] = the files of model-parallel part k (several only for raw FSDP shards)."""

    parts: list

    @property
    def all_files(self) -> list:
        return [f for part in self.parts for f in part]


def find_files(path: str | Path) -> MetaseqFiles:
    """The part files of a checkpoint given as one file or a directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_file():
        match = PART_PATTERN.match(path.name)
        if match is None:
            return MetaseqFiles([[path]])
        candidates = [p for p in path.parent.iterdir() if p.is_file()]
        prefix = match.group("prefix")
    else:
        candidates = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".pt")
        if not candidates:
            raise FileNotFoundError(f"{path}: no metaseq checkpoint (*.pt) files in this directory")
        prefixes = {m.group("prefix") for m in map(PART_PATTERN.match, (p.name for p in candidates)) if m}
        if not prefixes:
            if len(candidates) > 1:
                raise MetaseqError(
                    f"{path}: several .pt files and none named *model_part-K.pt "
                    f"({', '.join(p.name for p in candidates)}); pass the one file to convert"
                )
            return MetaseqFiles([[candidates[0]]])
        if len(prefixes) > 1:
            raise MetaseqError(
                f"{path}: files of several checkpoints ({', '.join(sorted(prefixes))}); "
                f"pass one of their part files"
            )
        prefix = prefixes.pop()
    parts: dict[int, dict[int, Path]] = {}
    for candidate in candidates:
        m = PART_PATTERN.match(candidate.name)
        if m is None or m.group("prefix") != prefix:
            continue
        shard = int(m.group("shard")) if m.group("shard") is not None else -1
        parts.setdefault(int(m.group("part")), {})[shard] = candidate
    numbers = sorted(parts)
    if numbers != list(range(len(numbers))):
        missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
        raise FileNotFoundError(
            f"{path}: model part(s) {missing} of '{prefix}' are missing (found parts {numbers})"
        )
    ordered = []
    for number in numbers:
        shards = parts[number]
        if -1 in shards and len(shards) > 1:
            raise MetaseqError(f"{path}: part {number} has both an unsharded file and FSDP shard files")
        shard_numbers = sorted(shards)
        if shard_numbers != [-1] and shard_numbers != list(range(len(shard_numbers))):
            raise FileNotFoundError(
                f"{path}: part {number} is missing FSDP shard(s) "
                f"{sorted(set(range(max(shard_numbers) + 1)) - set(shard_numbers))}"
            )
        ordered.append([shards[s] for s in shard_numbers])
    return MetaseqFiles(ordered)


# ---------------------------------------------------------------------------------------- one part
@dataclasses.dataclass
class Part:
    """One model-parallel part, unflattened: metaseq names -> lazy tensors."""

    tensors: "OrderedDict[str, Any]"
    files: list
    model_args: dict  # cfg["model"] or args, as a plain dict ({} when absent)


def _load_file(path: Path) -> dict:
    try:
        obj = torch_pickle.load(path)
    except torch_pickle.TorchFileError as e:
        raise MetaseqError(str(e)) from None
    if not isinstance(obj, dict):
        raise MetaseqError(f"{path}: expected a checkpoint dict, got {type(obj).__name__}")
    return obj


def _model_args(obj: dict) -> dict:
    """Hyper-parameters from `cfg["model"]` (OmegaConf or dict) or `args` (argparse Namespace)."""
    cfg = torch_pickle.plain(obj.get("cfg"))
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
        return cfg["model"]
    args = torch_pickle.plain(obj.get("args"))
    return args if isinstance(args, dict) else {}


def _clean(name: str) -> str:
    for wrapper in _WRAPPER_NAMES:
        name = name.replace(wrapper, "")
    return name


def load_part(files: list) -> Part:
    """Loads a part's file(s) lazily and unflattens FSDP flat params."""
    objs = [_load_file(f) for f in files]
    models = []
    for f, obj in zip(files, objs):
        model = obj.get(
            "model", obj if all(isinstance(v, torch_pickle.LazyTensor) for v in obj.values()) else None
        )
        if not isinstance(model, dict):
            raise MetaseqError(
                f"{f}: no 'model' state dict in this checkpoint (keys: {', '.join(map(str, obj))})"
            )
        models.append(OrderedDict((_clean(k), v) for k, v in model.items()))
    flattened = any("flat_param_" in k for k in models[0])
    if not flattened and len(files) > 1:
        raise MetaseqError(
            f"{files[0]}: FSDP shard files hold unflattened weights; expected flat_param_* keys"
        )
    tensors = _unflatten(files, objs, models) if flattened else models[0]
    for key, value in tensors.items():
        if not isinstance(value, (torch_pickle.LazyTensor, ConcatenatedFlat)):
            raise MetaseqError(
                f"{files[0]}: entry {key!r} of 'model' is a {type(value).__name__}, not a tensor"
            )
    return Part(tensors, files, _model_args(objs[0]))


def _unflatten(files: list, objs: list, models: list) -> "OrderedDict[str, Any]":
    """fairscale's consolidate_shard_weights: concat each flat param's shards (minus each rank's
    padding), split by numels, view as the recorded shapes."""
    metadatas = []
    for f, obj in zip(files, objs):
        meta = torch_pickle.plain(obj.get("shard_metadata"))
        if not isinstance(meta, dict) or "param_metadata" not in meta:
            raise MetaseqError(
                f"{f}: FSDP-flattened weights (flat_param_* keys) but no shard_metadata; cannot unflatten"
            )
        metadatas.append(meta)
    out: OrderedDict = OrderedDict()
    for j, entry in enumerate(metadatas[0]["param_metadata"]):
        fsdp_path = _clean(entry.get("fsdp_path", "") or "")
        if entry.get("no_broadcast_optim_state"):
            shard_range = [0]
        else:
            shard_range = range(len(files))
        for flat_name, info in entry["params"].items():
            key = f"{fsdp_path}.{flat_name}" if fsdp_path else flat_name
            shards = []
            for r in shard_range:
                flat = models[r].get(key)
                if flat is None:
                    raise MetaseqError(f"{files[r]}: flat parameter {key} is missing")
                try:
                    padding = int(metadatas[r]["param_metadata"][j]["params"][flat_name].get("padding", 0))
                except (KeyError, IndexError, TypeError):
                    raise MetaseqError(f"{files[r]}: shard_metadata has no entry for {key}") from None
                shards.append(flat.flat_range(0, flat.size - padding))
            names, shapes, numels = info["names"], info["shapes"], info["numels"]
            total = sum(s.size for s in shards)
            if sum(int(n) for n in numels) != total:
                raise MetaseqError(
                    f"{files[0]}: {key} holds {total} elements after removing padding, but "
                    f"shard_metadata lists {sum(int(n) for n in numels)}"
                )
            offset = 0
            for name, shape, numel in zip(names, shapes, numels):
                shape = tuple(int(d) for d in shape)
                numel = int(numel)
                if math.prod(shape) != numel:
                    raise MetaseqError(
                        f"{files[0]}: shard_metadata gives {name} shape {shape} but {numel} elements"
                    )
                full = _clean(f"{fsdp_path}.{name}" if fsdp_path else name)
                out[full] = _flat_slice(shards, offset, offset + numel, shape)
                offset += numel
        for src, dst in entry.get("shared_param_info", []) or []:
            src, dst = _clean(src), _clean(dst)
            if src in out:
                out[dst] = out[src]
    for key, value in models[0].items():  # buffers (decoder.version) come from shard 0
        if "flat_param_" not in key and key not in out:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------- merging
def _kind(key: str) -> str:
    """How model-parallel parts of this (metaseq-named) tensor combine (spec §3.4)."""
    if key == "decoder.embed_tokens.weight":
        return "rows"
    m = _LAYER_KEY.match(key)
    if m:
        rest = m.group(2)
        if rest.startswith("self_attn.qkv_proj."):
            return "qkv"
        if rest in (
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.q_proj.bias",
            "self_attn.k_proj.bias",
            "self_attn.v_proj.bias",
            "fc1.weight",
            "fc1.bias",
        ):
            return "rows"
        if rest in ("self_attn.out_proj.weight", "fc2.weight"):
            return "columns"
    return "replicated"


def hf_name(key: str) -> str:
    for old, new in _RENAMES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def iter_hf_tensors(parts: list) -> Iterator[tuple[str, np.ndarray, str]]:
    """(HF key, array, source files) for every weight, merging parts one tensor at a time."""
    first = parts[0]
    source_of = lambda i: (
        str(parts[i].files[0]) if len(parts[i].files) == 1 else f"{parts[i].files[0]} (+shards)"
    )
    for i, part in enumerate(parts[1:], start=1):
        missing = [k for k in first.tensors if k not in part.tensors]
        extra = [k for k in part.tensors if k not in first.tensors]
        if missing or extra:
            what = f"lacks {missing[0]}" if missing else f"has unexpected {extra[0]}"
            raise MetaseqError(f"{source_of(i)}: model part {i} {what} (part 0 {source_of(0)} differs)")
    for key in first.tensors:
        if _DROPPED_KEYS.match(key):
            continue
        kind = _kind(key)
        pieces = [part.tensors[key] for part in parts]
        shapes = {tuple(p.shape) for p in pieces}
        if kind == "replicated" or len(parts) == 1:
            if len(shapes) != 1:
                raise MetaseqError(
                    f"{source_of(0)}: {key} should be replicated across model parts but has "
                    f"shapes {sorted(shapes)}"
                )
            if kind == "qkv":
                yield from _split_qkv(key, [pieces[0]], source_of(0))
            else:
                yield hf_name(key), pieces[0].numpy(), source_of(0)
            continue
        if len(shapes) != 1:
            raise MetaseqError(f"{source_of(0)}: model parts of {key} have different shapes {sorted(shapes)}")
        if kind == "qkv":
            yield from _split_qkv(key, pieces, source_of(0))
        else:
            axis = 0 if kind == "rows" else 1
            yield hf_name(key), _concatenate(pieces, axis), source_of(0)


def _concatenate(pieces: list, axis: int) -> np.ndarray:
    """Concatenates lazily read pieces into one preallocated array (one piece in memory extra)."""
    shape = list(pieces[0].shape)
    step = shape[axis]
    shape[axis] *= len(pieces)
    out = np.empty(shape, pieces[0].dtype)
    for r, piece in enumerate(pieces):
        index = [slice(None)] * len(shape)
        index[axis] = slice(r * step, (r + 1) * step)
        out[tuple(index)] = piece.numpy()
    return out


def _split_qkv(key: str, pieces: list, source: str) -> Iterator[tuple[str, np.ndarray, str]]:
    """Each part's fused block is [K_r; V_r; Q_r]; K = cat(K_r) etc. (metaseq's order is K, V, Q)."""
    rows = pieces[0].shape[0]
    if rows % 3:
        raise MetaseqError(f"{source}: {key} has {rows} rows, not divisible into K, V, Q")
    third = rows // 3
    suffix = key[len(key.rsplit(".", 1)[0]) :]  # ".weight" / ".bias"
    base = key[: -len(suffix)].replace("qkv_proj", "{}")
    merged = {
        name: np.empty((third * len(pieces),) + tuple(pieces[0].shape[1:]), pieces[0].dtype)
        for name in ("k_proj", "v_proj", "q_proj")
    }
    for r, piece in enumerate(pieces):
        block = piece.numpy()
        for c, name in enumerate(("k_proj", "v_proj", "q_proj")):
            merged[name][r * third : (r + 1) * third] = block[c * third : (c + 1) * third]
        del block
    for name in ("q_proj", "k_proj", "v_proj"):
        yield hf_name(base.format(name) + suffix), merged.pop(name), source


# ---------------------------------------------------------------------------------------- config
def infer_config(parts: list, override: Optional[OPTConfig] = None) -> OPTConfig:
    """The OPTConfig from the checkpoint's own cfg/args and tensor shapes; `override` (from
    --config) wins when given. Heads cannot be read from shapes, so without cfg/args they need it."""
    if override is not None:
        return override
    tensors, args = parts[0].tensors, parts[0].model_args
    source = str(parts[0].files[0])
    mp = len(parts)

    def shape(key):
        if key not in tensors:
            raise MetaseqError(f"{source}: missing tensor {key}")
        return tuple(tensors[key].shape)

    heads = args.get("decoder_attention_heads")
    if not heads:
        raise MetaseqError(
            f"{source}: the checkpoint's cfg/args do not give decoder_attention_heads, and the "
            f"number of heads cannot be inferred from tensor shapes; pass --config with a "
            f"preset (e.g. --config 1.3b) or a config.json"
        )
    vocab, embed_dim = shape("decoder.embed_tokens.weight")
    positions, hidden = shape("decoder.embed_positions.weight")
    layers = {int(m.group(1)) for m in map(_LAYER_KEY.match, tensors) if m}
    fc1 = shape("decoder.layers.0.fc1.weight")
    normalize_before = args.get("decoder_normalize_before")
    has_final_norm = "decoder.layer_norm.weight" in tensors
    if normalize_before is None:
        normalize_before = has_final_norm
    activation = args.get("activation_fn", "relu") or "relu"
    try:
        return OPTConfig(
            vocab_size=vocab * mp,
            hidden_size=hidden,
            num_hidden_layers=len(layers),
            ffn_dim=fc1[0] * mp,
            max_position_embeddings=positions - 2,
            do_layer_norm_before=bool(normalize_before),
            remove_final_layer_norm=bool(normalize_before) and not has_final_norm,
            word_embed_proj_dim=embed_dim,
            num_attention_heads=int(heads),
            activation_function=activation,
            dropout=float(args.get("dropout", 0.1) or 0.0),
            attention_dropout=float(args.get("attention_dropout", 0.0) or 0.0),
            enable_bias=any(k.endswith(("qkv_proj.bias", "q_proj.bias")) for k in tensors),
        )
    except ConfigError as e:
        raise MetaseqError(
            f"{source}: the checkpoint's hyper-parameters do not make a valid OPT config ({e}); pass --config"
        ) from None


def open_checkpoint(path: str | Path) -> list:
    """Every model part of the checkpoint at `path`, loaded lazily (no tensor data read yet)."""
    found = find_files(path)
    parts = [load_part(files) for files in found.parts]
    declared = parts[0].model_args.get("model_parallel_size")
    if isinstance(declared, int) and declared != len(parts):
        raise FileNotFoundError(
            f"{parts[0].files[0]}: cfg says model_parallel_size={declared} but {len(parts)} part(s) were "
            "found; "
            f"model part(s) {sorted(set(range(declared)) - set(range(len(parts))))} missing?"
        )
    return parts


__all__ = [
    "find_files",
    "load_part",
    "open_checkpoint",
    "iter_hf_tensors",
    "infer_config",
    "hf_name",
    "MetaseqError",
    "MetaseqFiles",
    "Part",
]
