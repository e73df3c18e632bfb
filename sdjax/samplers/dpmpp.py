"""DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2, midpoint form), as diffusers'
DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero"):
first order on the first and the last step, second order (using the previous x0 prediction) between."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sdjax import samplers, schedules
from sdjax.schedules import Schedule


def dpm_tables(schedule: Schedule, num_steps: int, *, unipc: bool = False) -> dict[str, np.ndarray]:
  """Integer timesteps and sigmas [n + 1] (last 0) of diffusers' multistep DPM-Solver (with `unipc`, of
  UniPCMultistepScheduler, which differs only in rounding Karras timesteps for squaredcos_cap_v2 too:
  DPMSolverMultistepScheduler leaves them fractional there, and its int64 cast truncates them)."""
  T = schedule.num_train_timesteps
  if not 1 <= num_steps <= T:
    raise ValueError(f"num_steps must be in [1, {T}], got {num_steps}")
  if schedule.timestep_spacing == "linspace":
    timesteps = np.linspace(0, T - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
  elif schedule.timestep_spacing == "leading":
    ratio = T // (num_steps + 1)
    timesteps = (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + schedule.steps_offset
  else:
    timesteps = np.arange(T, 0, -T / num_steps).round().astype(np.int64) - 1
  train_sigmas = schedules.train_sigmas(schedule)
  if schedule.use_karras_sigmas:
    rho = 7.0
    lo, hi = float(train_sigmas[0]) ** (1 / rho), float(train_sigmas[-1]) ** (1 / rho)
    sigmas = (hi + np.linspace(0, 1, num_steps) * (lo - hi)) ** rho
    log_sigmas = np.log(train_sigmas)
    timesteps = np.array([schedules._sigma_to_t(s, log_sigmas) for s in sigmas])
    if unipc or schedule.beta_schedule != "squaredcos_cap_v2":
      timesteps = timesteps.round()
    timesteps = timesteps.astype(np.int64)
  else:
    sigmas = np.interp(timesteps, np.arange(T), train_sigmas)
  sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
  return {"timesteps": timesteps.astype(np.float32), "sigmas": sigmas}


def alpha_sigma_lambda(sigma):
  """VP (alpha_t, sigma_t, lambda_t = log(alpha_t / sigma_t)) of the VE noise level sigma."""
  alpha = 1.0 / jnp.sqrt(sigma**2 + 1)
  s = sigma * alpha
  return alpha, s, jnp.log(alpha) - jnp.log(s)


def data_prediction(prediction_type: str, out, x, alpha, sigma):
  """The model's x0 prediction at x = alpha x0 + sigma eps, from its output of `prediction_type`."""
  if prediction_type == "epsilon":
    return (x - sigma * out) / alpha
  if prediction_type == "v_prediction":
    return alpha * x - sigma * out
  return out


def _init(schedule, noise, tables):
  return {"x": noise, "prev_x0": jnp.zeros_like(noise)}


def _step(schedule, model_fn, carry, i, z, tables, sde: bool):
  x, prev_x0 = carry["x"], carry["prev_x0"]
  n = tables["timesteps"].shape[0]
  sig_prev = samplers.at(tables, "sigmas", jnp.maximum(i - 1, 0))
  sig, sig_next = samplers.at(tables, "sigmas", i), samplers.at(tables, "sigmas", i + 1)
  alpha_s, sigma_s, lam_s = alpha_sigma_lambda(sig)
  alpha_t, sigma_t, lam_t = alpha_sigma_lambda(sig_next)
  _, _, lam_prev = alpha_sigma_lambda(sig_prev)
  out = model_fn(x, samplers.at(tables, "timesteps", i))
  # Data prediction x0 (the "++" variant works with x0 rather than epsilon).
  x0 = data_prediction(schedule.prediction_type, out, x, alpha_s, sigma_s)
  h = lam_t - lam_s
  first_order = (i == 0) | (i == n - 1)
  r = (lam_s - lam_prev) / h
  d = jnp.where(first_order, x0, x0 + 0.5 * (x0 - prev_x0) / r)  # D0 + D1 / 2 (midpoint)
  if sde:
    # SDE-DPM-Solver++(2M) (Lu et al. 2022, appendix; diffusers "sde-dpmsolver++", midpoint).
    x_next = (sigma_t / sigma_s * jnp.exp(-h)) * x - alpha_t * jnp.expm1(-2.0 * h) * d \
        + sigma_t * jnp.sqrt(-jnp.expm1(-2.0 * h)) * z
  else:
    x_next = (sigma_t / sigma_s) * x - alpha_t * jnp.expm1(-h) * d
  return {"x": x_next, "prev_x0": x0}


def dpmpp_2m_step(schedule, model_fn, carry, i, z, tables, options):
  return _step(schedule, model_fn, carry, i, z, tables, sde=False)


def dpmpp_2m_sde_step(schedule, model_fn, carry, i, z, tables, options):
  return _step(schedule, model_fn, carry, i, z, tables, sde=True)


samplers.register("dpmpp_2m", samplers.Sampler(dpm_tables, _init, dpmpp_2m_step, samplers.noised_vp_sigma))
samplers.register("dpmpp_2m_sde", samplers.Sampler(dpm_tables, _init, dpmpp_2m_sde_step, samplers.noised_vp_sigma, stochastic=True))
