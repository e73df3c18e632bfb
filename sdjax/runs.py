"""Load a finished (or interrupted) training run from its workdir, for any task, written once.

  run = runs.load("runs/default")            # the latest checkpoint's EMA params
  run.task, run.step, run.model              # "diffusion", 1800, pipelines.ClassConditionalModel(...)

The run's config.json names its task; the task (sdjax.train.task registry) rebuilds the model from it and
turns the restored state into `Run.model`: a `pipelines.ClassConditionalModel` ("diffusion"), a
`pipelines.TextToImageModel` ("ldm") or `(AutoencoderKL, params)` ("vae"). Used by sample.py, sdjax.sampling
and sdjax.jobs, which never import the training code themselves.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections

from sdjax import checkpoint, parallel


@dataclasses.dataclass(frozen=True)
class Run:
  task: str                        # the run's config.task
  config: ml_collections.ConfigDict
  step: int                        # the checkpoint step loaded
  model: Any                       # the task's inference view (see the module docstring)
  model_id: str                    # "<absolute workdir>@<step>"
  mesh: jax.sharding.Mesh          # where model's params live


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{workdir} is not an sdjax training run (no config.json); "
                            f"train first: python train.py --workdir {workdir}")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def task_of(workdir: str) -> str:
  """config.task of a run ("diffusion" when it names none, or when there is no config.json to read)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    return "diffusion"  # load() reports the missing run
  with open(path) as f:
    return json.load(f).get("task") or "diffusion"


def load(workdir: str, step: int | None = None, *, task: str | None = None,
         mesh: jax.sharding.Mesh | None = None) -> Run:
  """The run in `workdir` at checkpoint `step` (default: the latest), on `mesh` (default: the run's mesh
  if this machine's devices fit it, else data-parallel over all of them). With `task`, a run of another task
  is refused."""
  from sdjax.train import task as task_lib, trainer as trainer_lib  # the registry: runs sit above training
  config = read_config(workdir)
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise FileNotFoundError(f"{workdir} is not an sdjax training run with a checkpoint (no checkpoints/ there); "
                            f"train first: python train.py --workdir {workdir}")
  name = task_lib.task_name(config)
  if task is not None and name != task:
    kind = {"ldm": "text-to-image", "diffusion": "class-conditional"}.get(task, task)
    raise ValueError(f"{workdir} is a {name!r} run, not a {kind} ({task!r}) run")
  if mesh is None:
    try:
      mesh = parallel.mesh_from_config(config.mesh)
    except ValueError:  # trained on another device count: data-parallel over the devices here
      mesh = parallel.make_mesh({"data": -1})
  trainer = trainer_lib.Trainer(task_lib.make(config, mesh), config)
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {ckpt.directory}; train first: python train.py --workdir {workdir}")
    state = ckpt.restore(trainer.abstract_state, step)
  finally:
    ckpt.close()
  model = trainer.task.inference(state, trainer.frozen)
  return Run(name, config, int(step), model, f"{os.path.abspath(workdir)}@{step}", mesh)
