"""Read PyTorch `torch.save` checkpoints (zip or legacy format) into NumPy without torch.

Checkpoints are untrusted input. Every pickle in the file (the legacy header pickles
included) is checked opcode by opcode and then unpickled from memory by an unpickler that
resolves only the globals in `_ALLOWED` and refuses all others, so nothing a file names is
ever called. Every tensor view is bounds-checked against its storage, and sizes are capped
by the file's own size, so a crafted file gets a `CheckpointFormatError` naming it, never
code execution, a crash or foreign memory in the weights.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import pickletools
import struct
import zipfile
import zlib
from typing import Any

import ml_dtypes
import numpy as np


class _StorageType:
    """What a `torch.XStorage` global resolves to: a dtype tag, not callable."""

    def __init__(self, name: str, dtype):
        self.name, self.dtype = name, np.dtype(dtype)


_STORAGE_TYPES = {
    n: _StorageType(n, d)
    for n, d in {
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
    }.items()
}

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of a pre-1.6 torch.save file
MAX_NDIM = 32
# Tensors may share a storage (views, tied weights), so their copies can exceed the file a
# little; past this factor of the file's size a file is taken as a memory bomb.
OUTPUT_BUDGET_FACTOR = 8
MIN_OUTPUT_BUDGET = 64 << 20


class CheckpointFormatError(ValueError):
    """A file that is not a readable torch.save checkpoint (names the file and the fault)."""


class Opaque:
    """Inert record of an allow-listed non-tensor object (e.g. argparse.Namespace args)."""

    name = "?"

    def __init__(self, *args):
        self.state = None

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"Opaque({self.name})"


class _Namespace(Opaque):
    name = "argparse.Namespace"


def _encode(text, encoding="latin1"):
    # Protocol-2 pickles store bytes as _codecs.encode(str, "latin1"); no other codec is run.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not allowed")
    return text.encode(encoding)


def _rebuild_tensor(storage, offset, size, stride, *unused):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor without a storage")
    return storage.view(offset, size, stride)


def _rebuild_parameter(data, *unused):
    if not isinstance(data, np.ndarray | _Placeholder):
        raise pickle.UnpicklingError("parameter without tensor data")
    return data


def _reconstructor(cls, base, state):
    # Protocol 0/1 pickles build plain objects this way; only the inert record may be built.
    if cls is not _Namespace or base is not object or state is not None:
        raise pickle.UnpicklingError("copyreg._reconstructor of a non-record class")
    return _Namespace()


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("_codecs", "encode"): _encode,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("argparse", "Namespace"): _Namespace,
    ("copyreg", "_reconstructor"): _reconstructor,
}


class _Placeholder:
    """A tensor during the legacy format's first pass, before storages are read."""


class _Budget:
    """Bytes that tensor copies may still take: tensors may share a storage (views, tied
    weights) so copies can exceed the file a little; far past it a file is a memory bomb."""

    def __init__(self, file_bytes: int):
        self.left = file_bytes * OUTPUT_BUDGET_FACTOR + MIN_OUTPUT_BUDGET

    def take(self, nbytes: int) -> None:
        self.left -= nbytes
        if self.left < 0:
            raise pickle.UnpicklingError("tensors add up to far more than the file holds")


class _Storage:
    """One storage's elements (1-D); `data` None while only its declaration is known."""

    def __init__(self, data: np.ndarray | None, budget: _Budget):
        self.data, self._budget = data, budget

    def view(self, offset, size, stride) -> np.ndarray | _Placeholder:
        if not isinstance(size, tuple) or not isinstance(stride, tuple):
            raise pickle.UnpicklingError(f"bad tensor geometry {size=} {stride=}")
        ints = [offset, *size, *stride]
        if not all(type(v) is int for v in ints) or min(ints) < 0:
            raise pickle.UnpicklingError(f"bad tensor geometry {offset=} {size=} {stride=}")
        if len(size) != len(stride) or len(size) > MAX_NDIM:
            raise pickle.UnpicklingError(f"bad tensor geometry {size=} {stride=}")
        if self.data is None:
            return _Placeholder()
        numel = math.prod(size)
        if numel == 0:
            return np.zeros(size, self.data.dtype)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= self.data.size:
            raise pickle.UnpicklingError(
                f"tensor view ends at element {last}, past its storage of {self.data.size}"
            )
        item = self.data.dtype.itemsize
        self._budget.take(numel * item)
        view = np.lib.stride_tricks.as_strided(
            self.data[offset:], shape=size, strides=tuple(s * item for s in stride)
        )
        return np.array(view)  # copy: views of one storage must not alias each other.


