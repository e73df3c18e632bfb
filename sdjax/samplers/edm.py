"""EDM samplers (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"), as
diffusers' EDMEulerScheduler and EDMDPMSolverMultistepScheduler: edm_euler, and edm_dpmpp_1m / 2m / 3m
(DPM-Solver++, Lu et al. 2022, multistep, midpoint) with edm_dpmpp_1m_sde / 2m_sde (SDE-DPM-Solver++).

The schedule is an EDM one (`Schedule.edm`): sigmas from edm_sigma_max down to edm_sigma_min, "karras" (eq. 5 with
rho) or "exponential" (uniform in log sigma), then the final sigma (0, or sigma_min with
final_sigmas_type="sigma_min"). x lives in sigma space, x = x0 + sigma eps, starting from noise * sqrt(sigma_max^2 + 1)
(diffusers' `init_noise_sigma`). The model is preconditioned (EDM, table 1): it sees c_in x with
c_in = 1 / sqrt(sigma^2 + sigma_data^2) at "timestep" c_noise = 0.25 log sigma (the tables' "timesteps", as
diffusers hands them to the network), and its raw output F gives the denoiser D = c_skip x + c_out F with
c_skip = sigma_data^2 / (sigma^2 + sigma_data^2), c_out = +-sigma sigma_data / sqrt(sigma^2 + sigma_data^2) (+ for
epsilon, - for v_prediction).
"""
from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np

from sdjax import samplers, schedules
from sdjax.samplers import discretisation as disc
from sdjax.samplers import dpmpp, euler
from sdjax.samplers.denoiser import denoiser
from sdjax.schedules import Schedule

EDM_OPTIONS = ("edm", "final_sigmas_type")
EDM_DPM_OPTIONS = EDM_OPTIONS + ("thresholding", "lower_order_final", "euler_at_final")


def _check(schedule: Schedule, name: str) -> None:
  if not schedule.edm:
    raise ValueError(f"sampler {name!r} needs an EDM schedule (edm=True, e.g. from an EDMEulerScheduler or "
                     f"EDMDPMSolverMultistepScheduler config)")


def edm_sigmas(schedule: Schedule, num_steps: int, *, float64_ramp: bool) -> np.ndarray:
  """The n float32 sigmas of diffusers' EDM `set_timesteps` (no final sigma). Karras: eq. 5 on a [0, 1] ramp, in
  float64 (`float64_ramp`, EDMEulerScheduler) or float32 (EDMDPMSolverMultistepScheduler); exponential: torch's
  float32 linspace of log sigma, exponentiated, descending. torch's float32 pow / exp are computed correctly
  rounded here (float64, rounded once): bit for bit except ~3% of exponential sigmas, 1 ulp off (torch's SLEEF exp)."""
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  lo, hi, rho = schedule.edm_sigma_min, schedule.edm_sigma_max, schedule.rho
  if schedule.sigma_schedule == "exponential":
    log_sigmas = schedules.torch_linspace_f32(math.log(lo), math.log(hi), num_steps).astype(np.float64)
    return np.exp(log_sigmas)[::-1].astype(np.float32)
  if float64_ramp:
    return disc.karras(lo, hi, num_steps, rho).astype(np.float32)
  lo_r, hi_r = lo ** (1 / rho), hi ** (1 / rho)
  ramp = schedules.torch_linspace_f32(0.0, 1.0, num_steps)
  base = np.float32(hi_r) + ramp * np.float32(lo_r - hi_r)  # float32 tensor with Python scalars, as torch
  return (base.astype(np.float64) ** np.float64(np.float32(rho))).astype(np.float32)


def c_noise(sigmas: np.ndarray) -> np.ndarray:
  """EDM's noise conditioning 0.25 log sigma (diffusers' `precondition_noise`), float32 (the log correctly rounded:
  torch's float32 log is 1 ulp off that in ~1.5% of these)."""
  return (np.float32(0.25) * np.log(np.asarray(sigmas, np.float32).astype(np.float64)).astype(np.float32))


def euler_tables(schedule: Schedule, num_steps: int) -> dict[str, np.ndarray]:
  _check(schedule, "edm_euler")
  sigmas = edm_sigmas(schedule, num_steps, float64_ramp=True)
  last = sigmas[-1] if schedule.final_sigmas_type == "sigma_min" else np.float32(0)  # (EDMEuler: the last sigma)
  return {"timesteps": c_noise(sigmas), "sigmas": np.append(sigmas, last).astype(np.float32)}


