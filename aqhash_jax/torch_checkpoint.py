"""Read PyTorch checkpoint files into numpy arrays without importing torch.

Two on-disk formats exist (see `torch/serialization.py` in PyTorch 2.x):

- zip (the default since PyTorch 1.6): a zip archive with `<prefix>/data.pkl`, the pickled object,
  and `<prefix>/data/<key>`, the raw bytes of each storage. An optional `<prefix>/byteorder`
  contains "little" or "big", and little-endian is assumed without it.
- legacy (`_use_new_zipfile_serialization=False` and files written before 1.6): five
  concatenated pickles and raw data: the magic number 0x1950a86a20f9469cfc6c, the protocol version
  1001, a dict of system info, the pickled object, and the list of storage keys; then for each key
  in that order an int64 element count followed by that many elements of raw little-endian data.

In both, tensors are pickled as calls to `torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, ...)` whose storage argument is a persistent id `("storage", storage_type, key, location,
numel[, view_metadata])`. The unpickler here accepts only those callables, the typed storage
classes and `collections.OrderedDict`; any other global raises `UnsupportedCheckpointError`, so
a file cannot run code on load.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# Storage class name in the `torch` module -> numpy dtype of its elements.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}

_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")


class UnsupportedCheckpointError(ValueError):
    """The file uses a construct this reader does not accept (or is not a PyTorch checkpoint)."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
    name: str
    dtype: np.dtype


@dataclasses.dataclass
class _StorageRef:
    key: str
    dtype: np.dtype
    numel: int
    # Legacy files written before PyTorch 1.0 may point into a larger root storage.
    view_offset: int = 0


@dataclasses.dataclass
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    if not isinstance(storage, _StorageRef):
        raise UnsupportedCheckpointError(
            f"A tensor refers to {type(storage).__name__}, not to a storage of the file."
        )
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
    return data


