"""Reading PyTorch checkpoint files (`torch.save` pickles) safely and lazily, without torch.

A pickle can run any code while it loads (a `__reduce__` naming `os.system`), and metaseq files hold
more than tensors (argparse Namespaces, OmegaConf configs, training state). So our Unpickler:
  * rebuilds tensors as `LazyTensor`s: shape, dtype and where the bytes lie in the zip archive;
    nothing is read until `.numpy()`, so a converter holds one tensor at a time;
  * allows a short list of harmless globals (OrderedDict, torch.Size, dtypes, storages);
  * refuses globals from modules that can reach the system (os, subprocess, builtins.eval ...);
  * turns every other class into an inert `Stub` that records its constructor arguments and state,
    so a Namespace or DictConfig still loads and `plain()` reads it as a dict. Stubs never run code.

Only torch's zip format (torch >= 1.6, every OPT / OPT-IML release) is read here.
"""

from __future__ import annotations

import dataclasses
import io
import math
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Optional

import ml_dtypes
import numpy as np

# torch storage class name -> numpy dtype of its elements
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
# torch dtype attribute name -> numpy dtype (pickled as GLOBAL 'torch float16')
_TORCH_DTYPES = {
    "float64": np.float64,
    "double": np.float64,
    "float32": np.float32,
    "float": np.float32,
    "float16": np.float16,
    "half": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64,
    "long": np.int64,
    "int32": np.int32,
    "int": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "bool": np.bool_,
}
# Module roots whose globals could touch the system. Anything from these is refused outright (other
# unknown classes become stubs), so a malicious file fails loudly instead of loading as a stub.
_REFUSED_MODULE_ROOTS = frozenset(
    {
        "os",
        "posix",
        "nt",
        "subprocess",
        "sys",
        "shutil",
        "builtins",
        "__builtin__",
        "importlib",
        "runpy",
        "socket",
        "pty",
        "code",
        "codeop",
        "ctypes",
        "cffi",
        "multiprocessing",
        "webbrowser",
        "pickle",
        "_pickle",
        "marshal",
        "io",
        "_io",
        "tempfile",
        "signal",
        "threading",
        "_thread",
        "asyncio",
        "pdb",
        "timeit",
        "platform",
        "urllib",
        "http",
        "ftplib",
        "smtplib",
        "telnetlib",
        "site",
        "sysconfig",
        "dill",
        "cloudpickle",
        "gc",
        "inspect",
    }
)
# Type names only (OmegaConf metadata pickles `builtins.dict` as a type reference); never getattr,
# eval, exec, open, __import__ and friends.
_ALLOWED_BUILTINS = {
    t.__name__: t
    for t in (
        set,
        frozenset,
        slice,
        complex,
        bytearray,
        range,
        dict,
        list,
        tuple,
        int,
        float,
        str,
        bool,
        bytes,
        object,
    )
}


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """The file asks to run something that is not data; it was not loaded."""


class TorchFileError(ValueError):
    """The file is missing, truncated, corrupted or not a torch zip checkpoint; the message names it."""


