"""Read a PyTorch state dict (`torch.save` output) with numpy only, executing no pickled code.

A `.pth` file is a pickle, and unpickling runs whatever callables the file names. This reader uses a
`pickle.Unpickler` whose `find_class` resolves only the names a plain state dict needs (the tensor rebuild
functions, the storage types and `collections.OrderedDict`) to inert stand-ins defined here; any other global,
`os.system` included, raises `TorchPickleError` before anything is called. Tensor bytes are read from the file
as numpy arrays, never through torch.

Both layouts `torch.save` has written are read:
  - zip (torch >= 1.6): `<root>/data.pkl` plus one `<root>/data/<key>` entry per storage;
  - legacy (older files, e.g. pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` era): five pickles in a row
    (magic number, protocol version, system info, the object, the storage keys), then each storage as an int64
    element count followed by its raw little-endian bytes.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
  "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
  "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
  "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class TorchPickleError(ValueError):
  """A file that is not a plain PyTorch state dict (or names code this reader refuses to run)."""


class _StorageType:
  def __init__(self, name: str):
    self.name, self.dtype = name, np.dtype(_STORAGE_DTYPES[name])


class _Storage:
  """One storage: its dtype and element count now, its bytes once read (`array`)."""

  def __init__(self, dtype: np.dtype, numel: int, key: str):
    self.dtype, self.numel, self.key, self.array = dtype, numel, key, None


class _Tensor:
  """A strided view of a storage, materialised after all storages are read."""

  def __init__(self, storage, offset, size, stride):
    if not isinstance(storage, _Storage):
      raise TorchPickleError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
    self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)

  def numpy(self) -> np.ndarray:
    s = self.storage
    if s.array is None:
      raise TorchPickleError(f"storage {s.key!r} has no data")
    need = self.offset + 1 + sum((n - 1) * st for n, st in zip(self.size, self.stride)) if all(self.size) else 0
    if self.offset < 0 or min(self.stride, default=0) < 0 or need > s.array.size:
      raise TorchPickleError(f"tensor of size {self.size}, stride {self.stride}, offset {self.offset} "
                             f"reads past its storage {s.key!r} of {s.array.size} elements")
    item = s.array.itemsize
    view = np.lib.stride_tricks.as_strided(s.array[self.offset:], self.size, [st * item for st in self.stride])
    return np.array(view)  # a copy: C-contiguous, independent of the storage


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
  return _Tensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
  return data


_ALLOWED = {
  ("collections", "OrderedDict"): collections.OrderedDict,
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
  ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
}


class _Unpickler(pickle.Unpickler):
  def __init__(self, file, storage_for):
    super().__init__(file)
    self._storage_for = storage_for

  def find_class(self, module: str, name: str) -> Any:
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    raise TorchPickleError(f"refusing to load {module}.{name}: a plain state dict names only tensors, storages "
                           "and OrderedDict")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] in ("storage", b"storage")):
      raise TorchPickleError(f"unsupported persistent id {pid!r:.80}")
    return self._storage_for(pid[1:])


def _storage_args(data) -> tuple[np.dtype, str, int, Any]:
  storage_type, key, _location, numel = data[:4]
  if not isinstance(storage_type, _StorageType):
    raise TorchPickleError(f"storage of unknown type {storage_type!r:.80}")
  return storage_type.dtype, str(key), int(numel), data[4] if len(data) > 4 else None


def _materialise(obj):
  if isinstance(obj, _Tensor):
    return obj.numpy()
  if isinstance(obj, dict):
    return collections.OrderedDict((k, _materialise(v)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialise(v) for v in obj)
  return obj


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as z:
    names = z.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkl) != 1:
      raise TorchPickleError(f"zip archive without exactly one data.pkl (found {len(pkl)})")
    root = pkl[0][:-len("data.pkl")]
    order = z.read(root + "byteorder").decode().strip() if root + "byteorder" in names else "little"
    storages: dict[str, _Storage] = {}

    def storage_for(data):
      dtype, key, numel, _ = _storage_args(data)
      if key not in storages:
        entry = f"{root}data/{key}"
        if entry not in names:
          raise TorchPickleError(f"storage {key!r} has no entry {entry!r} in the archive")
        raw = z.read(entry)
        if len(raw) < numel * dtype.itemsize:
          raise TorchPickleError(f"storage {key!r}: {len(raw)} bytes, {numel} x {dtype} needs {numel * dtype.itemsize}")
        s = _Storage(dtype, numel, key)
        s.array = np.frombuffer(raw, dtype.newbyteorder("<" if order == "little" else ">"), numel).astype(dtype)
        storages[key] = s
      return storages[key]

    obj = _Unpickler(io.BytesIO(z.read(pkl[0])), storage_for).load()
  return _materialise(obj)


def _no_storage(data):
  raise TorchPickleError("a storage outside the state dict's own pickle")


def _load_legacy(f) -> Any:
  safe = lambda: _Unpickler(f, _no_storage)  # noqa: E731  (the header pickles hold plain values only)
  if safe().load() != _LEGACY_MAGIC:
    raise TorchPickleError("not a torch.save file (bad magic number)")
  if (v := safe().load()) != _LEGACY_PROTOCOL:
    raise TorchPickleError(f"unsupported legacy protocol version {v!r}")
  sys_info = safe().load()
  if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
    raise TorchPickleError("big-endian legacy files are not supported")
  storages: dict[str, _Storage] = {}

  def storage_for(data):
    dtype, key, numel, view = _storage_args(data)
    if view is not None:
      raise TorchPickleError("legacy storage views are not supported")
    return storages.setdefault(key, _Storage(dtype, numel, key))

  obj = _Unpickler(f, storage_for).load()
  keys = safe().load()
  for key in keys:
    s = storages.get(str(key))
    if s is None:
      raise TorchPickleError(f"storage {key!r} listed but never used")
    header = f.read(8)
    if len(header) != 8:
      raise TorchPickleError(f"file ends before storage {key!r}")
    (n,) = struct.unpack("<q", header)
    raw = f.read(n * s.dtype.itemsize)
    if n != s.numel or len(raw) != n * s.dtype.itemsize:
      raise TorchPickleError(f"storage {key!r}: truncated or mis-sized ({n} elements recorded, {s.numel} expected)")
    s.array = np.frombuffer(raw, s.dtype.newbyteorder("<"), n).astype(s.dtype)
  return _materialise(obj)


def load(path: str) -> dict[str, np.ndarray]:
  """{name: numpy array} of the state dict in `path`, a zip or legacy `torch.save` file.

  Raises TorchPickleError (a ValueError) for anything else: a corrupt or truncated file, a pickle that names a
  global other than the tensor/storage rebuilders, or an object that is not a flat {str: tensor} mapping.
  """
  try:
    if zipfile.is_zipfile(path):
      obj = _load_zip(path)
    else:
      with open(path, "rb") as f:
        obj = _load_legacy(f)
  except TorchPickleError as e:
    raise TorchPickleError(f"{path}: {e}") from None
  except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, KeyError, ValueError, TypeError, IndexError,
          AttributeError, struct.error) as e:
    raise TorchPickleError(f"{path}: not a readable torch.save state dict ({type(e).__name__}: {e})") from None
  if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()):
    raise TorchPickleError(f"{path}: holds a {type(obj).__name__}, not a {{name: tensor}} state dict")
  return dict(obj)
