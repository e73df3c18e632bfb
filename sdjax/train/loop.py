"""The training driver: config -> data, model, sharded state -> jitted steps, checkpoints, metrics, samples."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from sdjax import checkpoint, io, parallel, pipelines, samplers, schedules
from sdjax.data import input_pipeline
from sdjax.models import UNet, UNetConfig
from sdjax.train import optim, state as state_lib
from sdjax.train.metrics import MetricsWriter
from sdjax.train.losses import LossConfig
from sdjax.train.step import StepConfig, make_train_step

log = logging.getLogger("sdjax")


@dataclasses.dataclass
class SampleGrid:
  """A jitted `fn(ema_params, *args)` -> images [N, H, W, C] in [-1, 1], laid out `nrow` per row."""
  fn: Any
  args: tuple
  nrow: int
  meta: dict


def check_batch_size(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                     grad_accum_steps: int | None = None) -> None:
  """config.train.batch_size splits evenly over the mesh's batch devices (times the micro-batches)."""
  n, k = parallel.batch_devices(mesh), grad_accum_steps or 1
  if int(config.train.batch_size) % (n * k):
    accum = f" times train.grad_accum_steps={k}" if grad_accum_steps is not None else ""
    raise ValueError(f"config.train.batch_size={config.train.batch_size} is not divisible by the {n} devices of "
                     f"the mesh's data x fsdp axes{accum}")


class Experiment:
  """Everything derived from a config that both training and sampling need (no arrays materialised)."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None):
    self.config = config
    input_pipeline.check_config(config.data)
    if config.data.get("source") == "latents":
      raise ValueError("config.data.source='latents' feeds latent-diffusion training; this experiment trains a "
                       "pixel-space U-Net on images (use source bundled, tfds or records)")
    try:
      model = config.model.to_dict()
      if model.get("num_class_embeds") == 0:  # 0 on the command line: an unconditional model
        model["num_class_embeds"] = None
      self.model_config = UNetConfig.from_dict(model)
    except (ValueError, TypeError) as e:
      raise ValueError(f"config.model: {e}") from e
    self.model = UNet(self.model_config)
    self.num_classes = int(config.data.num_classes)
    if self.model_config.num_class_embeds not in (None, self.num_classes + 1):
      raise ValueError(f"config.model.num_class_embeds must be config.data.num_classes + 1 "
                       f"({self.num_classes + 1}: the classes and a null class), got "
                       f"{self.model_config.num_class_embeds}")
    try:
      self.schedule = schedules.from_config(config.diffusion.to_dict())
    except ValueError as e:
      raise ValueError(f"config.diffusion: {e}") from e
    samplers.get(config.sample.sampler)  # fail early on an unknown sampler name
    self.optimizer, self.lr_schedule = optim.make_optimizer(config.optim, int(config.train.num_steps))
    self.step_config = step_config(config, self.num_classes if self.model_config.num_class_embeds else None)
    size = input_pipeline.image_size(config.data)
    self.image_shape = (size, size, self.model_config.in_channels)
    self.mesh = mesh if mesh is not None else parallel.mesh_from_config(config.mesh)
    self.rules = parallel.rules_from_config(config.mesh)

    # Shapes first: shardings follow from the abstract params' logical axis names and shapes.
    boxed_params = jax.eval_shape(self._init_params, jax.random.key(0))
    abstract = jax.eval_shape(lambda p: state_lib.create(p, self.optimizer, 0), nn.meta.unbox(boxed_params))
    self.state_shardings = parallel.state_shardings(abstract, boxed_params, self.mesh, self.rules,
                                                    int(config.mesh.get("fsdp_min_size", parallel.FSDP_MIN_SIZE)))
    self.abstract_state = checkpoint.abstract_with_shardings(abstract, self.state_shardings)
    self.batch_sharding = parallel.batch_sharding(self.mesh)
    self.replicated = parallel.replicated(self.mesh)

  frozen = None  # no frozen models (latent diffusion has a VAE and text encoders)

  def input_pipeline(self, process_index: int, process_count: int):
    return input_pipeline.pipeline_from_config(
        self.config.data, channels=self.model_config.in_channels,
        global_batch_size=int(self.config.train.batch_size), seed=int(self.config.seed),
        label=self.model_config.num_class_embeds is not None, process_index=process_index,
        process_count=process_count)

  def sample_grid(self):
    """The class grid: one row per class, sample.per_class images each."""
    sc = self.config.sample
    labels = class_grid_labels(self.num_classes, int(sc.per_class))
    sharding = self.labels_sharding(len(labels))
    args = (jax.device_put(labels, sharding), np.int32(int(self.config.seed) + 1),
            jax.device_put(np.arange(len(labels), dtype=np.int32), sharding))
    fn = self.sample_fn(sc.sampler, int(sc.num_steps), float(sc.guidance_scale))
    return SampleGrid(fn, args, int(sc.per_class),
                      {"sampler": sc.sampler, "steps": sc.num_steps, "guidance_scale": sc.guidance_scale})

  def _init_params(self, rng):
    x = jnp.zeros((1,) + self.image_shape, jnp.float32)
    labels = jnp.zeros((1,), jnp.int32) if self.model_config.num_class_embeds else None
    return self.model.init(rng, x, jnp.zeros((1,), jnp.float32), class_labels=labels)["params"]

  def init_state(self) -> state_lib.TrainState:
    init = jax.jit(lambda rng: state_lib.create(nn.meta.unbox(self._init_params(rng)), self.optimizer,
                                                int(self.config.seed)),
                   out_shardings=self.state_shardings)
    return init(jax.random.key(int(self.config.seed)))

  def train_step(self, *, donate: bool = True):
    """The jitted train step with explicit in/out shardings (state donated unless `donate=False`)."""
    check_batch_size(self.config, self.mesh, self.step_config.grad_accum_steps)
    fn = make_train_step(
        lambda p, x, t, y, rng: self.model.apply({"params": p}, x, t, class_labels=y, train=True,
                                                 rngs={"dropout": rng}),
        self.schedule, self.optimizer, self.step_config, self.lr_schedule)
    return jax.jit(fn, in_shardings=(self.state_shardings, self.batch_sharding),
                   out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,) if donate else ())

  def sample_fn(self, sampler: str, num_steps: int, guidance_scale: float):
    """jitted (params, labels [B], seed, indices [B]) -> images [B, H, W, C] in [-1, 1].

    Image i's starting noise is drawn from (seed, indices[i]) alone, so deterministic samplers give
    the same image for the same (seed, index) whatever the batch it is rendered in.
    """

    def fn(params, labels, seed, indices):
      base = jax.random.key(seed)
      noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), self.image_shape))(indices)
      rng = jax.random.fold_in(jax.random.split(base)[1], indices[0])  # stochastic samplers only
      return pipelines.class_conditional(self.model, params, labels, noise, rng, schedule=self.schedule,
                                         sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale)

    return jax.jit(fn)

  def labels_sharding(self, n: int):
    return self.batch_sharding if n % parallel.batch_devices(self.mesh) == 0 else self.replicated


def step_config(config: ml_collections.ConfigDict, null_class: int | None) -> StepConfig:
  """The train step's options from config.train and config.loss (a missing loss section: defaults)."""
  tc = config.train
  loss = config.get("loss") or {}
  try:
    return StepConfig(
        ema_decay=float(tc.ema_decay), ema_warmup=bool(tc.get("ema_warmup", True)),
        grad_accum_steps=int(tc.get("grad_accum_steps", 1)),
        loss=LossConfig(weighting=loss.get("weighting", "none"), snr_gamma=float(loss.get("snr_gamma", 5.0)),
                        offset_noise=float(loss.get("offset_noise", 0.0)),
                        cond_drop_prob=float(tc.cond_drop_prob), null_class=null_class))
  except ValueError as e:
    raise ValueError(f"config.train / config.loss: {e}") from e


