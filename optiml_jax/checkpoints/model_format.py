"""Our on-disk model format: config.json + tokenizer files + an Orbax checkpoint of the params.

    DIR/config.json          Hugging Face OPT config (transformers reads it as is)
    DIR/optiml_jax.json      the marker: format name and version, layout, dtype, parameter count
    DIR/vocab.json ...       tokenizer files, when known
    DIR/params/              Orbax (OCDBT) checkpoint of the Flax "params" collection

Params are stored in the stacked-layers layout (`decoder/layers/...` with a leading layer axis, what
`OPTForCausalLM(scan_layers=True)` uses); `restore_params` unstacks them for a scan_layers=False model.
Restoring onto a mesh reads each array straight into its shards (Orbax with target shardings), so no
host ever holds a whole large model.

Writing streams: numpy leaves are handed to Orbax as `StreamedArray`s (streamed.py), written block by
block (one layer of a stacked array at a time) by our own type handler (orbax_streaming.py, the one
module that uses Orbax internals), so saving needs memory for one block, not for the model (Orbax's
stock numpy handler deep-copies every array first).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from optiml_jax.checkpoints.mapping import stack_layers, unstack_layers
from optiml_jax.checkpoints.orbax_streaming import checkpoint_handler, read_layer
from optiml_jax.checkpoints.streamed import StreamedArray
from optiml_jax.config import OPTConfig
from optiml_jax.fileio import atomic_output_dir, process_info
from optiml_jax.model import OPTForCausalLM
from optiml_jax.sharding import DEFAULT_RULES, abstract_params, logical_shardings
from optiml_jax.tokenizer import OPTTokenizer

MARKER = "optiml_jax.json"
FORMAT_NAME = "optiml_jax"
FORMAT_VERSION = 1
PARAMS_DIR = "params"
LAYOUT = "stacked_layers"


class CheckpointError(ValueError):
    """A converted checkpoint, or params being saved as one, is not usable; the message names it."""


# ---------------------------------------------------------------------------------------- marker
def is_converted_checkpoint(path) -> bool:
    return (Path(path) / MARKER).is_file()


def read_marker(path) -> dict:
    marker_path = Path(path) / MARKER
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not an optiml_jax checkpoint (no {MARKER})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{marker_path}: corrupted ({e})") from None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{marker_path}: not an optiml_jax marker file")
    if marker.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{marker_path}: format version {marker.get('format_version')} is newer than "
            f"this optiml_jax reads ({FORMAT_VERSION}); upgrade optiml_jax"
        )
    return marker


def write_params(directory, params: dict) -> None:
    """Saves a params tree (numpy, StreamedArray or jax.Array leaves) as an Orbax checkpoint at
    `directory` (which must not exist). numpy leaves are streamed (no copy of the model)."""
    import jax
    import orbax.checkpoint as ocp

    def as_leaf(x):
        if isinstance(x, (StreamedArray, jax.Array)):
            return x
        return StreamedArray.from_numpy(np.asarray(x))

    tree = jax.tree_util.tree_map(as_leaf, params, is_leaf=lambda x: isinstance(x, StreamedArray))
    with ocp.Checkpointer(checkpoint_handler()) as checkpointer:
        checkpointer.save(Path(directory).absolute(), args=ocp.args.PyTreeSave(tree))


# ---------------------------------------------------------------------------------------- save
def save_model(
    directory,
    config: OPTConfig,
    params: dict,
    tokenizer=None,
    *,
    overwrite: bool = False,
    extra_marker: Optional[dict] = None,
    extra_files: Optional[Mapping[str, Path]] = None,
) -> Path:
    """Writes a model directory atomically (temp dir next to `directory`, renamed at the end).

    params: the Flax "params" collection, stacked (scan_layers=True) or not, as numpy arrays or
      (possibly sharded) jax arrays. Stored stacked.
    tokenizer: an OPTTokenizer, a directory holding tokenizer files, or None.
    extra_files: name -> a file (on process 0) copied into the directory, so the directory appears with
      it (fine-tuning's final/ with its scores, metrics.json).
    """
    directory = Path(directory)
    params = to_stacked_layout(params, config)
    check_params_shapes(params, config)
    with atomic_output_dir(directory, overwrite) as tmp:
        write_params(tmp / PARAMS_DIR, params)  # collective on several processes: each writes its shards
        if process_info()[0] == 0:  # plain files, the marker last, from one process
            for name, source in (extra_files or {}).items():
                shutil.copyfile(source, tmp / name)
            finish_model_dir(tmp, config, params_dtype(params), num_params(params), tokenizer, extra_marker)
    return directory


def finish_model_dir(
    tmp: Path, config: OPTConfig, dtype, n_params: int, tokenizer=None, extra_marker: Optional[dict] = None
) -> None:
    """config.json, tokenizer files, then the marker last (its presence means the rest is complete)."""
    config.to_json_file(tmp / "config.json")
    if tokenizer is not None:
        save_tokenizer(tokenizer, tmp)
    marker = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "layout": LAYOUT,
        "params_dir": PARAMS_DIR,
        "dtype": np.dtype(dtype).name,
        "num_params": int(n_params),
        **(extra_marker or {}),
    }
    (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def save_tokenizer(tokenizer, directory: Path) -> None:

    if not isinstance(tokenizer, OPTTokenizer):
        tokenizer = OPTTokenizer.from_pretrained(tokenizer)
    tokenizer.save_pretrained(directory)


def to_stacked_layout(params: dict, config: OPTConfig) -> dict:
    """Stacks `decoder/layers_{i}` into `decoder/layers` (lazily for numpy: no copy of the model)."""
    import jax

    params = dict(params.get("params", params)) if "params" in params and len(params) == 1 else dict(params)

    def stack(*xs):
        if all(isinstance(x, np.ndarray) for x in xs):
            return StreamedArray(
                (len(xs),) + xs[0].shape, xs[0].dtype, lambda start, stop: np.stack(xs[start:stop])
            )
        return jax.numpy.stack(xs)

    return stack_layers(params, config.num_hidden_layers, stack)


def check_params_shapes(params: dict, config: OPTConfig) -> None:
    """The stacked tree has exactly the model's arrays with the model's shapes."""
    import flax.linen as nn
    import jax

    expected = nn.meta.unbox(abstract_params(OPTForCausalLM(config, scan_layers=True)))
    flat_expected = {
        jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(expected)[0]
    }
    flat_given = {
        jax.tree_util.keystr(k): tuple(v.shape)
        for k, v in jax.tree_util.tree_flatten_with_path(
            params, is_leaf=lambda x: isinstance(x, StreamedArray)
        )[0]
    }
    missing = sorted(set(flat_expected) - set(flat_given))
    unexpected = sorted(set(flat_given) - set(flat_expected))
    if missing or unexpected:
        raise CheckpointError(
            f"params do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, shape in flat_expected.items():
        if tuple(shape) != flat_given[key]:
            raise CheckpointError(f"params{key} has shape {flat_given[key]}, the config needs {tuple(shape)}")


def params_dtype(params: dict):
    import jax

    leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, StreamedArray))
    dtypes = {np.dtype(leaf.dtype) for leaf in leaves}
    return dtypes.pop() if len(dtypes) == 1 else np.dtype(leaves[0].dtype)


def num_bytes(params: dict) -> int:
    import jax

    return sum(
        math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        for leaf in jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, StreamedArray))
    )


def num_params(params: dict) -> int:
    import jax

    return sum(
        math.prod(leaf.shape)
        for leaf in jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, StreamedArray))
    )


# ---------------------------------------------------------------------------------------- restore
def restore_params(path, model, mesh=None, rules=None) -> dict:
    """The params of a converted directory for `model` (an OPTForCausalLM), in `model.param_dtype`.

    With a mesh, each array is read straight into the shardings the logical-axis `rules` give
    (each host reads only its shards); otherwise onto the default device.
    """
    import flax.linen as nn
    import jax
    import orbax.checkpoint as ocp

    path = Path(path)
    marker = read_marker(path)
    if marker.get("layout") != LAYOUT:
        raise CheckpointError(f"{path / MARKER}: unknown params layout {marker.get('layout')!r}")
    rules = rules or DEFAULT_RULES
    stacked_model = model.clone(scan_layers=True)
    abstract = abstract_params(stacked_model)
    if mesh is not None:
        shardings = logical_shardings(abstract, mesh, rules)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: device, nn.meta.unbox(abstract))
    shapes = nn.meta.unbox(abstract)
    restore_args = jax.tree_util.tree_map(
        lambda s, sh: ocp.ArrayRestoreArgs(sharding=sh, global_shape=s.shape, dtype=s.dtype),
        shapes,
        shardings,
    )
    target = jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    params_path = (path / marker.get("params_dir", PARAMS_DIR)).absolute()
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        try:
            metadata = checkpointer.metadata(params_path).item_metadata
        except (ValueError, KeyError, FileNotFoundError, OSError) as e:
            raise CheckpointError(
                f"{params_path}: cannot read the params checkpoint ({type(e).__name__}: {str(e)[:300]})"
            ) from None
        if metadata is None:  # Orbax answers None when _METADATA or the OCDBT manifest is gone
            missing = [name for name in ("_METADATA", "manifest.ocdbt") if not (params_path / name).is_file()]
            raise CheckpointError(
                f"{params_path}: cannot read the params checkpoint: "
                + (f"{', '.join(missing)} missing" if missing else "its metadata is unreadable")
                + " (the directory is incomplete: convert or save the model again)"
            )
        _check_stored_shapes(metadata.tree, shapes, path)
        try:
            params = checkpointer.restore(
                params_path, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args)
            )
        except Exception as e:  # TensorStore raises bare Exceptions; its cause names the array
            raise CheckpointError(f"{params_path}: {_unreadable_array(e)}") from None
    if model.scan_layers:
        return params
    unstacked_shardings = None
    if mesh is not None:
        unstacked_shardings = logical_shardings(abstract_params(model), mesh, rules)
    return unstack_layers(params, model.config.num_hidden_layers, unstacked_shardings)


def _unreadable_array(error: BaseException) -> str:
    """One line for a failed Orbax / TensorStore read: the innermost cause names the array and says
    what went wrong (a data file under params/ deleted or cut short), the outer one only dumps a spec."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    message = " ".join(str(error).split())[:300]
    return f"a params file is missing or damaged, cannot read the arrays ({message})"


def _check_stored_shapes(stored, expected, path: Path) -> None:
    """The stored arrays are exactly those config.json describes (checked before reading any)."""
    import jax

    flat_stored = {
        jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_flatten_with_path(stored)[0]
    }
    flat_expected = {
        jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_flatten_with_path(expected)[0]
    }
    missing = sorted(set(flat_expected) - set(flat_stored))
    unexpected = sorted(set(flat_stored) - set(flat_expected))
    wrong = [
        f"{k} is {flat_stored[k]}, config.json needs {v}"
        for k, v in flat_expected.items()
        if k in flat_stored and flat_stored[k] != v
    ]
    if missing or unexpected or wrong:
        detail = "; ".join(
            filter(
                None,
                [
                    missing and f"missing {', '.join(missing[:5])}",
                    unexpected and f"unexpected {', '.join(unexpected[:5])}",
                    wrong and "; ".join(wrong[:5]),
                ],
            )
        )
        raise CheckpointError(f"{path}: cannot restore params for this config.json: {detail}")


class ParamsReader:
    """Reads stored arrays one at a time as numpy (Orbax partial restore), for exporters that
    should not hold the whole model: of one of our model directories (`path`), or of any Orbax PyTree
    checkpoint (`params_path`; a training checkpoint's state/ holds the params under "params")."""

    def __init__(self, path=None, *, params_path=None):
        import orbax.checkpoint as ocp

        if params_path is None:
            marker = read_marker(path)
            params_path = Path(path) / marker.get("params_dir", PARAMS_DIR)
        self.params_path = Path(params_path).absolute()
        self._checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())

    def read(self, keys: Sequence[str]) -> np.ndarray:
        import orbax.checkpoint as ocp

        item, args = {}, {}
        node_item, node_args = item, args
        for key in keys[:-1]:
            node_item = node_item.setdefault(key, {})
            node_args = node_args.setdefault(key, {})
        node_item[keys[-1]] = np.zeros(())  # only the structure matters for a partial restore
        node_args[keys[-1]] = ocp.RestoreArgs(restore_type=np.ndarray)
        try:
            restored = self._checkpointer.restore(
                self.params_path,
                args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True),
            )
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(
                f"{self.params_path}: cannot read {'/'.join(keys)} ({type(e).__name__}: {str(e)[:300]})"
            ) from None
        for key in keys:
            restored = restored[key]
        return np.asarray(restored)

    def read_layer(self, keys: Sequence[str], layer: int) -> np.ndarray:
        """`read(keys)[layer]`, reading only that layer where the stored layout allows (a warning says
        when it does not and the whole array is read)."""
        array = read_layer(self.params_path, keys, layer)
        return self.read(keys)[layer] if array is None else array

    def close(self) -> None:
        self._checkpointer.close()
