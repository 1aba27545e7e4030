"""Read PyTorch `torch.save` checkpoints (zip format) into NumPy without importing torch.

The unpickler only rebuilds tensors and plain containers: any other global in the file
becomes an inert `Opaque` record, so loading a checkpoint never runs code from it.
"""

from __future__ import annotations

import collections
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

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


LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of a pre-1.6 torch.save file


class Opaque:
    """Stand-in for an object of a class the reader does not rebuild (kept inert)."""

    name = "?"

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __repr__(self):
        return f"Opaque({self.name})"


def _opaque_class(name: str) -> type:
    return type("Opaque", (Opaque,), {"name": name})


def _rebuild_tensor(storage, offset, size, stride, *unused):
    if not size:
        return np.array(storage[offset])
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * item for s in stride)
    )
    return np.array(view)  # copy: views of one storage must not alias each other.


def _rebuild_parameter(data, *unused):
    return data


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._archive, self._prefix, self._storages = archive, prefix, {}

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch" and name == "Size":
            return tuple
        return _opaque_class(f"{module}.{name}")

    def persistent_load(self, pid):
        kind, dtype, key = pid[0], pid[1], pid[2]
        if kind != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id {kind!r}")
        if isinstance(dtype, type) and issubclass(dtype, Opaque):
            raise pickle.UnpicklingError(f"unsupported tensor storage type {dtype.name}")
        if key not in self._storages:
            raw = self._archive.read(f"{self._prefix}data/{key}")
            self._storages[key] = np.frombuffer(raw, dtype=dtype)
        return self._storages[key]


def _read_legacy(path: str):
    """A pre-1.6 (non-zip) torch.save file, read without torch; tensors become NumPy arrays.

    Layout: pickles of the magic number, protocol and system info, then the object (its
    storages are persistent ids), then the list of storage keys, then each storage's raw
    bytes after an int64 element count. Tensors are copied out of their storages while
    unpickling, so the object is unpickled a second time once the storages are filled.
    """
    storages: dict[str, np.ndarray] = {}

    class Unpickler(_Unpickler):
        def __init__(self, f):
            super().__init__(f, None, "")

        def persistent_load(self, pid):
            if pid[0] != "storage":
                raise pickle.UnpicklingError(f"{path}: unsupported persistent id {pid[0]!r}")
            dtype, key, _, numel, view = pid[1], pid[2], pid[3], pid[4], pid[5]
            if isinstance(dtype, type) and issubclass(dtype, Opaque):
                raise pickle.UnpicklingError(f"{path}: unsupported storage type {dtype.name}")
            if key not in storages:
                storages[key] = np.zeros(numel, dtype)
            if view is not None:
                _, offset, size = view
                return storages[key][offset : offset + size]
            return storages[key]

    with open(path, "rb") as f:
        if pickle.load(f) != LEGACY_MAGIC:
            raise ValueError(
                f"{path}: not a zip-format PyTorch checkpoint nor a legacy one (bad magic "
                "number): truncated or not a torch.save file; re-save it with a current "
                "torch or convert it to .safetensors"
            )
        pickle.load(f)  # protocol version
        pickle.load(f)  # system info (endianness, type sizes)
        start = f.tell()
        Unpickler(f).load()  # first pass: learns every storage's dtype and size
        keys = pickle.load(f)
        for key in keys:
            (numel,) = struct.unpack("<q", f.read(8))
            buf = storages[key]
            data = f.read(numel * buf.dtype.itemsize)
            if numel != buf.size or len(data) != numel * buf.dtype.itemsize:
                raise ValueError(f"{path}: storage {key} is truncated or mis-sized")
            buf[:] = np.frombuffer(data, buf.dtype)
        f.seek(start)
        return Unpickler(f).load()


def load(path: str) -> Any:
    """The object a `torch.save(obj, path)` wrote (zip or legacy format), tensors as NumPy."""
    if not zipfile.is_zipfile(path):
        try:
            return _read_legacy(path)
        except (pickle.UnpicklingError, EOFError, struct.error) as e:
            raise ValueError(
                f"{path}: not a zip-format PyTorch checkpoint and unreadable as a legacy "
                f"(torch<1.6) one ({e}): truncated? re-save it or convert it to .safetensors"
            ) from e
    with zipfile.ZipFile(path) as archive:
        pkls = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if len(pkls) != 1:
            raise ValueError(f"{path}: expected one data.pkl in the archive, found {pkls}")
        prefix = pkls[0][: -len("data.pkl")]
        byteorder = prefix + "byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder) != b"little":
            raise ValueError(f"{path}: big-endian checkpoints are not supported")
        with archive.open(pkls[0]) as f:
            return _Unpickler(f, archive, prefix).load()