@dataclasses.dataclass(frozen=True)
class StorageRecord:
    """One storage's bytes inside the archive."""

    file: Path
    data_offset: int  # absolute offset of the record's bytes in the file
    nbytes: int
    dtype: Any
    name: str


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """A tensor not read yet: shape, dtype, and a strided window onto a storage record."""

    storage: StorageRecord
    offset: int  # in elements
    shape: tuple
    stride: tuple

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.storage.dtype)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def is_contiguous(self) -> bool:
        expected = 1
        for dim, stride in zip(reversed(self.shape), reversed(self.stride)):
            if dim != 1 and stride != expected:
                return False
            expected *= dim
        return True

    def flat_range(self, start: int, stop: int, shape: Optional[tuple] = None) -> "LazyTensor":
        """Elements [start, stop) of a contiguous tensor, viewed as `shape` (FSDP unflattening)."""
        if not self.is_contiguous():
            raise TorchFileError(f"{self.storage.file}: storage {self.storage.name} is not contiguous")
        shape = tuple(shape) if shape is not None else (stop - start,)
        if math.prod(shape) != stop - start or not 0 <= start <= stop <= self.size:
            raise TorchFileError(
                f"{self.storage.file}: range [{start}, {stop}) of storage "
                f"{self.storage.name} (size {self.size}) does not fit shape {shape}"
            )
        return LazyTensor(self.storage, self.offset + start, shape, _contiguous_strides(shape))

    def numpy(self) -> np.ndarray:
        """Reads the bytes (and only these) into a fresh array."""
        itemsize = self.dtype.itemsize
        if self.size == 0:
            return np.zeros(self.shape, self.dtype)
        # The span of storage elements this view touches.
        last = self.offset + sum((d - 1) * s for d, s in zip(self.shape, self.stride))
        count = last - self.offset + 1
        if (last + 1) * itemsize > self.storage.nbytes:
            raise TorchFileError(
                f"{self.storage.file}: tensor view runs past the end of storage {self.storage.name}"
            )
        flat = np.empty(count, self.dtype)  # read straight into the result: one copy of the bytes
        with open(self.storage.file, "rb") as f:
            f.seek(self.storage.data_offset + self.offset * itemsize)
            got = f.readinto(memoryview(flat.view(np.uint8)))
        if got != count * itemsize:
            raise TorchFileError(f"{self.storage.file}: truncated (storage {self.storage.name} is cut short)")
        if self.is_contiguous():
            return flat.reshape(self.shape)
        view = np.lib.stride_tricks.as_strided(
            flat, self.shape, tuple(s * itemsize for s in self.stride), writeable=False
        )
        return np.ascontiguousarray(view)


def _contiguous_strides(shape: tuple) -> tuple:
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


class Stub:
    """Stands in for a class we do not import. Records what the pickle gave it; runs nothing."""

    _stub_name = "Stub"

    def __init__(self, *args, **kwargs):
        self._stub_args = args
        self._stub_kwargs = kwargs
        self._stub_state = None

    def __setstate__(self, state):
        self._stub_state = state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], (dict, type(None))):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict state, slot state)
        if isinstance(state, dict):
            for key, value in state.items():
                if isinstance(key, str) and not key.startswith("_stub_"):
                    self.__dict__[key] = value

    def __getitem__(self, key):  # DictConfig / Namespace fields read as items too
        return plain(self)[key]

    def get(self, key, default=None):
        value = plain(self)
        return value.get(key, default) if isinstance(value, dict) else default

    def __repr__(self):
        return f"<{self._stub_name} stub>"


_stub_classes: dict[str, type] = {}


def _stub_class(module: str, name: str) -> type:
    full = f"{module}.{name}"
    if full not in _stub_classes:
        _stub_classes[full] = type(name, (Stub,), {"_stub_name": full, "__module__": "optiml_jax.stubs"})
    return _stub_classes[full]


def plain(obj: Any) -> Any:
    """Stubs, Namespaces and OmegaConf containers as plain dicts/lists, recursively."""
    if isinstance(obj, Stub):
        state = obj._stub_state
        if isinstance(state, dict) and "_content" in state:  # OmegaConf DictConfig / ListConfig / nodes
            return plain(state["_content"])
        if isinstance(state, dict) and "_val" in state:  # an OmegaConf value node
            return plain(state["_val"])
        fields = {k: v for k, v in obj.__dict__.items() if not k.startswith("_stub_")}
        if fields:
            return {k: plain(v) for k, v in fields.items()}
        if obj._stub_args and len(obj._stub_args) == 1:
            return plain(obj._stub_args[0])  # e.g. an enum or a container rebuilt from one argument
        return {}
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj) if isinstance(obj, list) else tuple(plain(v) for v in obj)
    return obj


@dataclasses.dataclass(frozen=True)
class _StorageType:
    dtype: Any


@dataclasses.dataclass(frozen=True)
class TorchDtype:
    name: str


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
    return LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    return func(*args)


