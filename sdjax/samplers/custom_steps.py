"""Custom step lists, as diffusers pipelines take them (`pipe(..., timesteps=[...])` / `sigmas=[...]`, e.g. the Align
Your Steps lists of Sabour et al. 2024), read by the tables functions of the samplers whose diffusers scheduler
accepts them (`samplers.SCHEDULE_OPTIONS`): `Schedule.custom_timesteps` replaces the spacing's timesteps (ddpm,
euler, heun, dpmpp_*m, lcm, tcd; diffusers' `set_timesteps(timesteps=...)`), `Schedule.custom_sigmas` the sigmas
[n + 1], final one included (euler only; diffusers' `set_timesteps(sigmas=...)`: UniPC takes them only for flow
matching, which sdjax does not implement). `samplers.sample(..., timesteps=..., sigmas=...)` sets them.

As in diffusers, the lists must be strictly descending and the timesteps in [0, num_train_timesteps); sdjax also
refuses what diffusers would silently truncate or clamp (fractional timesteps for the integer-timestep samplers,
negative timesteps or sigmas) and checks these rules for every class, where diffusers checks them for some.
"""
from __future__ import annotations

import numpy as np

from sdjax import schedules
from sdjax.schedules import Schedule


def _check_descending(values: np.ndarray, what: str, sampler: str) -> None:
  if len(values) and not np.all(np.isfinite(values)):
    raise ValueError(f"{sampler}: custom {what} must be finite, got {values.tolist()}")
  if np.any(np.diff(values) >= 0):
    raise ValueError(f"{sampler}: custom {what} must be in strictly descending order, got {values.tolist()}")


def custom_timesteps(schedule: Schedule, num_steps: int, sampler: str, integer: bool) -> np.ndarray:
  """The schedule's custom timesteps (float64), checked: num_steps of them, descending, in [0, T), and integers
  where the sampler's diffusers class casts them to int64 (`integer`)."""
  t = np.asarray(schedule.custom_timesteps, np.float64)
  T = schedule.num_train_timesteps
  if len(t) != num_steps:
    raise ValueError(f"{sampler}: num_steps={num_steps} differs from the {len(t)} custom timesteps")
  _check_descending(t, "timesteps", sampler)
  if t[0] >= T or t[-1] < 0:
    raise ValueError(f"{sampler}: custom timesteps must lie in [0, {T}) (num_train_timesteps), got {t.tolist()}")
  if integer and np.any(t != np.round(t)):
    raise ValueError(f"{sampler}: custom timesteps must be integers (diffusers truncates them), got {t.tolist()}")
  for field in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas"):
    if getattr(schedule, field):
      raise ValueError(f"{sampler}: custom timesteps cannot be used with {field}=True")
  return t


def custom_sigma_tables(schedule: Schedule, num_steps: int, sampler: str) -> dict[str, np.ndarray]:
  """(timesteps float32 [n], sigmas float32 [n + 1]) of diffusers' EulerDiscreteScheduler.set_timesteps(sigmas=...):
  the sigmas as given (the last one included, whatever final_sigmas_type), the timesteps their fractional training
  timesteps (log-sigma interpolation); the sigma spacing options (use_karras_sigmas, ...) do not enter."""
  sigmas = np.asarray(schedule.custom_sigmas, np.float64)
  if len(sigmas) != num_steps + 1:
    raise ValueError(f"{sampler}: num_steps={num_steps} does not match {len(sigmas)} custom sigmas "
                     f"(num_steps + 1: the last is the final sigma)")
  _check_descending(sigmas, "sigmas", sampler)
  if sigmas[-1] < 0:
    raise ValueError(f"{sampler}: custom sigmas must be >= 0, got {sigmas.tolist()}")
  sigmas = sigmas.astype(np.float32)
  log_sigmas = np.log(schedules.train_sigmas(schedule))
  timesteps = np.array([schedules._sigma_to_t(s, log_sigmas) for s in sigmas[:-1]])
  return {"timesteps": timesteps.astype(np.float32), "sigmas": sigmas}


def custom_interp_sigmas(schedule: Schedule, timesteps: np.ndarray, last: float = 0.0) -> np.ndarray:
  """Sigmas float32 [n + 1] at custom timesteps: the training sigmas linearly interpolated, then `last`."""
  timesteps = np.asarray(timesteps, np.float32)  # (diffusers' dtype for fractional timesteps; integers are exact)
  sigmas = np.interp(timesteps, np.arange(schedule.num_train_timesteps), schedules.train_sigmas(schedule))
  return np.concatenate([sigmas, [last]]).astype(np.float32)
