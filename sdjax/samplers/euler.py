"""Euler (Karras et al. 2022, Algorithm 2 without churn) in sigma space, as diffusers'
EulerDiscreteScheduler: the model sees x / sqrt(sigma^2 + 1) at (possibly fractional) timesteps."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sdjax import samplers
from sdjax.samplers import discretisation as disc
from sdjax.samplers.denoiser import denoiser
from sdjax.schedules import Schedule

SCHEDULE_OPTIONS = ("use_karras_sigmas",)  # (and, for euler and heun, custom step lists)


def sigma_tables(schedule: Schedule, num_steps: int) -> dict[str, np.ndarray]:
  """diffusers' EulerDiscreteScheduler timesteps and sigmas, or its custom timesteps / sigmas."""
  if schedule.custom_sigmas:
    return disc.custom_sigma_tables(schedule, num_steps, "euler")
  if schedule.custom_timesteps:
    timesteps = disc.custom_timesteps(schedule, num_steps, "euler/heun", integer=False).astype(np.float32)
    return {"timesteps": timesteps, "sigmas": disc.custom_interp_sigmas(schedule, timesteps)}
  timesteps, sigmas = disc.sigma_timesteps(schedule, num_steps)
  return {"timesteps": timesteps, "sigmas": sigmas}


def init_sigma_scaled(schedule: Schedule, noise, tables):
  """Initial x = noise * max sigma (linspace/trailing) or * sqrt(max sigma^2 + 1) (leading)."""
  s = np.float32(tables["sigmas"].max())
  if schedule.timestep_spacing == "leading":
    s = np.float32((s**2 + 1) ** 0.5)
  return {"x": noise * s}


def euler_step(schedule, model_fn, carry, i, z, tables, options):
  """One Euler step of dx/dsigma from sigma_i to sigma_{i+1} (also edm_euler's: the denoiser is EDM's there)."""
  x = carry["x"]
  sigma, sigma_next = samplers.at(tables, "sigmas", i), samplers.at(tables, "sigmas", i + 1)
  x0 = denoiser(model_fn, schedule)(x, sigma, samplers.at(tables, "timesteps", i))
  d = (x - x0) / sigma  # dx/dsigma of the probability-flow ODE (Karras et al. eq. 3)
  return {"x": x + d * (sigma_next - sigma)}


def euler_ancestral_step(schedule, model_fn, carry, i, z, tables, options):
  """Euler down to sigma_down, then fresh noise up to sigma_next (k-diffusion's `sample_euler_ancestral`)."""
  x = carry["x"]
  sigma, sigma_next = samplers.at(tables, "sigmas", i), samplers.at(tables, "sigmas", i + 1)
  x0 = denoiser(model_fn, schedule)(x, sigma, samplers.at(tables, "timesteps", i))
  sigma_up = jnp.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
  sigma_down = jnp.sqrt(sigma_next**2 - sigma_up**2)
  x = x + (x - x0) / sigma * (sigma_down - sigma)
  return {"x": x + z * sigma_up}


samplers.register("euler", samplers.Sampler(
    sigma_tables, init_sigma_scaled, euler_step, samplers.noised_sigma,
    schedule_options=SCHEDULE_OPTIONS + ("custom_timesteps", "custom_sigmas")))
samplers.register("euler_a", samplers.Sampler(sigma_tables, init_sigma_scaled, euler_ancestral_step,
                                              samplers.noised_sigma, stochastic=True,
                                              schedule_options=SCHEDULE_OPTIONS))
