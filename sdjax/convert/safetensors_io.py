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


MAX_HEADER_SIZE = 100_000_000  # bytes, as the reference reader (safetensors/src/tensor.rs)
_INT64_MAX = 2**63 - 1


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _parse(path: str) -> tuple[dict, dict[str, str], int]:
  """(tensors, metadata, byte offset of the data section) of a validated safetensors file.

  The rules of the reference reader (`SafeTensors::read_metadata` and `Metadata::validate`): a header of at
  most MAX_HEADER_SIZE bytes of UTF-8 JSON holding an object; `__metadata__` a str->str map (or null); each
  tensor {dtype, shape, data_offsets} with a known dtype, non-negative integer dims, and byte offsets that,
  sorted by begin, tile the data section from 0 to its end exactly (begin <= end, no gap, no overlap), each
  span holding prod(shape) * itemsize bytes (computed without overflow). Any violation: CorruptCheckpointError.
  """
  def bad(msg):
    return CorruptCheckpointError(f"{path}: {msg}")

  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise bad(f"not a safetensors file ({size} bytes, too short for a header)")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER_SIZE:
      raise bad(f"not a safetensors file (header length {n} > limit {MAX_HEADER_SIZE})")
    if n > size - 8:
      raise bad(f"not a safetensors file (header length {n} > file size {size})")
    try:
      header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
      raise bad(f"corrupt safetensors header (not UTF-8 JSON: {type(e).__name__}: {e})") from None
  if not isinstance(header, dict):
    raise bad(f"corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
  metadata = header.pop("__metadata__", None)
  if metadata is None:
    metadata = {}
  if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
    raise bad("corrupt safetensors header (__metadata__ is not a map of strings to strings)")
  spans = []
  for name, info in header.items():
    where = f"tensor {name!r}"
    if not isinstance(info, dict):
      raise bad(f"{where}: header entry is a JSON {type(info).__name__}, not an object")
    for key in ("dtype", "shape", "data_offsets"):
      if key not in info:
        raise bad(f"{where}: header entry has no {key!r}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
      raise bad(f"{where} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
      raise bad(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) and o >= 0 for o in offsets)):
      raise bad(f"{where}: data_offsets {offsets!r} is not a pair of non-negative integers")
    count = 1
    for d in shape:  # checked multiplication, as the reference's try_fold(checked_mul)
      count *= d
      if count > _INT64_MAX:
        raise bad(f"{where}: shape {shape} overflows int64")
    nbytes = count * np.dtype(DTYPES[dtype]).itemsize
    if nbytes > _INT64_MAX:
      raise bad(f"{where}: shape {shape} of {dtype} overflows int64 in bytes")
    spans.append((offsets[0], offsets[1], name, nbytes))
  data_len = size - 8 - n
  last = max((end for _, end, _, _ in spans), default=0)
  if last > data_len:
    raise bad(f"truncated: the header describes {8 + n + last} bytes, the file has {size}")
  expected = 0
  for begin, end, name, nbytes in sorted(spans):
    where = f"tensor {name!r}"
    if begin > end:
      raise bad(f"{where}: data_offsets [{begin}, {end}] begin after end")
    if begin < expected:
      raise bad(f"{where}: data_offsets [{begin}, {end}] overlap the previous tensor (which ends at {expected})")
    if begin > expected:
      raise bad(f"{where}: data_offsets [{begin}, {end}] leave a gap (previous tensor ends at {expected})")
    if end - begin != nbytes:
      raise bad(f"{where} has {end - begin} bytes for shape {header[name]['shape']} of {header[name]['dtype']} "
                f"({nbytes} expected)")
    expected = end
  if expected != data_len:
    raise bad(f"the header describes {expected} bytes of data, the data section has {data_len} (trailing bytes)")
  return header, metadata, 8 + n


def read_header(path: str) -> tuple[dict, int]:
  """(header without __metadata__, byte offset of the data section), validated as the reference reader does."""
  header, _, start = _parse(path)
  return header, start


def read_metadata(path: str) -> dict[str, str]:
  return _parse(path)[1]


def load(path: str) -> dict[str, np.ndarray]:
  """All tensors of a safetensors file as numpy arrays (memory-mapped, read-only)."""
  header, start = read_header(path)
  data = np.memmap(path, dtype=np.uint8, mode="r")
  out = {}
  for name, info in header.items():
    begin, end = info["data_offsets"]
    out[name] = data[start + begin:start + end].view(DTYPES[info["dtype"]]).reshape(info["shape"])
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
