"""Diffusion training losses: the target, its weighting and the noise, as small functions.

The model is trained to output the schedule's prediction type (epsilon, v_prediction or sample = x0;
zero-terminal-SNR schedules come from `schedules.make_schedule(rescale_betas_zero_snr=True)`). Options:
- min-SNR-gamma weighting (Hang et al. 2023): each example's MSE is scaled by min(SNR_t, gamma) / SNR_t for
  epsilon, min(SNR_t, gamma) / (SNR_t + 1) for v and min(SNR_t, gamma) for x0 targets, i.e. the x0-space
  loss clamped at gamma, expressed in the target's space. At SNR 0 (zero-terminal schedules) the epsilon
  weight takes its limit 1.
- offset noise (Guttenberg 2023): noise + offset * n with n ~ N(0, I) of shape [B, 1, 1, C], so the model
  also learns to change an image's mean brightness.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from sdjax import schedules
from sdjax.schedules import Schedule

WEIGHTINGS = ("none", "min_snr")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  weighting: str = "none"        # none | min_snr
  snr_gamma: float = 5.0         # gamma of min-SNR weighting
  offset_noise: float = 0.0      # 0: off; ~0.05-0.1 in practice

  def __post_init__(self):
    if self.weighting not in WEIGHTINGS:
      raise ValueError(f"loss weighting: unknown {self.weighting!r}; expected one of {WEIGHTINGS}")
    if self.weighting == "min_snr" and not self.snr_gamma > 0:
      raise ValueError(f"loss snr_gamma must be > 0 for min_snr weighting, got {self.snr_gamma}")


class Draws(NamedTuple):
  """The randomness of one training step, drawn for the whole batch (so micro-batches can split it)."""
  t: jax.Array        # int32 [B]
  noise: jax.Array    # float32 [B, H, W, C]
  drop: jax.Array     # bool [B], True: condition replaced by the null condition


def draw(rng: jax.Array, x0_shape: tuple[int, ...], schedule: Schedule, cfg: LossConfig,
         drop_prob: float = 0.0) -> Draws:
  """Timesteps, noise and condition dropout (probability `drop_prob`) for a batch of shape `x0_shape`."""
  if not 0.0 <= drop_prob <= 1.0:
    raise ValueError(f"cond_drop_prob must be in [0, 1], got {drop_prob}")
  k_t, k_noise, k_offset, k_drop = jax.random.split(rng, 4)
  b = x0_shape[0]
  t = jax.random.randint(k_t, (b,), 0, schedule.num_train_timesteps)
  noise = jax.random.normal(k_noise, x0_shape, jnp.float32)
  if cfg.offset_noise:
    offset = jax.random.normal(k_offset, (b,) + (1,) * (len(x0_shape) - 2) + x0_shape[-1:], jnp.float32)
    noise = noise + cfg.offset_noise * offset
  drop = jax.random.bernoulli(k_drop, drop_prob, (b,))
  return Draws(t, noise, drop)


def min_snr_weight(snr: jax.Array, gamma: float, prediction_type: str) -> jax.Array:
  """Per-example loss weight of min-SNR-gamma for a model predicting `prediction_type`."""
  clamped = jnp.minimum(snr, gamma)
  if prediction_type == "epsilon":
    return jnp.where(snr > 0, clamped / jnp.where(snr > 0, snr, 1.0), 1.0)
  if prediction_type == "v_prediction":
    return clamped / (snr + 1.0)
  return clamped


def example_weights(schedule: Schedule, t: jax.Array, cfg: LossConfig) -> jax.Array:
  if cfg.weighting == "min_snr":
    return min_snr_weight(schedules.snr(schedule, t), cfg.snr_gamma, schedule.prediction_type)
  return jnp.ones(t.shape, jnp.float32)


def diffusion_loss(apply_fn: Callable[..., jax.Array], params: Any, schedule: Schedule, x0: jax.Array,
                   cond: Any, draws: Draws, rng: jax.Array, cfg: LossConfig) -> jax.Array:
  """Weighted mean squared error to the schedule's training target (Ho et al. 2020, eq. 14), in float32.

  apply_fn(params, x_t, t, cond, rng) -> prediction; `cond` is the conditioning as the task made it (class
  labels after dropout, text embeddings, ...); `rng` is for the model's own randomness (dropout).
  """
  x0 = x0.astype(jnp.float32)
  x_t = schedules.add_noise(schedule, x0, draws.noise, draws.t)
  pred = apply_fn(params, x_t, draws.t.astype(jnp.float32), cond, rng)
  target = schedules.training_target(schedule, x0, draws.noise, draws.t)
  per_example = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=tuple(range(1, x0.ndim)))
  return jnp.mean(example_weights(schedule, draws.t, cfg) * per_example)