def class_grid_labels(num_classes: int, per_class: int) -> np.ndarray:
  """Labels for a grid with one row per class: [0]*per_class + [1]*per_class + ..."""
  return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)


class _StopFlag:
  """Whether to checkpoint and exit after the current step because of a preemption notice (SIGTERM).

  One process: our own SIGTERM handler. Several: jax's preemption sync point (the coordination service
  catches SIGTERM and all processes agree on the step), so every process saves the same step.
  """

  def __init__(self, ckpt: checkpoint.Checkpointer):
    self._ckpt = ckpt
    self._signalled = False
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self._signalled = True

  def requested(self, step: int) -> bool:
    if jax.process_count() > 1:
      return self._ckpt.reached_preemption(step)
    return self._signalled

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def make_experiment(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None):
  """The experiment of `config.task`: a pixel-space Experiment ("diffusion"), a LatentExperiment ("ldm") or an
  AutoencoderExperiment ("vae"); `train` drives any of them."""
  task = config.get("task", "diffusion")
  if task == "ldm":
    from sdjax.train.ldm import LatentExperiment
    return LatentExperiment(config, mesh)
  if task == "vae":
    from sdjax.train.autoencoder import AutoencoderExperiment
    return AutoencoderExperiment(config, mesh)
  if task != "diffusion":
    raise ValueError(f"config.task: unknown task {task!r}; expected diffusion, ldm or vae")
  return Experiment(config, mesh)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Train (or resume) `config` in `workdir`; returns a summary dict (also written to summary.json)."""
  exp = make_experiment(config)
  train_step = exp.train_step()
  frozen = () if exp.frozen is None else (exp.frozen,)  # the frozen models' params (latent diffusion)
  tc = config.train
  lead = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if lead:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))

  data = exp.input_pipeline(jax.process_index(), jax.process_count())

  num_steps = int(tc.num_steps)
  ckpt = checkpoint.Checkpointer(workdir, keep=int(tc.keep_checkpoints))
  start = ckpt.latest_step()
  if start is not None and start >= num_steps:
    ckpt.close()
    log.warning("%s already holds a checkpoint at step %d >= train.num_steps=%d: nothing to do",
                ckpt.directory, start, num_steps)
    return {"start_step": start, "final_step": start, "steps_run": 0}
  if start is None:
    state = exp.init_state()
    start, batches = 0, data.iterator(0)
  else:
    state = ckpt.restore(exp.abstract_state)
    batches = data.iterator(start, ckpt.restore_data_state(start))
    log.info("resumed from %s at step %d", ckpt.directory, start)
  metrics = MetricsWriter(workdir, active=lead, resume_step=start if start else None)

  summary: dict[str, Any] = {"start_step": start, "num_devices": jax.device_count(),
                             "mesh": dict(exp.mesh.shape)}
  t0 = time.perf_counter()
  first = parallel.global_batch(next(batches), exp.batch_sharding)
  compiled_step = train_step.lower(state, first, *frozen).compile()
  summary["train_step_compile_s"] = time.perf_counter() - t0

  grid = exp.sample_grid()
  compiled_sampler = None

  def write_samples(step: int) -> None:
    nonlocal compiled_sampler
    if compiled_sampler is None:
      t = time.perf_counter()
      compiled_sampler = grid.fn.lower(state.ema_params, *grid.args).compile()
      summary["sampler_compile_s"] = time.perf_counter() - t
    # Every process joins the gather (the grid is split over the mesh, which spans all processes).
    imgs = multihost_utils.process_allgather(compiled_sampler(state.ema_params, *grid.args), tiled=True)
    if lead:
      image = io.make_grid(io.to_uint8(imgs), nrow=grid.nrow)
      os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
      io.save_png(os.path.join(workdir, "samples", f"step_{step:07d}.png"), image, {"step": step, **grid.meta})
      metrics.image("samples", step, image)

  stop = _StopFlag(ckpt)
  pbar = tqdm(total=num_steps, initial=start, disable=not lead, dynamic_ncols=True, desc="train")
  pending: list[dict[str, jax.Array]] = []
  window_start, window_steps = time.perf_counter(), 0
  train_start, step = time.perf_counter(), start
  last_saved = start if start else None
  try:
    batch = first
    for step in range(start, num_steps):
      if batch is None:
        batch = parallel.global_batch(next(batches), exp.batch_sharding)
      state, m = compiled_step(state, batch, *frozen)
      batch = None
      pending.append(m)
      window_steps += 1
      done = step + 1
      if done % int(tc.log_every) == 0 or done == num_steps:
        values = jax.device_get(pending)
        elapsed = time.perf_counter() - window_start
        record = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
        record["skipped"] = float(np.sum([v["skipped"] for v in values]))
        record["steps_per_s"] = window_steps / elapsed
        record["images_per_s"] = window_steps * int(tc.batch_size) / elapsed
        if not np.isfinite(record["loss"]):
          log.warning("non-finite loss at step %d (the update was skipped)", done)
        metrics.write(done, record)
        # The bar moves when results arrive (at log steps), not when steps are dispatched.
        pbar.set_postfix(loss=f"{record['loss']:.4f}", steps_s=f"{record['steps_per_s']:.2f}")
        pbar.update(window_steps)
        pending, window_start, window_steps = [], time.perf_counter(), 0
      if done % int(tc.checkpoint_every) == 0 or done == num_steps:
        ckpt.save(done, state, batches.state())
        last_saved = done
      if (tc.sample_every and done % int(tc.sample_every) == 0) or done == num_steps:
        write_samples(done)
      if stop.requested(done):
        log.warning("preemption notice: saving a checkpoint at step %d and exiting", done)
        if last_saved != done:
          ckpt.save(done, state, batches.state(), force=True)
        summary["preempted"] = True
        break
  finally:
    batches.close()
    pbar.close()
    stop.restore()
    ckpt.close()
    metrics.close()

  steps_run = step + 1 - start if num_steps > start else 0
  wall = time.perf_counter() - train_start
  summary.update({"final_step": int(jax.device_get(state.step)), "steps_run": steps_run,
                  "train_wall_s": wall})
  if summary["final_step"] >= num_steps and hasattr(exp, "export"):  # finished: diffusers-format weights
    summary.update(exp.export(state, workdir, write=lead))
  if lead:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary
