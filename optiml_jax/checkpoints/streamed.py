"""`StreamedArray`: an array read on demand, a block of rows at a time, so that converting or saving a
model never holds it whole in host memory."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

import numpy as np

# Largest block a StreamedArray write reads at once (a whole layer of a stacked array if larger).
# Small blocks keep tensorstore's copies and compression buffers small (measured: 64 MiB blocks cost
# ~300 MiB of RSS while writing, 4 MiB blocks nothing above the staging peak).
WRITE_BLOCK_BYTES = 4 << 20
# Largest stored chunk: a host restoring its shards reads only the chunks that overlap them.
CHUNK_BYTES = 4 << 20


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