def dpm_tables(schedule: Schedule, num_steps: int, solver_order: int) -> dict[str, np.ndarray]:
  _check(schedule, f"edm_dpmpp_{solver_order}m")
  sigmas = edm_sigmas(schedule, num_steps, float64_ramp=False)
  last = np.float32(schedule.edm_sigma_min if schedule.final_sigmas_type == "sigma_min" else 0.0)
  return {"timesteps": c_noise(sigmas), "sigmas": np.append(sigmas, last).astype(np.float32),
          "order": dpmpp.order_table(schedule, num_steps, solver_order)}


def init(schedule: Schedule, noise, tables):
  """x = noise * sqrt(sigma_max^2 + 1) (diffusers' EDM `init_noise_sigma`)."""
  return {"x": noise * np.float32((schedule.edm_sigma_max**2 + 1) ** 0.5)}


def dpm_init(schedule: Schedule, noise, tables):
  """`init`, and no x0 predictions yet."""
  return {**init(schedule, noise, tables), "prev_x0": jnp.zeros_like(noise), "prev2_x0": jnp.zeros_like(noise)}


def dpm_step(schedule, model_fn, carry, i, z, tables, options, *, sde: bool, solver_order: int):
  """Multistep DPM-Solver++ in sigma space (alpha = 1, lambda = -log sigma) on the EDM denoiser's predictions."""
  x, prev_x0 = carry["x"], carry["prev_x0"]
  sig = lambda j: samplers.at(tables, "sigmas", jnp.maximum(j, 0))
  sigma_s, sigma_t = sig(i), sig(i + 1)
  x0 = denoiser(model_fn, schedule)(x, sigma_s, samplers.at(tables, "timesteps", i))
  if schedule.thresholding:
    x0 = dpmpp.dynamic_threshold(x0, schedule.dynamic_thresholding_ratio, schedule.sample_max_value)
  order = jnp.minimum(samplers.at(tables, "order", i), i + 1)
  lam_s, lam_t, lam_1, lam_2 = (-jnp.log(s) for s in (sigma_s, sigma_t, sig(i - 1), sig(i - 2)))
  h = lam_t - lam_s
  if sde:  # x decays by exp(-2h) towards x0; fresh noise makes up the variance
    decay, phi = sigma_t / sigma_s * jnp.exp(-h), -jnp.expm1(-2.0 * h)
    noise = sigma_t * jnp.sqrt(phi) * z
  else:
    decay, phi, noise = sigma_t / sigma_s, -jnp.expm1(-h), 0.0
  # x_next = decay x + phi D0 + c1 D1 (+ c2 D2): divided differences of the x0 predictions in lambda; the ratios
  # of unused orders are 1, so that an infinite h (the last step to sigma 0) and a missing history stay finite.
  two, three = order >= 2, order >= 3
  r0 = jnp.where(two, (lam_s - lam_1) / h, 1.0)
  d1 = (x0 - prev_x0) / r0
  update = phi * x0 + jnp.where(two, 0.5 * phi, 0.0) * d1  # midpoint
  if solver_order == 3:  # DPM-Solver++(3M)
    h3 = jnp.where(three, h, 1.0)
    r1 = jnp.where(three, (lam_1 - lam_2) / h3, 1.0)
    d1_1 = (prev_x0 - carry["prev2_x0"]) / r1
    d1_3, d2 = d1 + (r0 / (r0 + r1)) * (d1 - d1_1), (d1 - d1_1) / (r0 + r1)
    update = jnp.where(three, phi * x0 + (1.0 - phi / h3) * d1_3 + (0.5 - (h3 - phi) / h3**2) * d2, update)
  return {"x": decay * x + update + noise, "prev_x0": x0, "prev2_x0": prev_x0}


# Euler's step on the EDM denoiser (Karras et al. 2022, Algorithm 2 without churn; diffusers' s_churn = 0).
samplers.register("edm_euler", samplers.Sampler(euler_tables, init, euler.euler_step, samplers.noised_sigma,
                                                schedule_options=EDM_OPTIONS))
for _order in (1, 2, 3):
  for _sde in (False, True) if _order < 3 else (False,):  # (diffusers' EDM third-order update has no SDE form)
    samplers.register(f"edm_dpmpp_{_order}m" + ("_sde" if _sde else ""),
                      samplers.Sampler(functools.partial(dpm_tables, solver_order=_order), dpm_init,
                                       functools.partial(dpm_step, sde=_sde, solver_order=_order),
                                       samplers.noised_sigma, stochastic=_sde, schedule_options=EDM_DPM_OPTIONS))
