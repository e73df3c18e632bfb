"""Samplers on named step schedules, independent of the schedule's `timestep_spacing`
(`sdjax.samplers.discretisation.STEPS`: each maps (schedule, num_steps) to (timesteps float32 [n], sigmas float32
[n + 1], the last 0), the timesteps being the fractional training timesteps of the sigmas):

- "ays" / "ays_xl": Align Your Steps (Sabour et al. 2024), the published 10-step sigmas optimised for
  Stable Diffusion 1.5 / SDXL, log-linearly interpolated (in the step index) to other step counts.
- "karras": Karras et al. (2022) eq. 5, rho = 7, over the schedule's whole training sigma range.

Each is registered with euler, dpmpp_2m, ipndm and ipndm_v as "<sampler>_<steps>" (karras: the ipndm
pair only; euler/dpmpp_2m take Karras sigmas through the schedule's `use_karras_sigmas`). They start from
standard-normal noise in the model's (VP) parameterisation, i.e. sigma-space x = noise sqrt(sigma_0^2 + 1),
whatever the spacing, and implement no schedule option (their steps replace the schedule's).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from sdjax import samplers
from sdjax.samplers import discretisation as disc
from sdjax.samplers import dpmpp, euler, ipndm
from sdjax.schedules import Schedule

# The step schedules live in sdjax.samplers.discretisation; these names are kept for users.
AYS_SIGMAS, STEPS, step_schedule, sigmas_to_timesteps = (disc.AYS_SIGMAS, disc.STEPS, disc.step_schedule,
                                                         disc.sigmas_to_timesteps)


def tables_of(name: str) -> Callable[[Schedule, int], dict[str, np.ndarray]]:
  def tables(schedule: Schedule, num_steps: int) -> dict[str, np.ndarray]:
    timesteps, sigmas = disc.step_schedule(name, schedule, num_steps)
    return {"timesteps": timesteps, "sigmas": sigmas}
  return tables


def init_vp_noise(schedule: Schedule, noise, tables):
  """Standard-normal noise in the VP parameterisation, as sigma-space x: noise sqrt(sigma_0^2 + 1)."""
  return {"x": noise * np.float32((float(tables["sigmas"][0]) ** 2 + 1) ** 0.5)}


def init_vp_noise_ipndm(schedule: Schedule, noise, tables):
  return {**ipndm.init(schedule, noise, tables), **init_vp_noise(schedule, noise, tables)}


for _steps in disc.STEPS:
  _tables = tables_of(_steps)
  if _steps != "karras":
    samplers.register(f"euler_{_steps}", samplers.Sampler(_tables, init_vp_noise, euler.euler_step,
                                                          samplers.noised_sigma))
    samplers.register(f"dpmpp_2m_{_steps}", samplers.Sampler(_tables, dpmpp._init, dpmpp.dpmpp_2m_step,
                                                             samplers.noised_vp_sigma))
  ipndm.register_ipndm(f"ipndm_{_steps}", _tables, variable=False, init_fn=init_vp_noise_ipndm)
  ipndm.register_ipndm(f"ipndm_v_{_steps}", _tables, variable=True, init_fn=init_vp_noise_ipndm)