def _ordered_dict(*args, **kwargs):
    import collections

    return collections.OrderedDict(*args, **kwargs)


_ALLOWED = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): lambda storage, offset, size, stride: _rebuild_tensor_v2(
        storage, offset, size, stride
    ),
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): tuple,
    ("torch.nn.parameter", "Parameter"): lambda data=None, requires_grad=True: data,
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickles torch zip `data.pkl` into plain data, LazyTensors and Stubs."""

    def __init__(self, data: io.BufferedIOBase, records: dict[str, tuple[int, int]], file: Path):
        super().__init__(data)
        self._records = records
        self._file = file

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name in _TORCH_DTYPES:
            return TorchDtype(name)
        if module in ("builtins", "__builtin__") and name in _ALLOWED_BUILTINS:
            return _ALLOWED_BUILTINS[name]
        if module.split(".")[0] in _REFUSED_MODULE_ROOTS:
            raise UnsafePickleError(
                f"{self._file}: refusing to load: the pickle calls {module}.{name}, "
                f"which is not data (this file may be malicious)"
            )
        return _stub_class(module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TorchFileError(f"{self._file}: unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise TorchFileError(f"{self._file}: unsupported storage type {storage_type!r}")
        record = self._records.get(str(key))
        if record is None:
            raise TorchFileError(f"{self._file}: storage {key} is missing from the archive (truncated?)")
        offset, nbytes = record
        dtype = np.dtype(storage_type.dtype)
        if nbytes < int(numel) * dtype.itemsize:
            raise TorchFileError(
                f"{self._file}: storage {key} holds {nbytes} bytes, expected {int(numel) * dtype.itemsize}"
            )
        return StorageRecord(self._file, offset, nbytes, storage_type.dtype, str(key))


def load(path: str | Path) -> Any:
    """The object a `torch.save` zip file holds, with tensors as LazyTensors. Never runs code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        with open(path, "rb") as f:
            head = f.read(8)
        if head[:2] == b"\x80\x02" or head[:1] == b"\x80":
            raise TorchFileError(
                f"{path}: a legacy (pre-1.6) torch pickle; re-save it with a recent torch "
                f"(torch.save(torch.load(...), ...)) to convert it"
            ) from None
        raise TorchFileError(f"{path}: not a PyTorch zip checkpoint (truncated or corrupted?)") from None
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise TorchFileError(f"{path}: expected one data.pkl in the archive, found {len(pickles)}")
        prefix = pickles[0][: -len("data.pkl")]
        records = {}
        size = path.stat().st_size
        with open(path, "rb") as raw:
            for info in archive.infolist():
                if not info.filename.startswith(prefix + "data/") or info.compress_type != zipfile.ZIP_STORED:
                    continue
                # Data starts after the local header, whose extra field (alignment padding) can differ
                # from the central directory's.
                raw.seek(info.header_offset)
                header = raw.read(30)
                if len(header) != 30 or header[:4] != b"PK\x03\x04":
                    raise TorchFileError(f"{path}: corrupted archive entry {info.filename}")
                name_len, extra_len = struct.unpack("<HH", header[26:30])
                offset = info.header_offset + 30 + name_len + extra_len
                if offset + info.file_size > size:
                    raise TorchFileError(
                        f"{path}: truncated (entry {info.filename} ends past the end of file)"
                    )
                records[info.filename[len(prefix) + len("data/") :]] = (offset, info.file_size)
        try:
            data = archive.read(pickles[0])
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise TorchFileError(f"{path}: corrupted ({e})") from None
    try:
        return SafeUnpickler(io.BytesIO(data), records, path).load()
    except (UnsafePickleError, TorchFileError):
        raise
    except Exception as e:  # a damaged pickle raises many types
        raise TorchFileError(f"{path}: corrupted pickle ({type(e).__name__}: {e})") from None


__all__ = ["load", "LazyTensor", "Stub", "plain", "UnsafePickleError", "TorchFileError", "TorchDtype"]
