"""Loading pickled data files without running code: arrays, torch tensors (as numpy), plain containers.

Several datasets ship pickles: MANO model files, OakInk2 `.pkl`, TACO `.pkl` holding torch tensors, HOI4D
`.pickle`, HaWoR's `world_space_res.pth` (written by `joblib.dump`). Unpickling calls whatever global a
file names, so a tampered file could run code; `pickle.load` / `torch.load` / `joblib.load` are never
used on them. This module's unpickler resolves only a fixed table of globals:

- numpy arrays, dtypes and scalars (as numpy pickles them, numpy 1 and 2, protocols 0-5);
- plain containers: dict / list / tuple / set / frozenset / `collections.OrderedDict`, str, bytes, numbers;
- torch tensors and `nn.Parameter`s, rebuilt as numpy arrays *without importing torch* (torch itself is
  never asked to unpickle anything): inside `torch.save` files (zip format and the legacy format), and
  pickled directly (a tensor's storage is then a nested legacy `torch.save` blob, read the same way);
  bfloat16 becomes float32;
- joblib's `NumpyArrayWrapper` (the array bytes follow the wrapper in the stream), plain or compressed
  (zlib, gzip, bz2, xz, lzma) files;
- inert stand-ins (`PickledStandIn`) for extra classes a caller names (mano.py: chumpy, scipy.sparse).

Every other global is refused with `ValueError` naming it and the file. Strided views are bounds-checked
against their storage, so a crafted tensor cannot read outside it.

    >>> import io, os, pickle, numpy as np
    >>> from hand3d_dataset.safe_pickle import loads
    >>> loads(pickle.dumps({"a": np.arange(3), "b": [1.5, "x"]}))["a"]
    array([0, 1, 2])
    >>> loads(pickle.dumps(os.system))
    Traceback (most recent call last):
    ...
    ValueError: <bytes>: refusing to unpickle global 'posix.system'; this file may only hold arrays, tensors and plain containers

File-level entry point: `load(path)` sniffs the format (torch zip / legacy torch / joblib / pickle).
"""

from __future__ import annotations

import bz2
import collections
import gzip
import io
import lzma
import pickle
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PickledStandIn", "SafeUnpickler", "safe_globals", "load", "loads", "load_torch_zip"]

# torch storage class / dtype name → numpy dtype; "bfloat16" has no numpy type (converted to float32).
_TORCH_DTYPES: dict[str, str] = {
    "Double": "<f8",
    "Float": "<f4",
    "Half": "<f2",
    "BFloat16": "bfloat16",
    "Long": "<i8",
    "Int": "<i4",
    "Short": "<i2",
    "Char": "i1",
    "Byte": "u1",
    "Bool": "?",
    "Untyped": "u1",
    "ComplexDouble": "<c16",
    "ComplexFloat": "<c8",
}
_TORCH_DTYPE_OBJECTS: dict[str, str] = {  # torch.<name> dtype globals (pickled by _rebuild_tensor_v3)
    "float64": "Double",
    "double": "Double",
    "float32": "Float",
    "float": "Float",
    "float16": "Half",
    "half": "Half",
    "bfloat16": "BFloat16",
    "int64": "Long",
    "long": "Long",
    "int32": "Int",
    "int": "Int",
    "int16": "Short",
    "int8": "Char",
    "uint8": "Byte",
    "bool": "Bool",
}
_LEGACY_TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of a legacy torch.save file
# that pickle's bytes as torch writes them (protocol 2, LONG1 of 10 bytes)
_LEGACY_TORCH_HEAD = b"\x80\x02\x8a\x0a" + _LEGACY_TORCH_MAGIC.to_bytes(10, "little") + b"."


class PickledStandIn:
    """Inert stand-in for a class a pickle may reference only as a data container.

    It keeps the pickled state and nothing else, so unpickling never runs the real class's code.
    Subclasses are made per referenced class (`origin` = "module.name") by `SafeUnpickler`.
    """

    origin = ""  # "module.name" of the class the pickle referenced

    def __new__(cls, *args: Any, **kwargs: Any) -> PickledStandIn:
        obj = object.__new__(cls)
        obj.state = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _TorchType:
    """What a `torch.<X>Storage` class or a `torch.<dtype>` global stands for: a numpy dtype name."""

    def __init__(self, name: str) -> None:
        self.name = name  # key of _TORCH_DTYPES
        self.dtype = _TORCH_DTYPES[name]


