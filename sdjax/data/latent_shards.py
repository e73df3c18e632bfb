"""A latent cache's layout on disk (`python -m sdjax.data.cache_latents`): each process's contiguous share of
the examples in shards `latents-p<process>-*`, written in order, and the progress file that lets an
interrupted run resume after its last finished shard."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np

from sdjax.data import records


def process_range(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
  """Process p's contiguous share [start, stop) of the examples."""
  return num_examples * process_index // process_count, num_examples * (process_index + 1) // process_count


def shard_plan(num_examples: int, process_index: int, process_count: int, examples_per_shard: int
               ) -> list[dict[str, Any]]:
  """Process p's shards: [{"file", "start", "stop"}] covering its share in order."""
  start, stop = process_range(num_examples, process_index, process_count)
  n = math.ceil((stop - start) / examples_per_shard)
  prefix = f"latents-p{process_index}"
  return [{"file": records.shard_name(prefix, i, n), "start": start + i * examples_per_shard,
           "stop": min(stop, start + (i + 1) * examples_per_shard)} for i in range(n)]


def local_rows(x) -> np.ndarray:
  """This process's rows of an array split over its leading axis, in order, each row once."""
  shards = {s.index[0].start or 0: s.data for s in x.addressable_shards}
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is corrupt ({e}); delete it to start that part over") from e


def _differences(saved: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
  return {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}


def finished_cache(output: str, settings: Mapping[str, Any]) -> dict[str, Any] | None:
  """The dataset.json of a finished cache with these settings in `output`, None if there is none."""
  if not os.path.exists(os.path.join(output, records.META)):
    return None
  meta = records.read_meta(output)
  if meta.get("kind") != "latents":
    raise ValueError(f"--output {output!r} already holds a dataset of kind {meta.get('kind')!r}; "
                     f"choose another directory")
  differs = _differences(meta, settings)
  if differs:
    raise ValueError(f"--output {output!r} already holds a latent cache made with other settings "
                     f"(cache, now): {differs}; choose another directory or delete it")
  return meta


def resume_state(progress_path: str, settings: Mapping[str, Any]) -> list[str]:
  """Files of the shards an interrupted run with these settings finished (and that still exist)."""
  if not os.path.exists(progress_path):
    return []
  saved = _read_json(progress_path)
  differs = _differences(saved.get("settings", {}), settings)
  if differs:
    raise ValueError(f"{progress_path}: a partial cache made with other settings (cache, now): {differs}; "
                     f"choose another --output or delete it")
  folder = os.path.dirname(progress_path)
  return [f for f in saved.get("done", []) if os.path.exists(os.path.join(folder, f))]


class ShardWriter:
  """Collects encoded examples in order and writes each planned shard when it is full, then records it
  in the progress file (so an interrupted run resumes after it)."""

  def __init__(self, output: str, todo: list[dict[str, Any]], progress_path: str, settings: Mapping[str, Any],
               done: list[str]):
    self.output, self.todo, self.progress_path = output, list(todo), progress_path
    self.settings, self.done = dict(settings), list(done)
    self.buffer: list[bytes] = []

  def add(self, example: Mapping[str, Any]) -> None:
    if not self.todo:
      raise RuntimeError("internal error: more examples than the planned shards hold")
    self.buffer.append(records.encode(example))
    shard = self.todo[0]
    if len(self.buffer) == shard["stop"] - shard["start"]:
      records.write_shard(os.path.join(self.output, shard["file"]), self.buffer)
      self.done.append(shard["file"])
      records.write_json(self.progress_path, {"settings": self.settings, "done": self.done})
      self.buffer = []
      self.todo.pop(0)

  def close(self) -> None:
    if self.todo or self.buffer:
      raise RuntimeError(f"internal error: {len(self.todo)} planned shards were not written")
