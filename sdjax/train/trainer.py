"""The one training driver: config -> task -> sharded state -> jitted steps, checkpoints, metrics, samples,
evaluations (config.eval, sdjax.eval.evaluator), export.

It knows no task: `task.make(config, mesh)` builds the one `config.task` names (sdjax.train.task).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import ml_collections
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from sdjax import checkpoint, io, parallel, preemption
from sdjax.eval.evaluator import Batch, EvalConfig, Evaluator
from sdjax.lock import WorkdirLock
from sdjax.train import mfu, optim, task as task_lib
from sdjax.train.metrics import MetricsWriter
from sdjax.train.step import StepConfig, make_train_step

log = logging.getLogger("sdjax")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """config.train (and config.seed), parsed and checked once."""
  seed: int
  batch_size: int
  num_steps: int
  grad_accum_steps: int = 1
  ema_decay: float = 0.999
  ema_warmup: bool = True
  log_every: int = 50
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  sample_every: int = 0          # 0: only at the end
  max_skipped_steps: int = 100   # stop after this many consecutive non-finite steps; 0: never
  peak_tflops: float = 0.0       # per-device peak TFLOP/s for mfu; 0: sdjax.train.mfu's table

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "TrainConfig":
    tc = config.train
    get = lambda name: tc.get(name, getattr(cls, name, None))
    try:
      c = cls(seed=int(config.seed), batch_size=int(tc.batch_size), num_steps=int(tc.num_steps),
              grad_accum_steps=int(get("grad_accum_steps")), ema_decay=float(tc.ema_decay),
              ema_warmup=bool(get("ema_warmup")), log_every=int(tc.log_every),
              checkpoint_every=int(tc.checkpoint_every), keep_checkpoints=int(tc.keep_checkpoints),
              sample_every=int(tc.sample_every or 0), max_skipped_steps=int(get("max_skipped_steps")),
              peak_tflops=float(get("peak_tflops")))
    except (TypeError, ValueError) as e:
      raise ValueError(f"config.train: {e}") from e
    for field in ("batch_size", "log_every", "checkpoint_every", "keep_checkpoints", "grad_accum_steps"):
      if getattr(c, field) < 1:
        raise ValueError(f"config.train.{field} must be >= 1, got {getattr(c, field)}")
    for field in ("num_steps", "sample_every", "max_skipped_steps", "peak_tflops"):
      if getattr(c, field) < 0:
        raise ValueError(f"config.train.{field} must be >= 0, got {getattr(c, field)}")
    if not np.isfinite(c.peak_tflops):
      raise ValueError(f"config.train.peak_tflops must be a finite number >= 0 (0: the device table), got "
                       f"{c.peak_tflops}")
    if not 0.0 <= c.ema_decay < 1.0:
      raise ValueError(f"config.train.ema_decay must be in [0, 1), got {c.ema_decay}")
    return c

  @property
  def step(self) -> StepConfig:
    return StepConfig(ema_decay=self.ema_decay, ema_warmup=self.ema_warmup, grad_accum_steps=self.grad_accum_steps)


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh, grad_accum_steps: int = 1) -> None:
  """config.train.batch_size splits evenly over the mesh's batch devices (times the micro-batches)."""
  n, k = parallel.batch_devices(mesh), grad_accum_steps
  if batch_size % (n * k):
    accum = f" times train.grad_accum_steps={k}" if k > 1 else ""
    raise ValueError(f"config.train.batch_size={batch_size} is not divisible by the {n} devices of "
                     f"the mesh's data x fsdp axes{accum}")