class _JoblibArray:
    """joblib's NumpyArrayWrapper: its array bytes follow its BUILD in the stream and are read right then.

    `SafeUnpickler.find_class` hands out a subclass bound to its own reader; the wrapper is replaced by
    its array once the whole pickle is loaded.
    """

    _reader: Callable[[dict], np.ndarray] | None = None

    def __init__(self, *args: Any) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if self._reader is None or not isinstance(state, dict):
            raise ValueError("malformed joblib array wrapper")
        self.array = type(self)._reader(dict(state))


def _np_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    # numpy's own _reconstruct instantiates whatever subtype it is given; only plain ndarrays here.
    if subtype is not np.ndarray:
        raise ValueError(f"refusing to rebuild an array of type {subtype!r}; only numpy.ndarray is allowed")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _copyreg_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    # Protocol 0/1 pickles rebuild plain objects through copyreg; only inert stand-ins qualify.
    if isinstance(cls, type) and issubclass(cls, PickledStandIn) and base is object and state is None:
        return cls.__new__(cls)
    raise ValueError(f"refusing copyreg._reconstructor for {cls!r}; only inert stand-ins")


def _latin1_encode(obj: Any, encoding: str = "utf-8") -> bytes:
    # Python 3 writes bytes as _codecs.encode(str, "latin1") at protocols < 3.
    if not isinstance(obj, str) or encoding.lower() not in ("latin1", "latin-1"):
        raise ValueError(f"refusing _codecs.encode({type(obj).__name__}, {encoding!r}); only latin1 strings")
    return obj.encode("latin1")


def _storage_array(raw: bytes | memoryview, kind: _TorchType, numel: int | None, where: str) -> np.ndarray:
    """1-D numpy array of a torch storage's bytes (little endian); bfloat16 → float32."""
    if kind.dtype == "bfloat16":
        a = np.frombuffer(raw, dtype="<u2")
        out = (a.astype(np.uint32) << 16).view(np.float32)
    else:
        out = np.frombuffer(raw, dtype=np.dtype(kind.dtype)).astype(np.dtype(kind.dtype).newbyteorder("="))
    if numel is not None and len(out) < numel:
        raise ValueError(f"{where}: storage holds {len(out)} elements, the file says {numel}")
    return out


def _rebuild_tensor(storage: Any, offset: int, size: Any, stride: Any, *rest: Any) -> np.ndarray:
    """A tensor view (offset, size, stride in elements) of a storage, copied to a new numpy array."""
    if isinstance(storage, _LazyStorage):  # legacy torch.save: the bytes come after the object
        return _LazyTensor(storage, (offset, size, stride))
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise ValueError(f"refusing a tensor whose storage is {type(storage).__name__}, not a storage array")
    size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(offset)
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise ValueError(f"bad tensor layout: offset {offset}, size {size}, stride {stride}")
    if 0 in size:
        return np.zeros(size, dtype=storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= len(storage):  # as_strided does not check: this keeps a crafted file inside the storage
        raise ValueError(f"tensor view reaches element {last} of a storage of {len(storage)} elements")
    base = storage[offset:]
    item = storage.itemsize
    return np.lib.stride_tricks.as_strided(base, size, tuple(s * item for s in stride)).copy()


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *rest) -> np.ndarray:
    if isinstance(dtype, _TorchType) and isinstance(storage, np.ndarray) and storage.dtype == np.uint8:
        storage = _storage_array(storage.tobytes(), dtype, None, "tensor")  # an untyped storage
    return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_parameter(data: Any, *rest: Any) -> Any:
    return data


def _torch_size(items: Any = ()) -> tuple:
    return tuple(int(x) for x in items)


def _ordered_dict(*args: Any) -> collections.OrderedDict:
    if args and not (len(args) == 1 and isinstance(args[0], (list, tuple))):
        raise ValueError("refusing collections.OrderedDict with non-list arguments")
    return collections.OrderedDict(*args)


