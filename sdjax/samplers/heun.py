"""Heun's second-order method (Karras et al. 2022, Algorithm 1 without churn), as diffusers'
HeunDiscreteScheduler: `num_steps` steps, each an Euler step corrected by the slope at its end
(2 * num_steps - 1 model evaluations; the last step, which ends at sigma = 0, stays first order)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import samplers
from sdjax.samplers.euler import denoised, init_sigma_scaled, sigma_tables


def _tables(schedule, num_steps):
  t = sigma_tables(schedule, num_steps)
  # Timestep of the correction evaluation (the next step's timestep); unused after the last step.
  t["next_timesteps"] = np.concatenate([t["timesteps"][1:], t["timesteps"][-1:]])
  return t


def heun_step(schedule, model_fn, carry, i, z, tables, options):
  x = carry["x"]
  sigma, sigma_next = samplers.at(tables, "sigmas", i), samplers.at(tables, "sigmas", i + 1)
  d = (x - denoised(schedule, model_fn, x, sigma, samplers.at(tables, "timesteps", i))) / sigma
  x_euler = x + d * (sigma_next - sigma)

  def correct(x_euler):
    x0 = denoised(schedule, model_fn, x_euler, sigma_next, samplers.at(tables, "next_timesteps", i))
    d_next = (x_euler - x0) / sigma_next
    return x + 0.5 * (d + d_next) * (sigma_next - sigma)

  last = i == tables["timesteps"].shape[0] - 1
  return {"x": jax.lax.cond(last, lambda x_euler: x_euler, correct, x_euler)}


samplers.register("heun", samplers.Sampler(_tables, init_sigma_scaled, heun_step, samplers.noised_sigma))
