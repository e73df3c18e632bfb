"""DDPM (Ho et al. 2020) and DDIM (Song et al. 2021) samplers, as diffusers' DDPMScheduler /
DDIMScheduler with "leading" timestep spacing and `variance_type="fixed_small"`."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import samplers
from sdjax.samplers import discretisation as disc
from sdjax.samplers.denoiser import eps_from_x0, predict
from sdjax.schedules import Schedule


def check_terminal_snr(schedule: Schedule, timesteps: np.ndarray, sampler: str,
                       allowed: tuple[str, ...] = ("v_prediction", "sample")) -> None:
  """abar = 0 at the first timestep (zero terminal SNR) makes epsilon -> x0 a division by zero."""
  if float(schedule.host_abar()[int(timesteps[0])]) == 0.0 and schedule.prediction_type not in allowed:
    raise ValueError(f"{sampler}: the schedule has zero terminal SNR (abar = 0 at t = {int(timesteps[0])}); "
                     f"prediction_type {schedule.prediction_type!r} is undefined there; use "
                     f"{' or '.join(allowed) if allowed else 'another sampler (euler, dpmpp_2m, unipc)'}")


def _tables(schedule: Schedule, num_steps: int) -> dict[str, np.ndarray]:
  timesteps = disc.discrete_timesteps(schedule, num_steps)
  check_terminal_snr(schedule, timesteps, "ddim/ddpm")
  return {"timesteps": timesteps, "prev": timesteps - schedule.num_train_timesteps // num_steps}


def _ddpm_tables(schedule: Schedule, num_steps: int) -> dict[str, np.ndarray]:
  """As DDIM's, but the previous timestep is the next one in the list, and -1 after the last (diffusers'
  DDPMScheduler.previous_timestep; DDIM steps back by T // n, which differs for trailing/linspace). Custom
  timesteps (set_timesteps(timesteps=...)) replace the spacing's."""
  if schedule.custom_timesteps:
    timesteps = disc.custom_timesteps(schedule, num_steps, "ddpm", integer=True).astype(np.int64)
    check_terminal_snr(schedule, timesteps, "ddpm")
    tables = {"timesteps": timesteps}
  else:
    tables = _tables(schedule, num_steps)
  tables["prev"] = np.concatenate([tables["timesteps"][1:], [-1]]).astype(np.int64)
  return tables


def _alphas(schedule: Schedule, i, tables, final=None):
  """(t, abar_t, abar_prev) for step i; prev from the tables (DDIM: t - T // n; DDPM: the next timestep),
  and `final` abar before t = 0 (DDIM: 1 if set_alpha_to_one else abar_0; DDPM: always 1)."""
  t = samplers.at(tables, "timesteps", i)
  prev = samplers.at(tables, "prev", i)
  if final is None:
    final = 1.0 if schedule.set_alpha_to_one else schedule.alphas_cumprod[0]
  abar = schedule.alphas_cumprod[t]
  abar_prev = jnp.where(prev >= 0, schedule.alphas_cumprod[jnp.maximum(prev, 0)], final)
  return t, abar, abar_prev


def ddim_step(schedule, model_fn, carry, i, z, tables, options):
  """Song et al. (2021), eq. 12, with sigma_t = eta * sqrt((1-a_prev)/(1-a_t) (1 - a_t/a_prev)).

  With `clip_sample`, x0 is clipped; as in diffusers, epsilon is re-derived from the clipped x0 only
  with the option `use_clipped_model_output=True`.
  """
  eta = options.get("eta", 0.0)
  x = carry["x"]
  t, abar, abar_prev = _alphas(schedule, i, tables)
  out = model_fn(x, t.astype(jnp.float32))
  x0, eps = predict(schedule.prediction_type, out, x, jnp.sqrt(abar), jnp.sqrt(1.0 - abar))
  if schedule.clip_sample:
    x0 = jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
    if options.get("use_clipped_model_output", False):
      eps = eps_from_x0(x, x0, jnp.sqrt(abar), jnp.sqrt(1.0 - abar))
  variance = (1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev)
  std = eta * jnp.sqrt(variance)
  direction = jnp.sqrt(1.0 - abar_prev - std**2) * eps
  x_prev = jnp.sqrt(abar_prev) * x0 + direction
  if eta:
    x_prev = x_prev + std * z
  return {"x": x_prev}


def ddpm_step(schedule, model_fn, carry, i, z, tables, options):
  """Ho et al. (2020), eqs. 6-7: the posterior q(x_prev | x_t, x0) with x0 predicted."""
  x = carry["x"]
  t, abar, abar_prev = _alphas(schedule, i, tables, final=1.0)
  out = model_fn(x, t.astype(jnp.float32))
  x0, _ = predict(schedule.prediction_type, out, x, jnp.sqrt(abar), jnp.sqrt(1.0 - abar))
  if schedule.clip_sample:
    x0 = jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
  alpha = abar / abar_prev
  beta = 1.0 - alpha
  mean = (jnp.sqrt(abar_prev) * beta / (1.0 - abar)) * x0 + (jnp.sqrt(alpha) * (1.0 - abar_prev) / (1.0 - abar)) * x
  variance = jnp.maximum((1.0 - abar_prev) / (1.0 - abar) * beta, 1e-20)
  return {"x": mean + jnp.where(t > 0, jnp.sqrt(variance), 0.0) * z}


def _init(schedule, noise, tables):
  return {"x": noise}


samplers.register("ddim", samplers.Sampler(_tables, _init, ddim_step, samplers.noised_vp,
                                           ("eta", "use_clipped_model_output"), stochastic=True,
                                           schedule_options=("clip_sample",)))
samplers.register("ddpm", samplers.Sampler(_ddpm_tables, _init, ddpm_step, samplers.noised_vp, stochastic=True,
                                           schedule_options=("clip_sample", "custom_timesteps")))