def _load_from_bytes(blob: bytes) -> np.ndarray:
    """A storage pickled on its own (`torch.storage._load_from_bytes`): a nested legacy torch.save."""
    out = _load_legacy_torch(io.BytesIO(bytes(blob)), "<torch storage bytes>")
    if not isinstance(out, np.ndarray):
        raise ValueError(f"refusing _load_from_bytes whose payload is {type(out).__name__}, not a storage")
    return out


def safe_globals() -> dict[tuple[str, str], Any]:
    """(module, name) → the object the unpickler gives for it; the whole allow-list."""
    multiarray = np._core.multiarray
    table: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("collections", "OrderedDict"): _ordered_dict,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch", "Size"): _torch_size,
        ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    }
    # Python 2 / numpy 1 pickles name numpy.core and __builtin__ / copy_reg; numpy 2 names numpy._core.
    for core in ("numpy.core", "numpy._core"):
        table[(f"{core}.multiarray", "_reconstruct")] = _np_reconstruct
        table[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        table[(f"{core}.numeric", "_frombuffer")] = np._core.numeric._frombuffer
    for builtins in ("builtins", "__builtin__"):
        for name, obj in (("set", set), ("frozenset", frozenset), ("object", object), ("complex", complex)):
            table[(builtins, name)] = obj
        table[(builtins, "slice")] = slice
    for copyreg in ("copyreg", "copy_reg"):
        table[(copyreg, "_reconstructor")] = _copyreg_reconstructor
    for name in _TORCH_DTYPES:
        table[("torch", f"{name}Storage")] = _TorchType(name)
        # tensors pickled on a GPU by older torch name the CUDA storage class; the bytes are the same
        table[("torch.cuda", f"{name}Storage")] = _TorchType(name)
    table[("torch", "UntypedStorage")] = _TorchType("Untyped")
    for name, kind in _TORCH_DTYPE_OBJECTS.items():
        table[("torch", name)] = _TorchType(kind)
    return table


_SAFE = safe_globals()


class SafeUnpickler(pickle.Unpickler):
    """Restricted unpickler: the `safe_globals()` table, stand-ins the caller allows, nothing else.

    joblib's array bytes follow a wrapper's BUILD in the stream: the wrapper reads them in `__setstate__`
    from the same file, which must therefore be read exactly (an `io.BytesIO`: it has no `peek`, so the C
    unpickler never reads ahead).

    Args:
        file: binary file positioned at the pickle.
        source: name used in errors (the path).
        stand_in: (module, name) → True for classes to rebuild as inert `PickledStandIn`s.
        persistent_load: resolver of persistent ids (torch.save storages); None refuses them.
        what: the end of the refusal message (what such a file may hold).
    """

    _stand_ins: dict[str, type] = {}

    def __init__(
        self,
        file: io.BufferedIOBase,
        source: str,
        stand_in: Callable[[str, str], bool] | None = None,
        persistent_load: Callable[[Any], Any] | None = None,
        what: str = "this file may only hold arrays, tensors and plain containers",
    ) -> None:
        # latin1: Python 2 pickles (MANO files, old datasets) store numpy buffers as byte strings.
        super().__init__(file, encoding="latin1")
        self.source, self._stand_in, self._persistent, self._what = source, stand_in, persistent_load, what
        if hasattr(file, "peek"):
            raise ValueError(
                f"{source}: SafeUnpickler needs an exact-read file (io.BytesIO), not a buffered reader"
            )
        self._file = file
        self._joblib: type | None = None

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("joblib.numpy_pickle", "NumpyArrayWrapper"):
            if self._joblib is None:
                self._joblib = type(
                    "NumpyArrayWrapper", (_JoblibArray,), {"_reader": staticmethod(self._read_joblib_array)}
                )
            return self._joblib
        if (module, name) in _SAFE:
            return _SAFE[(module, name)]
        if self._stand_in is not None and self._stand_in(module, name):
            origin = f"{module}.{name}"
            if origin not in self._stand_ins:
                self._stand_ins[origin] = type(name, (PickledStandIn,), {"origin": origin})
            return self._stand_ins[origin]
        raise ValueError(f"{self.source}: refusing to unpickle global '{module}.{name}'; {self._what}")

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise ValueError(f"{self.source}: refusing persistent id {pid!r} outside a torch.save file")
        return self._persistent(pid)

    def load(self) -> Any:
        obj = super().load()
        return obj if self._joblib is None else _resolve_lazy(obj, self.source)

    def _read_joblib_array(self, st: dict) -> np.ndarray:
        dtype, shape, order = st.get("dtype"), st.get("shape"), st.get("order", "C")
        if st.get("subclass") is not np.ndarray or not isinstance(dtype, np.dtype):
            raise ValueError(f"{self.source}: joblib array of {st.get('subclass')!r} / {dtype!r} refused")
        if dtype.hasobject:
            raise ValueError(f"{self.source}: joblib object arrays (dtype {dtype}) are refused")
        if st.get("numpy_array_alignment_bytes") is not None:
            pad = self._file.read(1)
            if len(pad) != 1:
                raise ValueError(f"{self.source}: truncated joblib file (array padding)")
            self._file.read(int.from_bytes(pad, "little"))
        shape = tuple(int(s) for s in shape)
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        raw = self._file.read(count * dtype.itemsize)
        if len(raw) != count * dtype.itemsize:
            raise ValueError(
                f"{self.source}: truncated joblib file: array {shape} {dtype} needs "
                f"{count * dtype.itemsize} bytes, {len(raw)} left"
            )
        arr = np.frombuffer(raw, dtype=dtype)
        arr = arr.reshape(shape[::-1]).T if order == "F" else arr.reshape(shape)
        return arr.astype(dtype.newbyteorder("="))


def _check_result(obj: Any, source: str) -> Any:
    if isinstance(obj, _JoblibArray) or isinstance(obj, _TorchType):
        raise ValueError(f"{source}: malformed file (a bare {type(obj).__name__})")
    return obj


def loads(data: bytes, source: str = "<bytes>", **kwargs: Any) -> Any:
    """Unpickles `data` with `SafeUnpickler` (kwargs go to it)."""
    return _check_result(SafeUnpickler(io.BytesIO(data), source, **kwargs).load(), source)


def _load_legacy_torch(fh: io.BufferedIOBase, source: str) -> Any:
    """The legacy `torch.save` stream: magic, version, sys info, object, storage keys, storage bytes."""
    if SafeUnpickler(fh, source).load() != _LEGACY_TORCH_MAGIC:
        raise ValueError(f"{source}: not a legacy torch.save file (bad magic number)")
    SafeUnpickler(fh, source).load()  # protocol version
    info = SafeUnpickler(fh, source).load()
    if isinstance(info, dict) and info.get("little_endian") is False:
        raise ValueError(f"{source}: big-endian torch files are not supported")
    storages: dict[str, tuple[_TorchType, int]] = {}
    filled: dict[str, np.ndarray] = {}

    def persistent(pid: Any) -> Any:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and isinstance(pid[1], _TorchType)):
            raise ValueError(f"{source}: refusing persistent id {pid!r}")
        key = str(pid[2])
        storages.setdefault(key, (pid[1], int(pid[4])))
        return _LazyStorage(key, filled)

    obj = SafeUnpickler(fh, source, persistent_load=persistent).load()
    keys = SafeUnpickler(fh, source).load()
    for key in keys:
        if key not in storages:
            raise ValueError(f"{source}: storage {key!r} is not referenced by the object")
        kind, numel = storages[key]
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError(f"{source}: truncated torch file (storage {key!r} header)")
        n = int.from_bytes(head, "little", signed=True)
        item = 2 if kind.dtype == "bfloat16" else np.dtype(kind.dtype).itemsize
        raw = fh.read(n * item)
        if len(raw) != n * item or n < numel:
            raise ValueError(
                f"{source}: truncated torch file (storage {key!r}: {len(raw)} of {n * item} bytes)"
            )
        filled[key] = _storage_array(raw, kind, numel, source)
    return _resolve_lazy(obj, source)