class Trainer:
  """A task on a mesh: optimizer, sharded abstract state, frozen params, the jitted init and train step.

  Nothing is materialised but the frozen params: shapes first (eval_shape), shardings from logical names.
  """

  def __init__(self, task: task_lib.Task, config: ml_collections.ConfigDict):
    self.task, self.config, self.mesh = task, config, task.mesh
    self.train_config = TrainConfig.from_config(config)
    self.optimizer, self.lr_schedule = optim.make_optimizer(optim.OptimConfig.from_config(config.optim),
                                                            self.train_config.num_steps)
    frozen = task.frozen()
    self.frozen, self.frozen_shardings = (frozen.params, frozen.shardings) if frozen else (None, None)
    rules = parallel.rules_from_config(config.mesh)
    fsdp_min = int(config.mesh.get("fsdp_min_size", parallel.FSDP_MIN_SIZE))
    shard = lambda abstract, boxed: parallel.state_shardings(abstract, boxed, self.mesh, rules, fsdp_min)

    boxed = jax.eval_shape(task.init, jax.random.key(0), self.frozen)
    abstract = jax.eval_shape(lambda p: task.create_state(p, self.optimizer, 0), nn.meta.unbox(boxed))
    self.state_shardings = task.state_shardings(abstract, boxed, shard)
    self.abstract_state = checkpoint.abstract_with_shardings(abstract, self.state_shardings)
    self.batch_sharding = parallel.batch_sharding(self.mesh)
    self.replicated = parallel.replicated(self.mesh)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None) -> "Trainer":
    mesh = mesh if mesh is not None else parallel.mesh_from_config(config.mesh)
    return cls(task_lib.make(config, mesh), config)

  def init_state(self) -> Any:
    seed, task = self.train_config.seed, self.task
    initial = task.initial_params()
    if initial is not None:  # e.g. full fine-tuning: start from the checkpoint's params
      init = jax.jit(lambda p: task.create_state(p, self.optimizer, seed), out_shardings=self.state_shardings)
      return init(initial)
    init = jax.jit(lambda rng, frozen: task.create_state(nn.meta.unbox(task.init(rng, frozen)), self.optimizer, seed),
                   out_shardings=self.state_shardings)
    return init(jax.random.key(seed), self.frozen)

  @property
  def frozen_args(self) -> tuple:
    """The train step's arguments after (state, batch): (frozen params,), or () for a task with none."""
    return () if self.frozen is None else (self.frozen,)

  def train_step(self, *, donate: bool = True):
    """The jitted step(state, batch, *frozen_args) with explicit in/out shardings (state donated unless not
    `donate`)."""
    tc, task = self.train_config, self.task
    check_batch_size(tc.batch_size, self.mesh, tc.grad_accum_steps)
    fn = make_train_step(task.loss_fn, self.optimizer, tc.step, self.lr_schedule, prepare=task.prepare,
                         after_update=task.after_update)
    frozen = () if self.frozen is None else (self.frozen_shardings,)
    return jax.jit(fn, in_shardings=(self.state_shardings, self.batch_sharding, *frozen),
                   out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,) if donate else ())


  def lower_step(self, train_step, state: Any, batch: Any) -> jax.stages.Lowered:
    """`train_step` (from `train_step()`) lowered for (state, batch), traced under the mesh so that the Pallas
    attention kernels run per shard (shard_map over the batch and head axes)."""
    with jax.set_mesh(self.mesh):
      return train_step.lower(state, batch, *self.frozen_args)

  def flops_per_step(self, batch: Any) -> float:
    """Model FLOPs of one train step on `batch`, over all devices (counted as sdjax.train.mfu describes)."""
    tc, task = self.train_config, self.task
    fn = make_train_step(task.loss_fn, self.optimizer, dataclasses.replace(tc.step, grad_accum_steps=1),
                         self.lr_schedule, prepare=task.prepare, after_update=task.after_update)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.batch_sharding), batch)
    with jax.set_mesh(self.mesh):
      return mfu.lowered_flops(fn, self.abstract_state, batch, *self.frozen_args)

  def throughput(self, batch: Any) -> mfu.Throughput:
    """What turns steps/s into tflops_per_device and mfu for this run."""
    peak = self.train_config.peak_tflops or mfu.peak_tflops()
    return mfu.Throughput(self.flops_per_step(batch), jax.device_count(), peak)


