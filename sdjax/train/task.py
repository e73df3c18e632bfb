"""The Task contract: what a training task supplies to the one trainer (sdjax.train.trainer), and the registry.

A task turns a config into a model's trainable params, a loss and (optionally) frozen networks, sample grids,
an export and an inference view. The trainer owns everything else: the mesh, the optimizer, the sharded
abstract state, the jitted init and step (sdjax.train.step), checkpoints, metrics and preemption.

  @task.register("mytask")
  class MyTask(task.Task):
    def init(self, rng, frozen): ...                      # trainable params (nn.Partitioned boxes kept)
    def loss_fn(self, params, batch, rng, frozen, state): ...   # (loss, metrics[, outputs])
    def input_pipeline(self, process_index, process_count): ...

Required: `init`, `loss_fn`, `input_pipeline`. Every other method below has a working default, so a task
declares what it adds by overriding it; the trainer never probes with hasattr. See docs/architecture.md.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, NamedTuple

import jax
import ml_collections
import optax

from sdjax.train import state as state_lib

TASKS: dict[str, type["Task"]] = {}
BUILTIN = "sdjax.train.tasks"  # importing it registers diffusion, ldm and vae


def register(name: str) -> Callable[[type["Task"]], type["Task"]]:
  """Class decorator: make `config.task = name` build this task."""

  def deco(cls):
    if name in TASKS and TASKS[name] is not cls:
      raise ValueError(f"task {name!r} is registered twice ({TASKS[name].__module__} and {cls.__module__})")
    cls.name = name
    TASKS[name] = cls
    return cls

  return deco


def names() -> tuple[str, ...]:
  importlib.import_module(BUILTIN)
  return tuple(sorted(TASKS))


def get(name: str) -> type["Task"]:
  importlib.import_module(BUILTIN)
  if name not in TASKS:
    raise ValueError(f"config.task: unknown task {name!r}; expected one of {names()}")
  return TASKS[name]


def task_name(config: ml_collections.ConfigDict) -> str:
  return config.get("task") or "diffusion"


def make(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> "Task":
  """The task `config.task` names ("diffusion" when it names none), built from `config` for `mesh`."""
  return get(task_name(config))(config, mesh)


@dataclasses.dataclass
class SampleGrid:
  """A jitted `fn(ema_params, *args)` -> images [N, H, W, C] in [-1, 1], laid out `nrow` per row."""
  fn: Any
  args: tuple
  nrow: int
  meta: dict


@dataclasses.dataclass
class EvalSamples:
  """The images `Task.eval_samples` renders for config.eval, batch by batch: `fn(ema_params, *args(i))` -> images
  [batch_size, H, W, C] in [-1, 1] for batch i < num_batches, split over the mesh's batch devices; rows past
  `num_samples` (the last batch's padding) are dropped. `labels` [num_samples]: each image's class (or None);
  `prompts`: each image's prompt (or None). The same seeds at every evaluation, so numbers compare across steps."""
  fn: Any
  args: Callable[[int], tuple]
  num_samples: int
  batch_size: int
  image_shape: tuple[int, int, int]
  labels: Any = None
  prompts: tuple[str, ...] | None = None

  @property
  def num_batches(self) -> int:
    return -(-self.num_samples // self.batch_size)


class Frozen(NamedTuple):
  """Networks a task uses but does not train (VAE, text encoders, a LoRA's base): params on the mesh, and
  their shardings. They travel as the train step's third argument, never in the optimizer or checkpoint."""
  params: Any
  shardings: Any


class Task:
  """Base class of training tasks. `name` is set by `register`; `config` and `mesh` by the constructor.

  Subclasses validate and parse their config sections in `__init__` (errors name the full key, e.g.
  `config.model.block_out_channels`) and call `super().__init__(config, mesh)` first.
  """
  name: str = ""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    self.config = config
    self.mesh = mesh

  # --- required ---------------------------------------------------------------------------------------

  def init(self, rng: jax.Array, frozen: Any) -> Any:
    """The trainable params from a key (traced: called under eval_shape for shapes and logical axis names,
    and under jit for the real init). May return `nn.LogicallyPartitioned` boxes."""
    raise NotImplementedError(f"task {self.name!r} must define init")

  def loss_fn(self, params: Any, batch: Any, rng: jax.Array, frozen: Any, state: Any):
    """(loss, metrics) or (loss, metrics, outputs) for a (micro-)batch; see sdjax.train.step.make_train_step."""
    raise NotImplementedError(f"task {self.name!r} must define loss_fn")

  def input_pipeline(self, process_index: int, process_count: int):
    """This process's input pipeline (sdjax.data.pipeline.Pipeline: `iterator(step, state)`, `batch(step)`)."""
    raise NotImplementedError(f"task {self.name!r} must define input_pipeline")

  # --- optional (defaults: nothing to add) -----------------------------------------------------------------

  def frozen(self) -> Frozen | None:
    """The frozen networks' params and shardings, placed on the mesh; None: the task has none."""
    return None

  def initial_params(self) -> Any | None:
    """Host params to start from instead of `init` (a pretrained checkpoint); None: `init`."""
    return None

  def create_state(self, params: Any, optimizer: optax.GradientTransformation, seed: int) -> Any:
    """The train state around freshly initialised params (a struct dataclass with step, params, opt_state,
    ema_params and rng; tasks with a second network add fields)."""
    return state_lib.create(params, optimizer, seed)

  def state_shardings(self, abstract_state: Any, boxed_params: Any, shard: Callable[[Any, Any], Any]) -> Any:
    """Shardings of the state: `shard(abstract, boxed)` maps leaves to shardings by logical axis names."""
    return shard(abstract_state, boxed_params)

  def prepare(self, batch: Any, rng: jax.Array, frozen: Any) -> tuple[Any, jax.Array]:
    """The step's non-differentiated part, for the whole batch (see make_train_step)."""
    return batch, rng

  def after_update(self, old_state: Any, new_state: Any, batch: Any, outputs: Any, rng: jax.Array,
                   ok: jax.Array) -> tuple[Any, dict[str, jax.Array]]:
    """A second update inside the step, after the params' (a GAN's discriminator); see make_train_step."""
    return new_state, {}

  def sample_grid(self, data: Any, frozen: Any) -> SampleGrid | None:
    """The grid written every train.sample_every steps and at the end; None: no grids."""
    return None

  def eval_samples(self, eval_config: Any, frozen: Any) -> EvalSamples | None:
    """What config.eval judges every eval.every_steps steps (`eval_config`: sdjax.eval.evaluator.EvalConfig; its
    sampler, steps, guidance, num_samples, batch_size and seed), rendered from the EMA params with the task's own
    sampling code; None: the task cannot be evaluated (a run that asks is refused at start-up)."""
    return None

  def export(self, state: Any, workdir: str, data: Any, *, write: bool) -> dict[str, Any]:
    """Write the finished run's weights in a portable layout (every process calls it; only `write` ones
    write); returns fields for summary.json."""
    return {}

  def inference(self, state: Any, frozen: Any) -> Any:
    """What `sdjax.runs.load` returns as `Run.model` for a restored state."""
    raise ValueError(f"task {self.name!r} runs cannot be loaded for sampling")