class _LazyStorage:
    """A legacy storage referenced before its bytes are read; resolved after the whole stream."""

    def __init__(self, key: str, filled: dict[str, np.ndarray]) -> None:
        self.key, self.filled = key, filled


class _LazyTensor:
    def __init__(self, storage: _LazyStorage, args: tuple) -> None:
        self.storage, self.args = storage, args


def _resolve_lazy(obj: Any, source: str, _seen: dict | None = None) -> Any:
    """Replaces lazy storages / tensors (legacy format) and joblib wrappers by arrays, in containers of any depth."""
    seen = {} if _seen is None else _seen
    if id(obj) in seen:
        return seen[id(obj)]
    if isinstance(obj, _LazyStorage):
        if obj.key not in obj.filled:
            raise ValueError(f"{source}: storage {obj.key!r} has no data in the file")
        out = obj.filled[obj.key]
    elif isinstance(obj, _LazyTensor):
        out = _rebuild_tensor(_resolve_lazy(obj.storage, source, seen), *obj.args)
    elif isinstance(obj, _JoblibArray):
        if obj.array is None:
            raise ValueError(f"{source}: a joblib array wrapper without its data")
        out = obj.array
    elif isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        seen[id(obj)] = out
        for k, v in obj.items():
            out[k] = _resolve_lazy(v, source, seen)
        return out
    elif isinstance(obj, list):
        out = []
        seen[id(obj)] = out
        out.extend(_resolve_lazy(v, source, seen) for v in obj)
        return out
    elif isinstance(obj, tuple):
        out = tuple(_resolve_lazy(v, source, seen) for v in obj)
    else:
        out = obj
    seen[id(obj)] = out
    return out