def check_resume(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuse to resume a run whose diffusion (config.diffusion: schedule, prediction type, ...) this config changes,
  unless config.train.allow_diffusion_change; the fields are named."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path) or config.train.get("allow_diffusion_change", False):
    return
  with open(path) as f:
    before = json.load(f).get("diffusion") or {}
  now = json.loads(config.to_json_best_effort()).get("diffusion") or {}
  changed = [f"config.diffusion.{k}: {before.get(k)!r} in the run, {now.get(k)!r} now"
             for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
  if changed:
    raise ValueError(f"{workdir} was trained with another diffusion ({'; '.join(changed)}); resuming would continue "
                     f"a different model. Use a new --workdir, or set config.train.allow_diffusion_change=True")


class _EvalInterrupted(Exception):
  """A preemption notice arrived during an evaluation: its partial results are dropped."""


class Evaluation(NamedTuple):
  """`run(ema_params, stop)` -> {metric: value}; `label` names its FID (e.g. "FID (Inception)")."""
  run: Callable[..., dict[str, float]]
  label: str


def make_eval(trainer: Trainer, eval_config: EvalConfig) -> Evaluation | None:
  """config.eval's evaluation (sdjax.eval.evaluator), or None when no
  evaluation falls within train.num_steps. Built before the first step: the feature network, the reference side
  and the task's renderer, so that a missing file or a task that cannot be evaluated stops the run here.
  `stop()` true between batches abandons the evaluation (_EvalInterrupted). eval.batch_size is rounded up to a
  multiple of the mesh's batch devices."""
  ec = eval_config
  if not ec.enabled or ec.every_steps > trainer.train_config.num_steps:
    return None
  n = parallel.batch_devices(trainer.mesh)
  if ec.batch_size % n:  # rendered split over the batch devices: round up, the extra rows are padding
    ec = dataclasses.replace(ec, batch_size=-(-ec.batch_size // n) * n)
    log.info("config.eval.batch_size rounded up to %d, a multiple of the %d batch devices", ec.batch_size, n)
  samples = trainer.task.eval_samples(ec, trainer.frozen)
  if samples is None:
    raise ValueError(f"config.eval.every_steps={ec.every_steps}: task {trainer.task.name!r} renders no images to "
                     "evaluate (set it to 0)")
  ec.check_images(samples.image_shape, labels=samples.labels is not None, prompts=samples.prompts is not None,
                  what=f"task {trainer.task.name!r}")
  evaluator = Evaluator(ec, trainer.mesh)

  def evaluate(ema_params, stop=lambda: False) -> dict[str, float]:
    def batches():
      for i in range(samples.num_batches):
        if stop():
          raise _EvalInterrupted
        lo, hi = i * samples.batch_size, min((i + 1) * samples.batch_size, samples.num_samples)
        images = samples.fn(ema_params, *samples.args(i))
        yield Batch(images, hi - lo, None if samples.labels is None else samples.labels[lo:hi],
                    None if samples.prompts is None else samples.prompts[lo:hi])

    with jax.set_mesh(trainer.mesh):
      return evaluator.evaluate(batches())

  return Evaluation(evaluate, evaluator.label)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Train (or resume) `config` in `workdir`; returns a summary dict (also written to summary.json).

  One run per workdir: a second process is refused (lock.LockedError) before it touches anything; so is
  a workdir that is a file or not writable (ValueError)."""
  problem = io.unwritable_dir(workdir)
  if problem:
    raise ValueError(f"workdir: {problem}")
  os.makedirs(workdir, exist_ok=True)
  lock = WorkdirLock(workdir, "training run") if jax.process_index() == 0 else None
  if lock is not None:
    lock.acquire()
  try:
    return _train(config, workdir)
  finally:
    if lock is not None:
      lock.release()


def _train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  eval_config = EvalConfig.from_config(config.get("eval"))  # paths checked before anything is built
  trainer = Trainer.from_config(config)
  task, tc, frozen = trainer.task, trainer.train_config, trainer.frozen_args
  evaluate = make_eval(trainer, eval_config)
  train_step = trainer.train_step()
  lead = jax.process_index() == 0

  data = task.input_pipeline(jax.process_index(), jax.process_count())
  num_steps = tc.num_steps
  ckpt = checkpoint.Checkpointer(workdir, keep=tc.keep_checkpoints)
  start = ckpt.latest_step()
  if start is not None and start >= num_steps:
    ckpt.close()
    log.warning("%s already holds a checkpoint at step %d >= train.num_steps=%d: nothing to do",
                ckpt.directory, start, num_steps)
    return {"start_step": start, "final_step": start, "steps_run": 0}
  try:
    if start is None:
      state = trainer.init_state()
      start, batches = 0, data.iterator(0)
    else:
      check_resume(config, workdir)
      start, state, broken = ckpt.restore_intact(trainer.abstract_state)
      if broken:  # e.g. a file truncated by a full disk: continue from the newest intact checkpoint
        ckpt.close()
        if lead:
          moved = checkpoint.set_aside(workdir, [s for s, _ in broken])
          for (step, why), path in zip(broken, moved):
            log.warning("%s; resuming from step %d instead (the broken one is kept in %s)", why, start, path)
        multihost_utils.sync_global_devices("sdjax: broken checkpoints set aside")
        ckpt = checkpoint.Checkpointer(workdir, keep=tc.keep_checkpoints)
      batches = data.iterator(start, ckpt.restore_data_state(start))
      log.info("resumed from %s at step %d", ckpt.directory, start)
  except BaseException:
    ckpt.close()
    raise
  # The run's record changes only once the checkpoint was restored and matched this config.
  if lead:
    path = os.path.join(workdir, "config.json")
    with open(path + ".tmp", "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(path + ".tmp", path)
  metrics = MetricsWriter(workdir, active=lead, resume_step=start)  # drops records after `start`

  summary: dict[str, Any] = {"start_step": start, "num_devices": jax.device_count(),
                             "mesh": dict(trainer.mesh.shape)}
  t0 = time.perf_counter()
  first = parallel.global_batch(next(batches), trainer.batch_sharding)
  compiled_step = trainer.lower_step(train_step, state, first).compile()
  summary["train_step_compile_s"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  throughput = trainer.throughput(first)
  summary.update(flops_per_step=throughput.flops_per_step, peak_tflops=throughput.peak_tflops,
                 flops_count_s=time.perf_counter() - t0)

  grid = task.sample_grid(data, trainer.frozen)
  compiled_sampler = None

  def write_samples(step: int) -> None:
    nonlocal compiled_sampler
    if grid is None:
      return
    if compiled_sampler is None:
      t = time.perf_counter()
      with jax.set_mesh(trainer.mesh):
        compiled_sampler = grid.fn.lower(state.ema_params, *grid.args).compile()
      summary["sampler_compile_s"] = time.perf_counter() - t
    # Every process joins the gather (the grid is split over the mesh, which spans all processes).
    imgs = multihost_utils.process_allgather(compiled_sampler(state.ema_params, *grid.args), tiled=True)
    if lead:
      image = io.make_grid(io.to_uint8(imgs), nrow=grid.nrow)
      os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
      io.save_png(os.path.join(workdir, "samples", f"step_{step:07d}.png"), image, {"step": step, **grid.meta})
      metrics.image("samples", step, image)

  pbar = tqdm(total=num_steps, initial=start, disable=not lead, dynamic_ncols=True, desc="train")
  pending: list[dict[str, jax.Array]] = []
  window_start, window_steps = time.perf_counter(), 0
  train_start, step = time.perf_counter(), start
  last_saved = start if start else None
  skipped_run = 0  # consecutive skipped steps, as of the last log step
  with preemption.OnSigterm(single_process_only=True) as term:
    try:
      batch = first
      for step in range(start, num_steps):
        if batch is None:
          batch = parallel.global_batch(next(batches), trainer.batch_sharding)
        state, m = compiled_step(state, batch, *frozen)
        batch = None
        pending.append(m)
        window_steps += 1
        done = step + 1
        if done % tc.log_every == 0 or done == num_steps:
          values = jax.device_get(pending)
          for v in values:
            skipped_run = skipped_run + 1 if v["skipped"] else 0
          elapsed = time.perf_counter() - window_start
          record = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
          record["skipped"] = float(np.sum([v["skipped"] for v in values]))
          record["steps_per_s"] = window_steps / elapsed
          record["images_per_s"] = window_steps * tc.batch_size / elapsed
          record.update(throughput.metrics(record["steps_per_s"]))
          if not np.isfinite(record["loss"]):
            log.warning("non-finite loss at step %d (the update was skipped)", done)
          metrics.write(done, record)
          if tc.max_skipped_steps and skipped_run >= tc.max_skipped_steps:
            raise FloatingPointError(
                f"the last {skipped_run} steps (to step {done}) were all skipped: non-finite loss or gradients "
                f"(config.train.max_skipped_steps={tc.max_skipped_steps}). Stopped without saving them; the "
                f"last checkpoint is step {last_saved or 'none'}. A lower config.optim.lr or gradient clipping "
                f"may help")
          # The bar moves when results arrive (at log steps), not when steps are dispatched.
          shown = {"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}
          pbar.set_postfix(loss=f"{record['loss']:.4f}", steps_s=f"{record['steps_per_s']:.2f}",
                           tflops=f"{record['tflops_per_device']:.3g}", **shown)
          pbar.update(window_steps)
          pending, window_start, window_steps = [], time.perf_counter(), 0
        if done % tc.checkpoint_every == 0 or done == num_steps:
          ckpt.save(done, state, batches.state())
          last_saved = done
        if (tc.sample_every and done % tc.sample_every == 0) or done == num_steps:
          write_samples(done)
        if evaluate is not None and done % eval_config.every_steps == 0:
          t = time.perf_counter()
          try:  # writes nothing but metrics: a kill here loses only this evaluation
            result = evaluate.run(state.ema_params, stop=(lambda: term.requested) if jax.process_count() == 1
                              else (lambda: False))
          except _EvalInterrupted:
            log.warning("preemption notice during the evaluation at step %d: its results are dropped", done)
          else:
            seconds = time.perf_counter() - t
            metrics.write(done, {**{f"eval/{k}": v for k, v in result.items()}, "eval/seconds": seconds})
            shown = ", ".join(f"{k} {v:.4g}" for k, v in result.items())
            if lead:
              pbar.write(f"eval at step {done} ({eval_config.num_samples} samples, {evaluate.label}): {shown} "
                         f"[{seconds:.1f} s]")
          window_start += time.perf_counter() - t  # not counted in the next window's steps/s
        # One process: our SIGTERM handler. Several: jax's preemption sync point (the coordination service
        # catches SIGTERM and all processes agree on the step), so every process saves the same step.
        if term.requested if jax.process_count() == 1 else ckpt.reached_preemption(done):
          log.warning("preemption notice: saving a checkpoint at step %d and exiting", done)
          if last_saved != done:
            ckpt.save(done, state, batches.state(), force=True)
          summary["preempted"] = True
          break
    finally:
      batches.close()
      pbar.close()
      ckpt.close()
      metrics.close()

  steps_run = step + 1 - start if num_steps > start else 0
  wall = time.perf_counter() - train_start
  summary.update({"final_step": int(jax.device_get(state.step)), "steps_run": steps_run,
                  "train_wall_s": wall})
  if summary["final_step"] >= num_steps:  # finished: portable weights (diffusers layouts)
    summary.update(task.export(state, workdir, data, write=lead))
  if lead:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary
