"""Orbax checkpoints: async saves, keep-last-N, the data iterator's state, restore onto any mesh.

Layout: `<workdir>/checkpoints/<step>/state` (the TrainState, one array per leaf, written by every process
for its own shards) and `<step>/data` (JSON: the input pipeline's position). A restore reads the arrays
straight into the shardings of the *current* mesh, so a run saved on 8 devices resumes on 1 or 4.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class NoCheckpointError(FileNotFoundError):
  pass


class CorruptCheckpointError(ValueError):
  """A checkpoint whose files cannot be read (truncated, missing, garbled)."""


class Checkpointer:
  """Saves and restores the train state (and the data iterator's state) under `<workdir>/checkpoints`."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True, read_only: bool = False):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=not read_only, read_only=read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict[str, Any] | None = None, *, force: bool = False) -> bool:
    """Start saving `state` (and `data_state`, JSON-able) as `step`; returns at once (async), except
    that it first waits for the previous save to finish."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_state is not None:
      items["data"] = ocp.args.JsonSave(data_state)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def _step(self, step: int | None) -> int:
    step = self.latest_step() if step is None else step
    if step is None:
      raise NoCheckpointError(f"no checkpoint found in {self.directory}")
    if step not in self.all_steps():
      raise NoCheckpointError(f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}")
    return step

  def restore(self, abstract_state: Any, step: int | None = None) -> Any:
    """Restore `step` (default: latest) into the structure, dtypes and shardings of `abstract_state`.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct`s carrying `.sharding` (e.g. from
    `jax.eval_shape` plus shardings), so the arrays land directly where they belong, whatever mesh
    wrote them.
    """
    step = self._step(step)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"checkpoint {self.directory}/{step} does not match the model of this config: {e}") from e
    except Exception as e:  # noqa: BLE001  (tensorstore raises plain Exceptions for unreadable files)
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise CorruptCheckpointError(f"checkpoint {self.directory}/{step} cannot be read: {first[:300]}") from e
    return restored["state"]

  def restore_intact(self, abstract_state: Any) -> tuple[int, Any, list[tuple[int, str]]]:
    """(step, state, broken) of the newest checkpoint that can be read; `broken` lists the newer ones that
    cannot, with why. A checkpoint that does not match the model raises at once (that is the config's fault,
    not the files'); when none can be read, CorruptCheckpointError names them all."""
    broken = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        return step, self.restore(abstract_state, step), broken
      except CorruptCheckpointError as e:
        broken.append((step, str(e)))
    if not broken:
      raise NoCheckpointError(f"no checkpoint found in {self.directory}")
    raise CorruptCheckpointError("no checkpoint in {} can be read: {}".format(
        self.directory, "; ".join(why for _, why in broken)))

  def restore_data_state(self, step: int | None = None) -> dict[str, Any] | None:
    """The data iterator's state saved with `step`, or None for checkpoints written without one."""
    step = self._step(step)
    if not os.path.isdir(os.path.join(self.directory, str(step), "data")):
      return None
    return dict(self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"])

  def reached_preemption(self, step: int) -> bool:
    """Multi-process: whether all processes agree that a preemption notice (SIGTERM) arrived, at the
    same `step` on every process (jax's preemption sync point)."""
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def set_aside(workdir: str, steps: list[int]) -> list[str]:
  """Move unreadable checkpoints out of the way, to `<workdir>/checkpoints_broken/<step>` (kept, not deleted), so
  that a resumed run can write those steps again. Returns the new paths."""
  moved = []
  for step in steps:
    src = os.path.join(workdir, "checkpoints", str(step))
    dst = os.path.join(workdir, "checkpoints_broken", str(step))
    n = 1
    while os.path.exists(dst):
      dst, n = os.path.join(workdir, "checkpoints_broken", f"{step}.{n}"), n + 1
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.replace(src, dst)
    moved.append(dst)
  return moved


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
