"""DPM-Solver-2 (Lu et al. 2022, Algorithm 1 with r1 = 1/2) in k-diffusion's sigma form (`sample_dpm_2`), as
diffusers' KDPM2DiscreteScheduler, and its ancestral variant (`sample_dpm_2_ancestral`, diffusers'
KDPM2AncestralDiscreteScheduler).

Step i goes from sigma_i to sigma_{i+1} through the midpoint in log sigma, sigma_mid = sqrt(sigma_i sigma_{i+1}):
an Euler step to sigma_mid, the model evaluated there, and the midpoint's slope applied over the whole step.
The last step, which ends at sigma = 0, is a plain Euler step, so `num_steps` steps call the model
2 * num_steps - 1 times, at diffusers' interleaved timesteps t_0, t_mid_0, t_1, t_mid_1, ..., t_{n-1}
(t_mid: the fractional timestep whose log sigma interpolates to log sigma_mid). As in heun.py, one scan step
is one such step: `tables["timesteps"]` holds its first evaluation, `tables["mid_timesteps"]` its second.
Ancestral: the step ends at sigma_down and fresh noise brings it up to sigma_{i+1} (sigma_up, as euler_a);
the midpoint lies between sigma_i and sigma_down.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import samplers
from sdjax.samplers import discretisation as disc
from sdjax.samplers.denoiser import denoiser
from sdjax.samplers.euler import init_sigma_scaled
from sdjax.schedules import Schedule


def _geometric_mean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """exp(lerp(log a, log b, 1/2)) in float32 as diffusers computes it (torch's lerp at weight 1/2 is
  log b - (log b - log a) / 2); 0 where either is 0."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  with np.errstate(divide="ignore", invalid="ignore"):
    la, lb = np.log(a), np.log(b)
    out = np.exp(lb - (lb - la) * np.float32(0.5))
  return np.where((a == 0) | (b == 0), np.float32(0), out).astype(np.float32)


def kdpm2_sigmas(schedule: Schedule, num_steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(timesteps float32 [n], sigmas float32 [n + 1] (last 0), log sigmas of the training timesteps) of
  diffusers' KDPM2 schedulers: Euler's spacing; with `use_karras_sigmas`, Karras et al. (2022) eq. 5 (rho = 7)
  between the end sigmas, mapped back to timesteps by log-sigma interpolation and rounded."""
  timesteps, sigmas = disc.sigma_timesteps(schedule.replace(use_karras_sigmas=False), num_steps)
  log_sigmas = disc.log_train_sigmas(schedule)
  if schedule.use_karras_sigmas:
    # The end sigmas sit at integer timesteps, so their float32 values are the float64 interpolants.
    karras = disc.karras(sigmas[-2], sigmas[0], num_steps)
    timesteps = disc.sigmas_to_t(karras, log_sigmas).round().astype(np.float32)
    sigmas = np.concatenate([karras, [0.0]]).astype(np.float32)
  return timesteps, sigmas, log_sigmas


def _mid_timesteps(mid_sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
  return disc.sigmas_to_t(np.asarray(mid_sigmas, np.float32), log_sigmas).astype(np.float32)


def kdpm2_tables(schedule: Schedule, num_steps: int) -> dict[str, np.ndarray]:
  """timesteps, sigmas [n + 1], and the midpoints' sigmas and timesteps [n] (0 on the last step, unused)."""
  timesteps, sigmas, log_sigmas = kdpm2_sigmas(schedule, num_steps)
  mid = _geometric_mean(sigmas[1:], sigmas[:-1])
  return {"timesteps": timesteps, "sigmas": sigmas, "mid_sigmas": mid,
          "mid_timesteps": _mid_timesteps(mid, log_sigmas)}


def kdpm2_ancestral_tables(schedule: Schedule, num_steps: int) -> dict[str, np.ndarray]:
  """As kdpm2_tables, plus sigma_up / sigma_down [n] of each step (Euler-ancestral's split of sigma_{i+1})."""
  timesteps, sigmas, log_sigmas = kdpm2_sigmas(schedule, num_steps)
  s, s_next = sigmas[:-1], sigmas[1:]
  up = np.sqrt(s_next * s_next * (s * s - s_next * s_next) / (s * s)).astype(np.float32)
  down = np.sqrt(s_next * s_next - up * up).astype(np.float32)
  mid = _geometric_mean(s, down)
  return {"timesteps": timesteps, "sigmas": sigmas, "mid_sigmas": mid, "mid_timesteps": _mid_timesteps(mid, log_sigmas),
          "sigmas_up": up, "sigmas_down": down}


def _step(schedule, model_fn, carry, i, z, tables, ancestral: bool):
  x, denoised = carry["x"], denoiser(model_fn, schedule)
  sigma, sigma_next = samplers.at(tables, "sigmas", i), samplers.at(tables, "sigmas", i + 1)
  sigma_mid = samplers.at(tables, "mid_sigmas", i)
  d = (x - denoised(x, sigma, samplers.at(tables, "timesteps", i))) / sigma

  def midpoint(x):
    x_mid = x + d * (sigma_mid - sigma)
    x0 = denoised(x_mid, sigma_mid, samplers.at(tables, "mid_timesteps", i))
    d_mid = (x_mid - x0) / sigma_mid
    if not ancestral:
      return x + d_mid * (sigma_next - sigma)
    x = x + d_mid * (samplers.at(tables, "sigmas_down", i) - sigma)
    return x + z * samplers.at(tables, "sigmas_up", i)

  last = i == tables["timesteps"].shape[0] - 1
  return {"x": jax.lax.cond(last, lambda x: x + d * (sigma_next - sigma), midpoint, x)}


def kdpm2_step(schedule, model_fn, carry, i, z, tables, options):
  return _step(schedule, model_fn, carry, i, z, tables, ancestral=False)


def kdpm2_ancestral_step(schedule, model_fn, carry, i, z, tables, options):
  return _step(schedule, model_fn, carry, i, z, tables, ancestral=True)


# (no denoising_start / denoising_end: diffusers' KDPM2 schedulers are order 2, their timesteps interleaved)
samplers.register("kdpm2", samplers.Sampler(kdpm2_tables, init_sigma_scaled, kdpm2_step, samplers.noised_sigma,
                                            schedule_options=("use_karras_sigmas",), denoising_split=False))
samplers.register("kdpm2_a", samplers.Sampler(kdpm2_ancestral_tables, init_sigma_scaled, kdpm2_ancestral_step,
                                              samplers.noised_sigma, stochastic=True,
                                              schedule_options=("use_karras_sigmas",), denoising_split=False))
