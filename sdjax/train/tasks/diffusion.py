"""What every diffusion task shares: the schedule and loss from config, the step's draws and the loss.

A diffusion task (pixel.py, latent.py) supplies `encode` (a batch -> diffusion-space x0 and conditioning,
with its frozen networks) and `apply` (the model's prediction); label dropout is a task's own `drop`.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from sdjax import samplers, schedules
from sdjax.train import losses, task as task_lib
from sdjax.train.losses import LossConfig


def loss_config(config: ml_collections.ConfigDict) -> LossConfig:
  """config.loss (a missing section: the defaults)."""
  loss = config.get("loss") or {}
  try:
    return LossConfig(weighting=loss.get("weighting", "none"), snr_gamma=float(loss.get("snr_gamma", 5.0)),
                      offset_noise=float(loss.get("offset_noise", 0.0)))
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.loss: {e}") from e


def schedule_from(config: ml_collections.ConfigDict) -> schedules.Schedule:
  try:
    return schedules.from_config(config.diffusion.to_dict())
  except ValueError as e:
    raise ValueError(f"config.diffusion: {e}") from e


class DiffusionTask(task_lib.Task):
  """Base of diffusion tasks: subclasses set `self.schedule` and define `encode` and `apply`."""
  schedule: schedules.Schedule

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    super().__init__(config, mesh)
    self.loss = loss_config(config)
    try:
      self.drop_prob = float(config.train.get("cond_drop_prob", 0.0) or 0.0)
      if not 0.0 <= self.drop_prob <= 1.0:
        raise ValueError(f"cond_drop_prob must be in [0, 1], got {self.drop_prob}")
    except (TypeError, ValueError) as e:
      raise ValueError(f"config.train / config.loss: {e}") from e
    samplers.get(config.sample.sampler)  # fail early on an unknown sampler name

  def encode(self, batch: Any, rng: jax.Array, frozen: Any) -> tuple[jax.Array, Any, jax.Array]:
    """(x0 [B, H, W, C] in diffusion space, conditioning pytree, key left for the model)."""
    raise NotImplementedError

  def apply(self, params: Any, frozen: Any, x_t: jax.Array, t: jax.Array, cond: Any, rng: jax.Array) -> jax.Array:
    raise NotImplementedError

  def drop(self, cond: Any, drop: jax.Array) -> Any:
    """The conditioning with rows `drop` replaced by the null condition (default: kept; text tasks drop
    captions in the data)."""
    return cond

  def prepare(self, batch, rng, frozen):
    k_draw, k_model = jax.random.split(rng)
    x0, cond, k_model = self.encode(batch, k_model, frozen)
    draws = losses.draw(k_draw, x0.shape, self.schedule, self.loss, self.drop_prob)
    return {"x0": x0.astype(jnp.float32), "cond": self.drop(cond, draws.drop), "draws": draws}, k_model

  def loss_fn(self, params, batch, rng, frozen, state):
    apply = lambda p, x, t, c, r: self.apply(p, frozen, x, t, c, r)
    return losses.diffusion_loss(apply, params, self.schedule, batch["x0"], batch["cond"], batch["draws"], rng,
                                 self.loss), {}
