"""A deterministic, stateless batch schedule over an in-memory dataset.

The global batch at step s is a pure function of (seed, s): epoch e = s // steps_per_epoch is a fresh
permutation drawn from (seed, e), and the batch is its s-th slice (the remainder of each epoch is
dropped). A resumed run therefore sees exactly the batches an uninterrupted run would: its checkpointed
state is the next step plus the parameters that fix the order, checked on restore. Each process takes its
own contiguous slice of the global batch.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger("sdjax")


class StepBatches:
  def __init__(self, arrays: dict[str, np.ndarray], global_batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    sizes = {k: len(v) for k, v in arrays.items()}
    self.num_examples = next(iter(sizes.values()))
    if len(set(sizes.values())) != 1:
      raise ValueError(f"all arrays need the same length, got {sizes}")
    if global_batch_size % process_count:
      raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                       f"{process_count} processes")
    if global_batch_size > self.num_examples:
      raise ValueError(f"global batch size {global_batch_size} exceeds the dataset size {self.num_examples}")
    self.arrays = arrays
    self.global_batch_size = global_batch_size
    self.seed = seed
    self.local_batch_size = global_batch_size // process_count
    self.process_index = process_index
    self.steps_per_epoch = self.num_examples // global_batch_size

  def indices(self, step: int) -> np.ndarray:
    """Indices of this process's share of the global batch at `step`."""
    epoch, k = divmod(step, self.steps_per_epoch)
    perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
    start = k * self.global_batch_size + self.process_index * self.local_batch_size
    return perm[start:start + self.local_batch_size]

  def batch(self, step: int) -> dict[str, np.ndarray]:
    idx = self.indices(step)
    return {k: v[idx] for k, v in self.arrays.items()}

  def state(self, next_step: int) -> dict[str, Any]:
    """The iterator's position for the checkpoint: everything that decides the batches from `next_step` on."""
    return {"kind": "step_batches", "next_step": int(next_step), "seed": int(self.seed),
            "global_batch_size": int(self.global_batch_size), "num_examples": int(self.num_examples)}

  def check_state(self, saved: dict[str, Any] | None, next_step: int) -> None:
    """Warn when a resumed run will not see the batches the saved run would have seen."""
    if saved is None:
      return
    differs = {k: (saved.get(k), v) for k, v in self.state(next_step).items() if saved.get(k) != v}
    if differs:
      log.warning("resuming with a different data order than the checkpoint's (saved, now): %s", differs)
