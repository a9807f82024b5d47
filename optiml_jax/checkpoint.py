"""Our on-disk model format: config.json + tokenizer files + an Orbax checkpoint of the params.

    DIR/config.json          Hugging Face OPT config (transformers reads it as is)
    DIR/optiml_jax.json      the marker: format name and version, layout, dtype, parameter count
    DIR/vocab.json ...       tokenizer files, when known
    DIR/params/              Orbax (OCDBT) checkpoint of the Flax "params" collection

Params are stored in the stacked-layers layout (`decoder/layers/...` with a leading layer axis, what
`OPTForCausalLM(scan_layers=True)` uses); `restore_params` unstacks them for a scan_layers=False model.
Restoring onto a mesh reads each array straight into its shards (Orbax with target shardings), so no
host ever holds a whole large model.

Writing streams: numpy leaves are handed to Orbax as `StreamedArray`s, written block by block (one
layer of a stacked array at a time) by our own type handler, so saving needs memory for one block,
not for the model (Orbax's stock numpy handler deep-copies every array first).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from optiml_jax.config import OPTConfig

MARKER = "optiml_jax.json"
FORMAT_NAME = "optiml_jax"
FORMAT_VERSION = 1
PARAMS_DIR = "params"
LAYOUT = "stacked_layers"
# Largest block a StreamedArray write reads at once (a whole layer of a stacked array if larger).
# Small blocks keep tensorstore's copies and compression buffers small (measured: 64 MiB blocks cost
# ~300 MiB of RSS while writing, 4 MiB blocks nothing above the staging peak).
WRITE_BLOCK_BYTES = 4 << 20
# Largest stored chunk: a host restoring its shards reads only the chunks that overlap them.
CHUNK_BYTES = 4 << 20


class CheckpointError(ValueError):
    """The output directory or a converted checkpoint is not usable; the message names it."""


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
        raise CheckpointError(f"{marker_path}: format version {marker.get('format_version')} is newer than "
                              f"this optiml_jax reads ({FORMAT_VERSION}); upgrade optiml_jax")
    return marker


# ---------------------------------------------------------------------------------------- atomic dirs
def check_output_dir(directory, overwrite: bool) -> Path:
    """Refuses an existing non-empty directory unless `overwrite`, before any work is done."""
    directory = Path(directory)
    if directory.exists():
        if not directory.is_dir():
            raise CheckpointError(f"{directory}: exists and is not a directory")
        if any(directory.iterdir()) and not overwrite:
            raise CheckpointError(f"{directory}: exists and is not empty (pass --overwrite / overwrite=True "
                                  f"to replace it)")
    return directory


def _multihost() -> tuple[int, int]:
    """(process_index, process_count) when JAX is already imported, else (0, 1): the single-process
    converter never imports jax just for this."""
    import sys

    jax = sys.modules.get("jax")
    if jax is None:
        return 0, 1
    return jax.process_index(), jax.process_count()


def barrier(name: str) -> None:
    """Waits until every JAX process reaches the barrier `name` (nothing on a single process)."""
    if _multihost()[1] > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def atomic_output_dir(directory, overwrite: bool = False, collective: bool = True) -> Iterator[Path]:
    """Yields a temporary directory next to `directory`; renames it into place only on success.

    On any error the temporary directory is removed, so a failed run leaves nothing behind (and an
    existing `directory` being overwritten is untouched).

    Several JAX processes (multi-host): every process must enter it, with the same `directory`. The
    temporary name is then one all processes agree on (`.NAME.tmp-multihost`, a stale one from a dead
    run is removed first); process 0 creates it and, once every process is past the body (a barrier),
    renames it into place; a second barrier lets no process return before the rename. The body runs on
    every process (Orbax writes collectively); write plain files from process 0 only.
    `collective=False`: one process writes the directory alone, with no barriers.
    """
    directory = check_output_dir(directory, overwrite)
    index, count = _multihost()
    if count > 1 and collective:
        yield from _atomic_output_dir_multihost(directory, index)
        return
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(tmp: Path, directory: Path) -> None:
    old = None
    if directory.exists():
        old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(directory, old)
    os.replace(tmp, directory)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _atomic_output_dir_multihost(directory: Path, index: int) -> Iterator[Path]:
    tmp = directory.parent / f".{directory.name}.tmp-multihost"
    tag = str(directory.absolute())
    if index == 0:
        directory.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier(f"atomic_output_dir:create:{tag}")
    try:
        yield tmp
        barrier(f"atomic_output_dir:written:{tag}")
        if index == 0:
            _replace_dir(tmp, directory)
        barrier(f"atomic_output_dir:renamed:{tag}")
    except BaseException:
        if index == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------- streamed arrays
@dataclasses.dataclass(frozen=True)
class StreamedArray:
    """An array Orbax writes block by block along axis 0, read on demand by `read_rows(start, stop)`."""
    shape: tuple
    dtype: np.dtype
    read_rows: Callable[[int, int], np.ndarray]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> "StreamedArray":
        array = np.asarray(array)
        if array.ndim == 0:
            return cls((), array.dtype, lambda start, stop: array)
        return cls(tuple(array.shape), array.dtype, lambda start, stop: array[start:stop])

    @classmethod
    def from_raw_file(cls, path: Path, shape: tuple, dtype) -> "StreamedArray":
        """An array stored C-ordered, headerless, in `path` (what the converter stages)."""
        dtype = np.dtype(dtype)
        row_items = math.prod(shape[1:])

        def read_rows(start, stop):
            out = np.empty((stop - start,) + tuple(shape[1:]), dtype)
            with open(path, "rb") as f:
                f.seek(start * row_items * dtype.itemsize)
                f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
            return out

        return cls(tuple(shape), dtype, read_rows)


def _rows_per_block(shape: tuple, dtype) -> int:
    if not shape:
        return 1
    row_bytes = max(1, math.prod(shape[1:]) * np.dtype(dtype).itemsize)
    return max(1, min(shape[0], WRITE_BLOCK_BYTES // row_bytes))


def _streamed_array_handler_class():
    """Built on first use so importing this module does not import Orbax."""
    import tensorstore as ts
    from orbax.checkpoint import future, type_handlers
    from orbax.checkpoint._src.serialization import ocdbt_utils
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

    class StreamedArrayHandler(type_handlers.NumpyHandler):
        """Writes a StreamedArray one block at a time, arrays one after another.

        The stored array is exactly what NumpyHandler writes (typestr 'np.ndarray'), so the stock
        handlers restore it; chunks are at most one block, so each block write fills whole chunks
        (no read-modify-write of a chunk that spans blocks).
        """

        def __init__(self):
            super().__init__(deepcopy_host_arrays=False)

        async def _write_one(self, value: StreamedArray, info, arg):
            await info.await_path_creation()
            rows = _rows_per_block(value.shape, value.dtype)
            arg = dataclasses.replace(arg, chunk_byte_size=min(arg.chunk_byte_size or CHUNK_BYTES, CHUNK_BYTES))
            write_shape = (rows,) + tuple(value.shape[1:]) if value.shape else ()
            spec = ts_utils.build_array_write_spec(
                info=info, arg=arg, global_shape=value.shape, local_shape=write_shape,
                dtype=np.dtype(value.dtype), use_ocdbt=info.is_ocdbt_checkpoint,
                process_index=ocdbt_utils.get_process_index_for_subdir(use_ocdbt=info.is_ocdbt_checkpoint),
                metadata_key=self._metadata_key)
            store = await ts.open(ts.Spec(spec.json), create=True, open=True, context=info.ts_context)
            if not value.shape:
                await store.write(np.asarray(value.read_rows(0, 1)))
                return
            for start in range(0, value.shape[0], rows):
                stop = min(start + rows, value.shape[0])
                block = np.ascontiguousarray(value.read_rows(start, stop), dtype=value.dtype)
                await store[start:stop].write(block, can_reference_source_data_indefinitely=True)
                del block

        async def _background_serialize(self, values, infos, args=None):
            from orbax.checkpoint._src.multihost import multihost

            if multihost.process_index() != 0:
                return
            for value, info, arg in zip(values, infos, args):
                await self._write_one(value, info, arg)

        async def serialize(self, values, infos, args=None):
            from orbax.checkpoint import SaveArgs

            args = args or [SaveArgs()] * len(values)
            return [future.CommitFutureAwaitingContractedSignals(
                self._background_serialize(values, infos, args), name="streamed_array_handler")]

    return StreamedArrayHandler


_handler_registered = False


def _checkpoint_handler():
    """Orbax's PyTree handler, with our StreamedArray handler registered (once, process-wide: it
    only adds a handler for our own leaf type)."""
    global _handler_registered
    import orbax.checkpoint as ocp

    if not _handler_registered:
        import logging

        # Orbax warns that our typestr equals NumpyHandler's; that is the point (stock restore).
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        absl_logger.setLevel(logging.ERROR)
        try:
            ocp.type_handlers.register_type_handler(StreamedArray, _streamed_array_handler_class()(),
                                                    override=True)
        finally:
            absl_logger.setLevel(level)
        _handler_registered = True
    return ocp.PyTreeCheckpointHandler()


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
    with ocp.Checkpointer(_checkpoint_handler()) as checkpointer:
        checkpointer.save(Path(directory).absolute(), args=ocp.args.PyTreeSave(tree))


# ---------------------------------------------------------------------------------------- save
def save_model(directory, config: OPTConfig, params: dict, tokenizer=None, *, overwrite: bool = False,
               extra_marker: Optional[dict] = None) -> Path:
    """Writes a model directory atomically (temp dir next to `directory`, renamed at the end).

    params: the Flax "params" collection, stacked (scan_layers=True) or not, as numpy arrays or
      (possibly sharded) jax arrays. Stored stacked.
    tokenizer: an OPTTokenizer, a directory holding tokenizer files, or None.
    """
    directory = Path(directory)
    params = to_stacked_layout(params, config)
    check_params_shapes(params, config)
    with atomic_output_dir(directory, overwrite) as tmp:
        write_params(tmp / PARAMS_DIR, params)  # collective on several processes: each writes its shards
        if _multihost()[0] == 0:  # plain files, the marker last, from one process
            finish_model_dir(tmp, config, params_dtype(params), num_params(params), tokenizer, extra_marker)
    return directory


def finish_model_dir(tmp: Path, config: OPTConfig, dtype, n_params: int, tokenizer=None,
                     extra_marker: Optional[dict] = None) -> None:
    """config.json, tokenizer files, then the marker last (its presence means the rest is complete)."""
    config.to_json_file(tmp / "config.json")
    if tokenizer is not None:
        save_tokenizer(tokenizer, tmp)
    marker = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "layout": LAYOUT,
              "params_dir": PARAMS_DIR, "dtype": np.dtype(dtype).name, "num_params": int(n_params),
              **(extra_marker or {})}
    (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def save_tokenizer(tokenizer, directory: Path) -> None:
    from optiml_jax.tokenizer import OPTTokenizer

    if not isinstance(tokenizer, OPTTokenizer):
        tokenizer = OPTTokenizer.from_pretrained(tokenizer)
    tokenizer.save_pretrained(directory)


def to_stacked_layout(params: dict, config: OPTConfig) -> dict:
    """Stacks `decoder/layers_{i}` into `decoder/layers` (lazily for numpy: no copy of the model)."""
    import jax

    params = dict(params.get("params", params)) if "params" in params and len(params) == 1 else dict(params)
    decoder = dict(params["decoder"])
    if "layers" in decoder:
        return params
    layers = [decoder.pop(f"layers_{i}") for i in range(config.num_hidden_layers)]

    def stack(*xs):
        if all(isinstance(x, np.ndarray) for x in xs):
            return StreamedArray((len(xs),) + xs[0].shape, xs[0].dtype,
                                 lambda start, stop: np.stack(xs[start:stop]))
        return jax.numpy.stack(xs)

    decoder["layers"] = jax.tree_util.tree_map(stack, *layers)
    return {**params, "decoder": decoder}


def check_params_shapes(params: dict, config: OPTConfig) -> None:
    """The stacked tree has exactly the model's arrays with the model's shapes."""
    import jax

    from optiml_jax.model import OPTForCausalLM
    from optiml_jax.sharding import abstract_params
    import flax.linen as nn

    expected = nn.meta.unbox(abstract_params(OPTForCausalLM(config, scan_layers=True)))
    flat_expected = {jax.tree_util.keystr(k): v.shape for k, v in
                     jax.tree_util.tree_flatten_with_path(expected)[0]}
    flat_given = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in
                  jax.tree_util.tree_flatten_with_path(
                      params, is_leaf=lambda x: isinstance(x, StreamedArray))[0]}
    missing = sorted(set(flat_expected) - set(flat_given))
    unexpected = sorted(set(flat_given) - set(flat_expected))
    if missing or unexpected:
        raise CheckpointError(f"params do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
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

    return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree_util.tree_leaves(
        params, is_leaf=lambda x: isinstance(x, StreamedArray)))


def num_params(params: dict) -> int:
    import jax

    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(
        params, is_leaf=lambda x: isinstance(x, StreamedArray)))


# ---------------------------------------------------------------------------------------- restore
def restore_params(path, model, mesh=None, rules=None) -> dict:
    """The params of a converted directory for `model` (an OPTForCausalLM), in `model.param_dtype`.

    With a mesh, each array is read straight into the shardings the logical-axis `rules` give
    (each host reads only its shards); otherwise onto the default device.
    """
    import jax
    import orbax.checkpoint as ocp
    import flax.linen as nn

    from optiml_jax.sharding import DEFAULT_RULES, abstract_params, logical_shardings

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
        shapes, shardings)
    target = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                    shapes, shardings)
    params_path = (path / marker.get("params_dir", PARAMS_DIR)).absolute()
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        try:
            stored = checkpointer.metadata(params_path).item_metadata.tree
        except (ValueError, KeyError, FileNotFoundError, OSError) as e:
            raise CheckpointError(f"{params_path}: cannot read the params checkpoint "
                                  f"({type(e).__name__}: {str(e)[:300]})") from None
        _check_stored_shapes(stored, shapes, path)
        params = checkpointer.restore(params_path, args=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args))
    if model.scan_layers:
        return params
    unstacked_shardings = None
    if mesh is not None:
        unstacked_shardings = logical_shardings(abstract_params(model), mesh, rules)
    return unstack_layers(params, model.config.num_hidden_layers, unstacked_shardings)


def _check_stored_shapes(stored, expected, path: Path) -> None:
    """The stored arrays are exactly those config.json describes (checked before reading any)."""
    import jax

    flat_stored = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in
                   jax.tree_util.tree_flatten_with_path(stored)[0]}
    flat_expected = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in
                     jax.tree_util.tree_flatten_with_path(expected)[0]}
    missing = sorted(set(flat_expected) - set(flat_stored))
    unexpected = sorted(set(flat_stored) - set(flat_expected))
    wrong = [f"{k} is {flat_stored[k]}, config.json needs {v}" for k, v in flat_expected.items()
             if k in flat_stored and flat_stored[k] != v]
    if missing or unexpected or wrong:
        detail = "; ".join(filter(None, [missing and f"missing {', '.join(missing[:5])}",
                                         unexpected and f"unexpected {', '.join(unexpected[:5])}",
                                         wrong and "; ".join(wrong[:5])]))
        raise CheckpointError(f"{path}: cannot restore params for this config.json: {detail}")


def unstack_layers(params: dict, num_layers: int, shardings: Optional[dict] = None) -> dict:
    """`decoder/layers` -> `decoder/layers_{i}`, one stacked array at a time (freed as it goes)."""
    import jax

    decoder = dict(params["decoder"])
    stacked = decoder.pop("layers")
    flat, treedef = jax.tree_util.tree_flatten(stacked)
    per_layer = [[None] * len(flat) for _ in range(num_layers)]
    target_flat = None
    if shardings is not None:
        target_flat = [jax.tree_util.tree_flatten(shardings["decoder"][f"layers_{i}"])[0]
                       for i in range(num_layers)]
    take = jax.jit(lambda x, i: jax.lax.dynamic_index_in_dim(x, i, keepdims=False))
    for j in range(len(flat)):
        leaf = flat[j]
        flat[j] = None
        for i in range(num_layers):
            piece = take(leaf, i)
            if target_flat is not None:
                piece = jax.device_put(piece, target_flat[i][j])
            per_layer[i][j] = piece
        del leaf
    for i in range(num_layers):
        decoder[f"layers_{i}"] = jax.tree_util.tree_unflatten(treedef, per_layer[i])
    return {**params, "decoder": decoder}


class ParamsReader:
    """Reads stored arrays one at a time as numpy (Orbax partial restore), for exporters that
    should not hold the whole model."""

    def __init__(self, path):
        import orbax.checkpoint as ocp

        path = Path(path)
        marker = read_marker(path)
        self.params_path = (path / marker.get("params_dir", PARAMS_DIR)).absolute()
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
            restored = self._checkpointer.restore(self.params_path, args=ocp.args.PyTreeRestore(
                item=item, restore_args=args, partial_restore=True))
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(f"{self.params_path}: cannot read {'/'.join(keys)} "
                                  f"({type(e).__name__}: {str(e)[:300]})") from None
        for key in keys:
            restored = restored[key]
        return np.asarray(restored)

    def read_layer(self, keys: Sequence[str], layer: int) -> np.ndarray:
        """`read(keys)[layer]` without reading the other layers: opens the stored zarr array (the
        layout our writer produces: zarr v2 in the checkpoint's OCDBT store) and reads one slice.
        Falls back to a whole-array restore for checkpoints written some other way."""
        import tensorstore as ts

        spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{self.params_path}/",
                                              "path": ".".join(keys)}}
        try:
            store = ts.open(spec, open=True, read=True).result()
            return np.asarray(store[layer].read().result())
        except (ValueError, RuntimeError):
            return self.read(keys)[layer]

    def close(self) -> None:
        self._checkpointer.close()
