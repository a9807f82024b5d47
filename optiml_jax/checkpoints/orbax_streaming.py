"""The one place optiml_jax reaches into Orbax internals: streaming a large numpy array into an Orbax
checkpoint block by block, and reading one slice of a stored array.

Why: Orbax's public numpy handler deep-copies every array before writing and writes it whole, so
converting a 175B checkpoint would need the model in host memory twice; no public API writes an
array in parts. `StreamedArrayHandler` therefore subclasses Orbax's NumpyHandler and uses its
tensorstore spec builder (private modules of orbax-checkpoint), and `read_layer` opens the stored
zarr array inside the checkpoint's OCDBT store with tensorstore (Orbax's storage layout, not an API).
Both are tested on the orbax-checkpoint range pinned in setup.cfg; the stored arrays are exactly
what NumpyHandler writes, so everything else restores them with public APIs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from optiml_jax.checkpoints.streamed import CHUNK_BYTES, WRITE_BLOCK_BYTES, StreamedArray

log = logging.getLogger(__name__)


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
            arg = dataclasses.replace(
                arg, chunk_byte_size=min(arg.chunk_byte_size or CHUNK_BYTES, CHUNK_BYTES)
            )
            write_shape = (rows,) + tuple(value.shape[1:]) if value.shape else ()
            spec = ts_utils.build_array_write_spec(
                info=info,
                arg=arg,
                global_shape=value.shape,
                local_shape=write_shape,
                dtype=np.dtype(value.dtype),
                use_ocdbt=info.is_ocdbt_checkpoint,
                process_index=ocdbt_utils.get_process_index_for_subdir(use_ocdbt=info.is_ocdbt_checkpoint),
                metadata_key=self._metadata_key,
            )
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
            return [
                future.CommitFutureAwaitingContractedSignals(
                    self._background_serialize(values, infos, args), name="streamed_array_handler"
                )
            ]

    return StreamedArrayHandler


_handler_registered = False


def checkpoint_handler():
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
            ocp.type_handlers.register_type_handler(
                StreamedArray, _streamed_array_handler_class()(), override=True
            )
        finally:
            absl_logger.setLevel(level)
        _handler_registered = True
    return ocp.PyTreeCheckpointHandler()


def read_layer(params_path: Path, keys: Sequence[str], layer: int) -> Optional[np.ndarray]:
    """`stored[layer]` of the array at `keys` without reading the other layers, from the layout our
    writer produces (zarr v2 in the checkpoint's OCDBT store); None when the checkpoint is laid out
    some other way (the caller then restores the whole array, and says so)."""
    import tensorstore as ts

    spec = {
        "driver": "zarr",
        "kvstore": {"driver": "ocdbt", "base": f"file://{params_path}/", "path": ".".join(keys)},
    }
    try:
        store = ts.open(spec, open=True, read=True).result()
        return np.asarray(store[layer].read().result())
    except (ValueError, RuntimeError) as e:
        log.warning(
            "%s: cannot read layer %d of %s on its own (%s); reading the whole array",
            params_path,
            layer,
            "/".join(keys),
            str(e).splitlines()[0][:200] if str(e) else type(e).__name__,
        )
        return None
