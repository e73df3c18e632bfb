"""sdjax's sharded record format: ArrayRecord files of msgpack-encoded examples plus a `dataset.json`.

A dataset directory (written by `python -m sdjax.data.prepare` or `python -m sdjax.data.cache_latents`):

  dataset.json                    {"format": "sdjax-records", "kind": "images" | "latents",
                                   "num_examples", "shards": [{"file", "num_examples"}], ...}
  <name>-00000-of-00004.array_record

Each record is a msgpack map of plain values and numpy arrays (flax's msgpack encoding): for images
`{"image": <encoded file bytes>, "caption": str, "path": str, "height": int, "width": int}`. ArrayRecord
files are written with `group_size:1`, so any example is one read: grain reads them by global index with
`ArrayRecordDataSource`, which is what lets every host read only the examples of its own batches.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping

from flax import serialization

FORMAT = "sdjax-records"
META = "dataset.json"


def encode(example: Mapping[str, Any]) -> bytes:
  return serialization.msgpack_serialize(dict(example))


def decode(data: bytes) -> dict[str, Any]:
  return serialization.msgpack_restore(data)


def shard_name(prefix: str, i: int, n: int) -> str:
  return f"{prefix}-{i:05d}-of-{n:05d}.array_record"


def _discard(path: str) -> None:
  try:
    os.remove(path)
  except FileNotFoundError:
    pass


def write_shard(path: str, examples: Iterable[bytes]) -> int:
  """Write encoded examples to one ArrayRecord file (atomically: a temporary name, then a rename). Whatever
  stops it (an exception from `examples`, a full disk, an interrupt) removes the temporary file."""
  from array_record.python.array_record_module import ArrayRecordWriter

  tmp = path + ".tmp"
  n = 0
  try:
    writer = ArrayRecordWriter(tmp, "group_size:1")
    try:
      for e in examples:
        writer.write(e)
        n += 1
    finally:
      writer.close()
    os.replace(tmp, path)
  except BaseException:
    _discard(tmp)
    raise
  return n


def write_text(path: str, text: str) -> None:
  """Write `text` (UTF-8) atomically: a temporary name, then a rename; readers never see half a file, and a
  failure removes the temporary file."""
  tmp = path + ".tmp"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    _discard(tmp)
    raise


def write_json(path: str, obj: Any) -> None:
  """Write `obj` as JSON atomically (a temporary name, then a rename): readers never see half a file."""
  write_text(path, json.dumps(obj, indent=2))


def write_meta(directory: str, meta: Mapping[str, Any]) -> None:
  write_json(os.path.join(directory, META), {"format": FORMAT, **meta})


def read_meta(directory: str) -> dict[str, Any]:
  """`dataset.json` of a prepared directory, checked: every listed shard exists."""
  path = os.path.join(directory, META)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"dataset directory {directory!r} does not exist")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory!r} is not a prepared sdjax dataset (no {META}); create one with "
                            f"`python -m sdjax.data.prepare --input IMAGES --output {directory}`")
  try:
    with open(path) as f:
      meta = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is corrupt: {e}") from e
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
  missing = [s["file"] for s in meta["shards"] if not os.path.exists(os.path.join(directory, s["file"]))]
  if missing:
    raise FileNotFoundError(f"{directory}: shard files listed in {META} are missing: {missing}")
  return meta


class RecordSource:
  """Random access to a prepared directory: `len(src)`, `src[i]` -> decoded example dict (grain-compatible)."""

  def __init__(self, directory: str, kind: str | None = None):
    import grain

    self.directory = directory
    self.meta = read_meta(directory)
    if kind is not None and self.meta.get("kind") != kind:
      raise ValueError(f"{directory} holds {self.meta.get('kind')!r} records, expected {kind!r}")
    paths = [os.path.join(directory, s["file"]) for s in self.meta["shards"] if s["num_examples"]]
    self._source = grain.sources.ArrayRecordDataSource(paths) if paths else []
    if len(self._source) != self.meta["num_examples"]:
      raise ValueError(f"{directory}: the shards hold {len(self._source)} examples, {META} says "
                       f"{self.meta['num_examples']}")

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict[str, Any]:
    try:
      return decode(self._source[i])
    except Exception as e:  # a corrupt record: name where it is
      raise ValueError(f"{self.directory}: record {i} cannot be decoded: {e}") from e

  def __repr__(self) -> str:
    return f"RecordSource({self.directory!r}, {len(self)} examples)"