def load_torch_zip(path: str | Path) -> Any:
    """A zip-format `torch.save` file (`<name>/data.pkl` + `<name>/data/<key>`), tensors as numpy."""
    source = str(path)
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise ValueError(f"{source}: not a torch.save zip (expected one '<name>/data.pkl', got {pkl})")
        prefix = pkl[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in names and z.read(f"{prefix}byteorder").strip() != b"little":
            raise ValueError(f"{source}: big-endian torch files are not supported")
        cache: dict[str, np.ndarray] = {}

        def persistent(pid: Any) -> np.ndarray:
            if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
                raise ValueError(f"{source}: refusing persistent id {pid!r}")
            kind, key, numel = pid[1], str(pid[2]), int(pid[4])
            if not isinstance(kind, _TorchType):
                raise ValueError(f"{source}: storage of unknown type {kind!r}")
            if key not in cache:
                member = f"{prefix}data/{key}"
                if member not in names:
                    raise ValueError(f"{source}: storage {member} is missing from the archive")
                cache[key] = _storage_array(z.read(member), kind, numel, f"{source}:{member}")
            return cache[key]

        data = z.read(pkl[0])
        return _check_result(
            SafeUnpickler(io.BytesIO(data), source, persistent_load=persistent).load(), source
        )


def load(path: str | Path, **kwargs: Any) -> Any:
    """Loads a pickle-based file safely, whatever its flavour; kwargs go to `SafeUnpickler`.

    Sniffed by content: a zip is a `torch.save` archive; a pickle whose first object is torch's magic
    number is a legacy `torch.save`; zlib / gzip / bz2 / xz / lzma streams are joblib's compressed
    files (decompressed in memory, then read as below); anything else is a plain pickle, which may
    contain joblib arrays.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no file at {path}")
    source = str(path)
    if zipfile.is_zipfile(path):
        return load_torch_zip(path)
    data = path.read_bytes()
    try:
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        elif data[:3] == b"BZh":
            data = bz2.decompress(data)
        elif data[:5] == b"\xfd7zXZ" or data[:2] == b"\x5d\x00":
            data = lzma.decompress(data)
        elif data[:1] == b"\x78":
            data = zlib.decompress(data)
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as e:
        raise ValueError(f"{source}: corrupt compressed file ({e})") from e
    if not data:
        raise ValueError(f"{source}: empty file")
    if data.startswith(_LEGACY_TORCH_HEAD):
        return _load_legacy_torch(io.BytesIO(data), source)
    try:
        return loads(data, source, **kwargs)
    except (pickle.UnpicklingError, EOFError) as e:
        raise ValueError(f"{source}: not a readable pickle ({type(e).__name__}: {e}); truncated file?") from e
