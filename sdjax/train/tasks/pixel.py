"""Pixel-space diffusion (`config.task = "diffusion"`, the default job): a class-conditional (or unconditional)
U-Net on images, with class-label dropout to the null class for classifier-free guidance."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from sdjax import parallel, pipelines
from sdjax.data import input_pipeline
from sdjax.models import UNet, UNetConfig
from sdjax.train import task as task_lib
from sdjax.train.tasks.diffusion import DiffusionTask, schedule_from


def drop_labels(labels: jax.Array | None, drop: jax.Array, null_class: int | None, drop_prob: float):
  """Class labels with rows `drop` replaced by the null class (classifier-free guidance's dropout)."""
  if labels is None or null_class is None or drop_prob == 0:
    return labels
  return jnp.where(drop, null_class, labels)


@task_lib.register("diffusion")
class PixelDiffusion(DiffusionTask):
  """config sections: data, model (UNetConfig), diffusion, loss, train.cond_drop_prob, sample."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
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
    self.schedule = schedule_from(config)
    super().__init__(config, mesh)
    # The null class (the last embedding) replaces dropped labels; an unconditional model has no labels.
    self.null_class = self.num_classes if self.model_config.num_class_embeds else None
    size = input_pipeline.image_size(config.data)
    self.image_shape = (size, size, self.model_config.in_channels)
    sc = config.sample
    self.grid_sampler, self.grid_steps, self.grid_guidance = sc.sampler, int(sc.num_steps), float(sc.guidance_scale)
    self.per_class = int(sc.get("per_class", 8))

  def init(self, rng, frozen):
    x = jnp.zeros((1,) + self.image_shape, jnp.float32)
    labels = jnp.zeros((1,), jnp.int32) if self.model_config.num_class_embeds else None
    return self.model.init(rng, x, jnp.zeros((1,), jnp.float32), class_labels=labels)["params"]

  def input_pipeline(self, process_index, process_count):
    return input_pipeline.pipeline_from_config(
        self.config.data, channels=self.model_config.in_channels,
        global_batch_size=self.config.train.batch_size, seed=self.config.seed,
        label=self.model_config.num_class_embeds is not None, process_index=process_index,
        process_count=process_count)

  def encode(self, batch, rng, frozen):
    return batch["image"], batch.get("label"), rng

  def drop(self, labels, drop):
    return drop_labels(labels, drop, self.null_class, self.drop_prob)

  def apply(self, params, frozen, x, t, labels, rng):
    return self.model.apply({"params": params}, x, t, class_labels=labels, train=True, rngs={"dropout": rng})

  def sample_grid(self, data, frozen):
    """The class grid: one row per class, sample.per_class images each."""
    labels = pipelines.class_grid_labels(self.num_classes, self.per_class)
    n = len(labels)
    sharding = parallel.rows_sharding(self.mesh, n)
    args = (jax.device_put(labels, sharding), np.int32(self.config.seed + 1),
            jax.device_put(np.arange(n, dtype=np.int32), sharding))
    fn = pipelines.class_conditional_fn(self.model, self.schedule, self.image_shape, sampler=self.grid_sampler,
                                        num_steps=self.grid_steps, guidance_scale=self.grid_guidance)
    sc = self.config.sample
    return task_lib.SampleGrid(fn, args, self.per_class,
                               {"sampler": sc.sampler, "steps": sc.num_steps, "guidance_scale": sc.guidance_scale})

  def _class_fn(self, sampler: str, steps: int, guidance: float):
    """jitted (ema_params, labels, seed, indices) -> images in [-1, 1] (pipelines.class_conditional_fn)."""
    return pipelines.class_conditional_fn(self.model, self.schedule, self.image_shape, sampler=sampler,
                                          num_steps=steps, guidance_scale=guidance)

  def _class_args(self, labels, indices, seed: int) -> tuple:
    """(labels, seed, indices) of `_class_fn`, the rows split over the batch devices (replicated if uneven)."""
    sharding = parallel.rows_sharding(self.mesh, len(labels))
    return (jax.device_put(np.asarray(labels, np.int32), sharding), np.int32(seed),
            jax.device_put(np.asarray(indices, np.int32), sharding))

  def eval_samples(self, eval_config, frozen):
    """config.eval's images: image i of class i % num_classes (every class equally often; class 0 for an
    unconditional model, which ignores it) and starting noise from (eval.seed, i), in batches of eval.batch_size
    (the last one padded with further indices)."""
    ec = eval_config
    n, b = ec.num_samples, ec.batch_size
    conditional = bool(self.model_config.num_class_embeds)
    labels = (np.arange(n) % self.num_classes if conditional else np.zeros(n)).astype(np.int32)
    fn = self._class_fn(ec.sampler, ec.steps, ec.guidance)

    def args(i):
      idx = np.arange(i * b, (i + 1) * b)
      return self._class_args(np.where(idx < n, labels[np.minimum(idx, n - 1)], 0), idx, ec.seed)

    return task_lib.EvalSamples(fn, args, n, b, self.image_shape, labels=labels if conditional else None)

  def export(self, state, workdir, data, *, write):
    """A digit run's end-of-run quality (sdjax.eval.digits): `sample.eval_per_class` samples per class, rendered
    with the grid's sampler from the EMA params, judged by sdjax's shipped digit classifier: its accuracy against
    the conditioning class and `digit_fid`, FID with that classifier's features (not Inception FID) against the
    bundled test split. Only for 28 x 28 x 1 images of 10 classes; 0 samples: skipped."""
    n = int(self.config.sample.get("eval_per_class", 0) or 0)
    if not n or self.image_shape != (28, 28, 1) or self.num_classes != 10 or not self.model_config.num_class_embeds:
      return {}
    from sdjax import io
    from sdjax.eval import digits
    labels = pipelines.class_grid_labels(self.num_classes, n)
    fn = self._class_fn(self.grid_sampler, self.grid_steps, self.grid_guidance)
    with jax.set_mesh(self.mesh):
      out = fn(state.ema_params, *self._class_args(labels, np.arange(len(labels)), self.config.seed + 2))
    images = io.to_uint8(np.asarray(multihost_utils.process_allgather(out, tiled=True)))
    return {"digit_eval_images": int(len(labels)), "digit_accuracy": digits.digit_accuracy(images, labels),
            "digit_fid": digits.digit_fid(images)}

  def inference(self, state, frozen):
    return pipelines.ClassConditionalModel(self.model, state.ema_params, self.schedule, self.image_shape,
                                           self.num_classes)