_ALLOWED_CALLABLES = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only tensor-rebuilding globals and returns storage references."""

    def __init__(self, file: BinaryIO, path: str):
        super().__init__(file, encoding="utf-8")
        self._path = path
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_CALLABLES:
            return _ALLOWED_CALLABLES[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name, STORAGE_DTYPES[name])
        raise UnsupportedCheckpointError(
            f"{self._path}: the pickle refers to {module}.{name}, which this reader does not "
            "accept. Only tensors, storages and (ordered) dicts, lists and plain values can be "
            "read without torch; re-save the checkpoint as a state dict "
            "(torch.save(model.state_dict(), path))."
        )

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise UnsupportedCheckpointError(f"{self._path}: unknown persistent id {pid!r}.")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise UnsupportedCheckpointError(
                f"{self._path}: storage type {storage_type!r} is not supported; supported: "
                f"{sorted(STORAGE_DTYPES)}."
            )
        view_metadata = pid[5] if len(pid) > 5 else None
        key = str(key)
        if key not in self.storages:
            self.storages[key] = _StorageRef(key, storage_type.dtype, int(numel))
        root = self.storages[key]
        if view_metadata is None:
            return root
        _view_key, view_offset, view_size = view_metadata
        return _StorageRef(root.key, root.dtype, int(view_size), int(view_offset))


def _materialize(obj: Any, buffers: Mapping[str, np.ndarray]) -> Any:
    """Replace every tensor reference in a nested container by a numpy array (a copy)."""
    if isinstance(obj, _TensorRef):
        flat = buffers[obj.storage.key]
        start = obj.storage.view_offset + obj.offset
        if not obj.size:
            return np.array(flat[start])
        extent = sum((n - 1) * s for n, s in zip(obj.size, obj.stride)) + 1
        if any(n == 0 for n in obj.size):
            return np.zeros(obj.size, flat.dtype)
        if start + extent > flat.size:
            raise UnsupportedCheckpointError(
                f"A tensor of size {obj.size} and stride {obj.stride} at offset {start} reaches "
                f"past the end of storage {obj.storage.key} ({flat.size} elements); "
                "the file is truncated or corrupt."
            )
        base = flat[start:]
        strides = tuple(s * flat.itemsize for s in obj.stride)
        view = np.lib.stride_tricks.as_strided(base, obj.size, strides, writeable=False)
        return np.ascontiguousarray(view)
    if isinstance(obj, _StorageRef):
        return np.array(buffers[obj.key][obj.view_offset : obj.view_offset + obj.numel])
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _materialize(v, buffers)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _materialize(v, buffers) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialize(v, buffers) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialize(v, buffers) for v in obj)
    return obj


def _read_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise UnsupportedCheckpointError(
                f"{path}: a zip checkpoint must contain exactly one <prefix>/data.pkl; found "
                f"{pickles or 'none'}."
            )
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = archive.read(prefix + "byteorder").decode("ascii").strip()

        unpickler = _RestrictedUnpickler(
            io.BytesIO(archive.read(pickles[0])), path
        )
        obj = unpickler.load()

        buffers = {}
        for key, ref in unpickler.storages.items():
            member = f"{prefix}data/{key}"
            if member not in names:
                raise UnsupportedCheckpointError(f"{path}: storage {member} is missing.")
            dtype = ref.dtype.newbyteorder("<" if byteorder == "little" else ">")
            raw = archive.read(member)
            buffers[key] = np.frombuffer(raw, dtype=dtype).astype(ref.dtype, copy=False)
    return _materialize(obj, buffers)


def _read_legacy(path: str) -> Any:
    with open(path, "rb") as f:
        magic = pickle.load(f)
        if magic != LEGACY_MAGIC_NUMBER:
            raise UnsupportedCheckpointError(
                f"{path}: not a PyTorch checkpoint (the first pickle is {magic!r}, not the legacy "
                "magic number, and the file is not a zip archive)."
            )
        protocol = pickle.load(f)
        if protocol != LEGACY_PROTOCOL_VERSION:
            raise UnsupportedCheckpointError(
                f"{path}: legacy protocol version {protocol!r} is not supported "
                f"(expected {LEGACY_PROTOCOL_VERSION})."
            )
        sys_info = pickle.load(f)
        if not sys_info.get("little_endian", True):
            raise UnsupportedCheckpointError(f"{path}: big-endian legacy checkpoints are not supported.")

        unpickler = _RestrictedUnpickler(f, path)
        obj = unpickler.load()
        keys = pickle.load(f)

        buffers = {}
        for key in keys:
            key = str(key)
            if key not in unpickler.storages:
                raise UnsupportedCheckpointError(f"{path}: storage {key} has no tensor using it.")
            dtype = unpickler.storages[key].dtype
            header = f.read(8)
            if len(header) != 8:
                raise UnsupportedCheckpointError(f"{path}: file ends before storage {key}.")
            (count,) = struct.unpack("<q", header)
            raw = f.read(count * dtype.itemsize)
            if len(raw) != count * dtype.itemsize:
                raise UnsupportedCheckpointError(f"{path}: storage {key} is truncated.")
            buffers[key] = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(
                dtype, copy=False
            )
    return _materialize(obj, buffers)


def load_torch_checkpoint(path: str | os.PathLike) -> Any:
    """Read a PyTorch checkpoint (zip or legacy format) with tensors as numpy arrays.

    Returns the pickled object with every tensor replaced by a C-contiguous numpy array of its
    dtype (bfloat16 as `ml_dtypes.bfloat16`). Raises FileNotFoundError for a missing file and
    UnsupportedCheckpointError for anything else the reader cannot or will not load.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    if zipfile.is_zipfile(path):
        return _read_zip(path)
    return _read_legacy(path)


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read the state dict of a PyTorch checkpoint as {parameter name: numpy array}.

    Accepts a file whose object is a state dict, or a dict that contains one under "state_dict",
    "model_state_dict", "model", "module" or "net". A "module." prefix that
    `torch.nn.DataParallel` adds to every key is kept, so callers see the names as saved.
    Entries that are not tensors (such as version counters saved as ints) are dropped.
    """
    obj = load_torch_checkpoint(path)
    state = _find_state_dict(obj)
    if state is None:
        raise UnsupportedCheckpointError(
            f"{os.fspath(path)}: no state dict found (top-level type {type(obj).__name__}); "
            f"expected a dict of tensors, possibly under one of {_STATE_DICT_KEYS}."
        )
    return {str(k): v for k, v in state.items() if isinstance(v, np.ndarray)}


def _find_state_dict(obj: Any) -> Mapping[str, Any] | None:
    if not isinstance(obj, Mapping):
        return None
    if obj and any(isinstance(v, np.ndarray) for v in obj.values()):
        return obj
    for key in _STATE_DICT_KEYS:
        if key in obj:
            found = _find_state_dict(obj[key])
            if found is not None:
                return found
    return None


__all__ = [
    "UnsupportedCheckpointError",
    "load_torch_checkpoint",
    "load_torch_state_dict",
]
