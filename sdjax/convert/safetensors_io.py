"""Read and write `.safetensors` files with numpy only (no torch), bfloat16 included (ml_dtypes).

Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}} (plus an
optional "__metadata__" of strings), then the raw little-endian tensor bytes.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Mapping

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}


class CorruptCheckpointError(ValueError):
  """A weights file that cannot be read as what it claims to be."""


def read_header(path: str) -> tuple[dict, int]:
  """(header without __metadata__, byte offset of the data section)."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise CorruptCheckpointError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
    (n,) = struct.unpack("<Q", raw)
    if n > size - 8 or n > 100 * 2**20:
      raise CorruptCheckpointError(f"{path}: not a safetensors file (header length {n} > file size {size})")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CorruptCheckpointError(f"{path}: corrupt safetensors header ({e})") from None
  header.pop("__metadata__", None)
  end = max((t["data_offsets"][1] for t in header.values()), default=0)
  if 8 + n + end > size:
    raise CorruptCheckpointError(f"{path}: truncated: the header describes {8 + n + end} bytes, the file has {size}")
  return header, 8 + n


def read_metadata(path: str) -> dict[str, str]:
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    return json.loads(f.read(n)).get("__metadata__", {}) or {}


def load(path: str) -> dict[str, np.ndarray]:
  """All tensors of a safetensors file as numpy arrays (memory-mapped, read-only)."""
  header, start = read_header(path)
  data = np.memmap(path, dtype=np.uint8, mode="r")
  out = {}
  for name, info in header.items():
    if info["dtype"] not in DTYPES:
      raise CorruptCheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    dtype = np.dtype(DTYPES[info["dtype"]])
    count = int(np.prod(info["shape"], dtype=np.int64))
    if end - begin != count * dtype.itemsize:
      raise CorruptCheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape "
                                   f"{info['shape']} of {info['dtype']}")
    out[name] = data[start + begin:start + end].view(dtype).reshape(info["shape"])
  return out


def save(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
  """Write tensors (numpy or jax arrays) to `path`, in sorted key order, C-contiguous."""
  arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in sorted(tensors.items())}
  header, offset = {}, 0
  for name, a in arrays.items():
    if a.dtype not in CODES:
      raise ValueError(f"cannot write tensor {name!r} of dtype {a.dtype} to safetensors")
    header[name] = {"dtype": CODES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes, as the reference writer does
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for a in arrays.values():
      f.write(a.tobytes())
  os.replace(tmp, path)
