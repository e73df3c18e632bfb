"""Heun's second-order method (Karras et al. 2022, Algorithm 1 without churn), as diffusers'
HeunDiscreteScheduler: `num_steps` steps, each an Euler step corrected by the slope at its end
(2 * num_steps - 1 model evaluations; the last step, which ends at sigma = 0, stays first order)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import samplers
from sdjax.samplers.denoiser import denoiser
from sdjax.samplers.euler import SCHEDULE_OPTIONS, init_sigma_scaled, sigma_tables


def _tables(schedule, num_steps):
  t = sigma_tables(schedule, num_steps)
  # Timestep of the correction evaluation (the next step's timestep); unused after the last step.
  t["next_timesteps"] = np.concatenate([t["timesteps"][1:], t["timesteps"][-1:]])
  return t


def heun_step(schedule, model_fn, carry, i, z, tables, options):
  x, denoised = carry["x"], denoiser(model_fn, schedule)
  sigma, sigma_next = samplers.at(tables, "sigmas", i), samplers.at(tables, "sigmas", i + 1)
  d = (x - denoised(x, sigma, samplers.at(tables, "timesteps", i))) / sigma
  x_euler = x + d * (sigma_next - sigma)

  def correct(x_euler):
    x0 = denoised(x_euler, sigma_next, samplers.at(tables, "next_timesteps", i))
    d_next = (x_euler - x0) / sigma_next
    return x + 0.5 * (d + d_next) * (sigma_next - sigma)

  last = i == tables["timesteps"].shape[0] - 1
  return {"x": jax.lax.cond(last, lambda x_euler: x_euler, correct, x_euler)}


def _strength_tables(schedule, num_steps, strength):
  """img2img: the generic skipping (the first num_steps - int(num_steps * strength) steps); refused with custom
  timesteps, where diffusers' pipelines count Heun's 2n - 1 scheduler timesteps as the steps to skip."""
  if schedule.custom_timesteps:
    raise ValueError("heun: strength < 1 with custom timesteps is not supported (diffusers' img2img pipelines "
                     "skip by its 2n - 1 scheduler timesteps there)")
  start = num_steps - min(int(num_steps * strength), num_steps)
  if start >= num_steps:
    raise ValueError(f"strength={strength} leaves no steps out of {num_steps}")
  return {k: v[start:] for k, v in _tables(schedule, num_steps).items()}


samplers.register("heun", samplers.Sampler(_tables, init_sigma_scaled, heun_step, samplers.noised_sigma,
                                           strength_tables=_strength_tables,
                                           schedule_options=SCHEDULE_OPTIONS + ("custom_timesteps",)))