def _check_opcodes(data: bytes, start: int) -> int:
    """Walks one pickle's opcodes without running it; returns the offset after its STOP.

    Memo indices are bounded by the opcode count, so a crafted index cannot make the
    unpickler allocate a giant memo table; lengths past the data end fail here.
    """
    f = io.BytesIO(data)
    f.seek(start)
    for count, (op, arg, pos) in enumerate(pickletools.genops(f), 1):
        if op.name in _MEMO_OPS and (type(arg) is not int or not 0 <= arg <= count):
            raise pickle.UnpicklingError(f"memo index {arg!r} out of range at byte {pos}")
        if op.name == "STOP":
            return f.tell()
    raise pickle.UnpicklingError("pickle has no STOP opcode")


_MEMO_OPS = {"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"}


class _Unpickler(pickle.Unpickler):
    """Allow-list unpickler over one pickle in memory; `storage(pid)` gives its storages."""

    def __init__(self, data: bytes, start: int, storage):
        self.end = _check_opcodes(data, start)
        self._f = io.BytesIO(data)
        self._f.seek(start)
        super().__init__(self._f)
        self._storage = storage

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGE_TYPES:
            return _STORAGE_TYPES[name]
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(
                f"refuses global {module}.{name}: only tensors and plain containers are "
                "loaded; re-save the bare state_dict, or as .safetensors"
            )
        return _ALLOWED[(module, name)]

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id {str(pid)[:60]}")
        return self._storage(pid)

    def load(self):
        obj = super().load()
        if self._f.tell() != self.end:
            raise pickle.UnpicklingError("pickle ends before its STOP opcode")
        return obj


def _unpickle(data: bytes, start: int, storage=None) -> tuple[Any, int]:
    """(object, end offset) of the pickle at `start` in `data`."""

    def no_storage(pid):
        raise pickle.UnpicklingError("unexpected tensor storage in a header pickle")

    u = _Unpickler(data, start, storage or no_storage)
    return u.load(), u.end


def _dtype_of(kind) -> np.dtype:
    if not isinstance(kind, _StorageType):
        raise pickle.UnpicklingError(f"unsupported tensor storage type {str(kind)[:60]}")
    return kind.dtype


def _read_zip(path: str, archive: zipfile.ZipFile, budget: _Budget):
    names = set(archive.namelist())
    pkls = [n for n in names if n.endswith("data.pkl")]
    if len(pkls) != 1:
        raise CheckpointFormatError(f"{path}: expected one data.pkl in the archive, found {pkls}")
    for info in archive.infolist():
        if info.file_size > budget.left:
            raise CheckpointFormatError(
                f"{path}: archive member {info.filename} claims {info.file_size} bytes, far "
                "more than the file holds: not a torch.save checkpoint"
            )
    prefix = pkls[0][: -len("data.pkl")]
    if prefix + "byteorder" in names and archive.read(prefix + "byteorder") != b"little":
        raise CheckpointFormatError(f"{path}: big-endian checkpoints are not supported")
    storages: dict[str, _Storage] = {}

    def storage(pid):
        if len(pid) != 5 or not isinstance(pid[2], str):
            raise pickle.UnpicklingError(f"malformed storage id {str(pid)[:60]}")
        dtype, key = _dtype_of(pid[1]), pid[2]
        if key not in storages:
            name = f"{prefix}data/{key}"
            if name not in names:
                raise pickle.UnpicklingError(f"storage {key!r} is missing from the archive")
            raw = archive.read(name)
            if len(raw) % dtype.itemsize:
                raise pickle.UnpicklingError(f"storage {key!r} is not a whole number of {dtype}")
            storages[key] = _Storage(np.frombuffer(raw, dtype=dtype), budget)
        if storages[key].data.dtype != dtype:
            raise pickle.UnpicklingError(f"storage {key!r} used with two dtypes")
        return storages[key]

    return _unpickle(archive.read(pkls[0]), 0, storage)[0]


