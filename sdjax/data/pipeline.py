"""The input pipeline: a grain dataset with a global shuffle, per-epoch reshuffles and per-host reading.

Order. Epoch e visits the examples in a permutation drawn from (seed, e) by grain's index shuffle (O(1)
memory, so a billion examples cost nothing to shuffle); step s of epoch e takes the permutation's s-th
slice of `global_batch_size` examples (the remainder of an epoch is dropped). The global batch at every step
is therefore a pure function of (seed, step), independent of the number of hosts.

Hosts. Process p of P reads, at every step, only its own contiguous slice [p*L, (p+1)*L) of the global
batch (L = global_batch_size / P), which is the slice `parallel.global_batch` places on p's devices: hosts
read disjoint examples that together cover the epoch, and a run on 2 hosts sees the same global batches as a
run on 1.

Randomness. An example's augmentation (crop, flip, caption dropout, latent sampling) draws from a numpy
Generator seeded with (seed, epoch, example index), so it does not depend on the host or batch either.

Resumption. `BatchIterator.state()` is grain's iterator state plus what fixes the order (seed, batch size,
dataset size); it is saved in every checkpoint and `Pipeline.iterator(step, saved)` restores it, so a
resumed run reads exactly the examples the uninterrupted run would have read.

Throughput. Examples are loaded and transformed by grain's reader threads (`num_threads`; PIL's decode
and resize release the GIL) with `prefetch` batches read ahead of the training step.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Any, Callable, Mapping

import numpy as np

log = logging.getLogger("sdjax")

Transform = Callable[[Mapping[str, Any], np.random.Generator], dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Position:
  epoch: int
  index: int  # into the source


class Pipeline:
  """Host-local batches (dicts of numpy arrays with a leading dimension global_batch_size / process_count)."""

  def __init__(self, source, transform: Transform, global_batch_size: int, seed: int, *, process_index: int = 0,
               process_count: int = 1, num_threads: int = 8, prefetch: int = 2, name: str = ""):
    import grain

    self.source = source
    self.transform = transform
    self.num_examples = len(source)
    self.global_batch_size = int(global_batch_size)
    self.seed = int(seed)
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.name = name or repr(source)
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if self.global_batch_size % self.process_count:
      raise ValueError(f"global batch size {global_batch_size} is not divisible by the {process_count} processes")
    if self.global_batch_size > self.num_examples:
      raise ValueError(f"global batch size {global_batch_size} exceeds the dataset size {self.num_examples} "
                       f"({self.name})")
    self.local_batch_size = self.global_batch_size // self.process_count
    self.steps_per_epoch = self.num_examples // self.global_batch_size
    self.num_threads, self.prefetch = max(1, int(num_threads)), max(0, int(prefetch))
    # Epoch e's permutation is order[e*N:(e+1)*N]: grain reshuffles each repetition of a shuffled dataset.
    self._order = grain.MapDataset.range(self.num_examples).shuffle(seed=self.seed).repeat(None)
    self.examples = grain.MapDataset.range(sys.maxsize).map(self._load)  # host-local example j, unbounded

  def position(self, j: int) -> Position:
    """Where this host's j-th example comes from: step j // L, row p*L + j % L of that global batch."""
    step, row = divmod(j, self.local_batch_size)
    epoch, k = divmod(step, self.steps_per_epoch)
    within = k * self.global_batch_size + self.process_index * self.local_batch_size + row
    return Position(epoch, int(self._order[epoch * self.num_examples + within]))

  def _load(self, j: int) -> dict[str, np.ndarray]:
    pos = self.position(j)
    rng = np.random.default_rng([self.seed, pos.epoch, pos.index])
    return self.transform(self.source[pos.index], rng)

  def indices(self, step: int) -> np.ndarray:
    """Source indices of this host's share of the global batch at `step` (no loading)."""
    j0 = step * self.local_batch_size
    return np.array([self.position(j0 + r).index for r in range(self.local_batch_size)], np.int64)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This host's batch at `step`, loaded directly (random access; the iterator is the fast path)."""
    j0 = step * self.local_batch_size
    return stack([self.examples[j0 + r] for r in range(self.local_batch_size)])

  def identity(self) -> dict[str, Any]:
    """What decides the order of batches; a resumed run warns when it differs from the checkpoint's."""
    return {"seed": self.seed, "global_batch_size": self.global_batch_size, "num_examples": self.num_examples}

  def iterator(self, start_step: int = 0, saved: Mapping[str, Any] | None = None) -> "BatchIterator":
    """Batches from `start_step` on. `saved`: the state a checkpoint holds for `start_step` (or None)."""
    import grain

    ds = self.examples.to_iter_dataset(grain.ReadOptions(num_threads=self.num_threads,
                                                         prefetch_buffer_size=self.prefetch * self.local_batch_size))
    it = iter(ds)
    target = {"next_index": start_step * self.local_batch_size}
    if saved is not None:
      if saved.get("kind") != "grain":
        log.warning("the checkpoint's data state is not a grain state (%s): starting the order at step %d",
                    saved.get("kind"), start_step)
      else:
        differs = {k: (saved.get(k), v) for k, v in self.identity().items() if saved.get(k) != v}
        if differs:
          log.warning("resuming with a different data order than the checkpoint's (saved, now): %s", differs)
        if saved.get("next_step") != start_step:
          raise ValueError(f"the checkpoint's data state is for step {saved.get('next_step')}, not {start_step}")
        if saved.get("process_count") == self.process_count and saved.get("iterator"):
          target = dict(saved["iterator"])  # grain's own state, as saved
    it.set_state(target)
    return BatchIterator(self, it, start_step)


class BatchIterator:
  def __init__(self, pipeline: Pipeline, it, step: int):
    self.pipeline = pipeline
    self._it = it
    self.next_step = step

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    examples = [next(self._it) for _ in range(self.pipeline.local_batch_size)]
    self.next_step += 1
    return stack(examples)

  def close(self) -> None:
    """Stop grain's reader threads (they otherwise keep filling the prefetch buffer)."""
    close = getattr(self._it, "close", None)
    if close is not None:
      close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def state(self) -> dict[str, Any]:
    """JSON-able: grain's iterator state and the order's identity, for the checkpoint."""
    p = self.pipeline
    return {"kind": "grain", "next_step": self.next_step, "process_count": p.process_count,
            "iterator": self._it.get_state(), **p.identity()}


def stack(examples: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  keys = examples[0].keys()
  return {k: np.stack([e[k] for e in examples]) for k in keys}