def _read_legacy(path: str, data: bytes, budget: _Budget):
    """A pre-1.6 (non-zip) torch.save file.

    Layout: pickles of the magic number, protocol and system info, then the object (its
    storages are persistent ids), then the list of storage keys, then each storage's raw
    bytes after an int64 element count. The object is unpickled twice: first to learn the
    storages it declares, then, once they are read, to copy its tensors out of them.
    """
    magic, pos = _unpickle(data, 0)
    if magic != LEGACY_MAGIC:
        raise CheckpointFormatError(
            f"{path}: not a zip-format PyTorch checkpoint nor a legacy one (bad magic "
            "number): truncated or not a torch.save file; re-save it with a current "
            "torch or convert it to .safetensors"
        )
    _, pos = _unpickle(data, pos)  # protocol version
    info, pos = _unpickle(data, pos)  # system info
    if isinstance(info, dict) and info.get("little_endian") is False:
        raise CheckpointFormatError(f"{path}: big-endian checkpoints are not supported")
    declared: dict[str, tuple[np.dtype, int]] = {}
    filled: dict[str, _Storage] = {}

    def storage(pid):
        if len(pid) != 6 or not isinstance(pid[2], str) or type(pid[4]) is not int:
            raise pickle.UnpicklingError(f"malformed storage id {str(pid)[:60]}")
        dtype, key, numel, view = _dtype_of(pid[1]), pid[2], pid[4], pid[5]
        if not 0 <= numel * dtype.itemsize <= len(data):
            raise pickle.UnpicklingError(f"storage {key!r} claims {numel} elements")
        if declared.setdefault(key, (dtype, numel)) != (dtype, numel):
            raise pickle.UnpicklingError(f"storage {key!r} declared twice differently")
        if view is not None:
            if not (isinstance(view, tuple) and len(view) == 3):
                raise pickle.UnpicklingError(f"malformed storage view {str(view)[:60]}")
            _, offset, size = view
            if type(offset) is not int or type(size) is not int or min(offset, size) < 0:
                raise pickle.UnpicklingError(f"malformed storage view {view!r}")
            if offset + size > numel:
                raise pickle.UnpicklingError(f"storage view {view!r} past its storage")
        if key not in filled:
            return _Storage(None, budget)
        base = filled[key].data
        return _Storage(base if view is None else base[view[1] : view[1] + view[2]], budget)

    start = pos
    _, pos = _unpickle(data, start, storage)
    keys, pos = _unpickle(data, pos)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise CheckpointFormatError(f"{path}: malformed storage key list")
    for key in keys:
        if key not in declared or key in filled:
            raise CheckpointFormatError(f"{path}: storage key {key!r} unknown or repeated")
        dtype, numel = declared[key]
        nbytes = numel * dtype.itemsize
        if pos + 8 + nbytes > len(data) or struct.unpack_from("<q", data, pos)[0] != numel:
            raise CheckpointFormatError(f"{path}: storage {key} is truncated or mis-sized")
        filled[key] = _Storage(np.frombuffer(data, dtype, numel, pos + 8).copy(), budget)
        pos += 8 + nbytes
    missing = sorted(set(declared) - set(filled))
    if missing:
        raise CheckpointFormatError(f"{path}: storages {missing} have no data")
    return _unpickle(data, start, storage)[0]


# What a malformed file can raise from the parsing above; anything else is a bug.
_FORMAT_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    struct.error,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    AttributeError,
    OverflowError,
    RecursionError,
    MemoryError,
    zipfile.BadZipFile,
    RuntimeError,  # zipfile: encrypted or unsupported members
    zlib.error,
    OSError,
    LookupError,
)


def load(path: str) -> Any:
    """The object a `torch.save(obj, path)` wrote (zip or legacy format), tensors as NumPy.

    Anything else raises `CheckpointFormatError` (a ValueError): one line naming `path`.
    """
    path = os.fspath(path)
    budget = _Budget(os.path.getsize(path))
    is_zip = False
    try:
        if is_zip := zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return _read_zip(path, archive, budget)
        with open(path, "rb") as f:
            data = f.read()
        return _read_legacy(path, data, budget)
    except CheckpointFormatError:
        raise
    except _FORMAT_ERRORS as e:
        kind = "a loadable zip-format" if is_zip else "a zip-format nor a readable legacy"
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise CheckpointFormatError(
            f"{path}: not {kind} PyTorch checkpoint ({reason}): truncated, corrupt or "
            "crafted; re-save the bare state_dict (or as .safetensors) from a trusted copy"
        ) from None
