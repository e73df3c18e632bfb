"""Step discretisations by name, independent of the schedule's `timestep_spacing`: each maps
(schedule, num_steps) to (timesteps float32 [n], sigmas float32 [n + 1], the last 0), the timesteps being
the fractional training timesteps of the sigmas (log-sigma interpolation, as `schedules._sigma_to_t`).

- "ays" / "ays_xl": Align Your Steps (Sabour et al. 2024), the published 10-step sigmas optimised for
  Stable Diffusion 1.5 / SDXL, log-linearly interpolated (in the step index) to other step counts, as
  NVIDIA's how-to and ComfyUI's AlignYourStepsScheduler do; the final sigma_min becomes 0.
- "karras": Karras et al. (2022) eq. 5, rho = 7, over the schedule's whole training sigma range.

Each is registered with euler, dpmpp_2m, ipndm and ipndm_v as "<sampler>_<steps>" (karras: the ipndm
pair only; euler/dpmpp_2m take Karras sigmas through the schedule's `use_karras_sigmas`). They start from
standard-normal noise in the model's (VP) parameterisation, i.e. sigma-space x = noise sqrt(sigma_0^2 + 1),
whatever the spacing.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from sdjax import samplers, schedules
from sdjax.samplers import dpmpp, euler, ipndm
from sdjax.schedules import Schedule

# The 10-step AYS sigmas: diffusers' `AysSchedules` (schedulers/scheduling_utils.py, diffusers >= 0.28,
# "StableDiffusionSigmas" / "StableDiffusionXLSigmas"), whose last entry diffusers stores as 0; that final
# sigma_min, 0.029 (SD's training sigma at t = 0), is the 11th published value (NVIDIA's AYS how-to page,
# ComfyUI's nodes_align_your_steps.py) and only matters for the interpolation to other step counts.
# The how-to page's values (10 digits, as ComfyUI copies them) are not these rounded: they differ by up to
# 0.3% (SD 1.5) and 1.4% (SDXL's 10th, 0.1114 vs 0.113). diffusers' 3-decimal lists are used as given.
AYS_SIGMAS = {
    "ays": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "ays_xl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
}


def loglinear_interp(sigmas: np.ndarray, num: int) -> np.ndarray:
  """`num` values interpolating decreasing `sigmas` linearly in log sigma, uniformly in the index."""
  xs = np.linspace(0, 1, len(sigmas))
  return np.exp(np.interp(np.linspace(0, 1, num), xs, np.log(sigmas[::-1])))[::-1].copy()


def sigmas_to_timesteps(schedule: Schedule, sigmas: np.ndarray) -> np.ndarray:
  """Fractional training timesteps (float32) of `sigmas` (log-sigma interpolation of the training sigmas)."""
  log_sigmas = np.log(schedules.train_sigmas(schedule))
  return np.array([schedules._sigma_to_t(s, log_sigmas) for s in sigmas], np.float32)


def _check(schedule: Schedule, num_steps: int) -> None:
  T = schedule.num_train_timesteps
  if not 1 <= num_steps <= T:
    raise ValueError(f"num_steps must be in [1, {T}], got {num_steps}")


def _finish(schedule: Schedule, sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(timesteps of sigmas[:-1], sigmas with the last replaced by 0), float32."""
  sigmas = np.concatenate([sigmas[:-1], [0.0]])
  return sigmas_to_timesteps(schedule, sigmas[:-1]), sigmas.astype(np.float32)


def ays(schedule: Schedule, num_steps: int, model: str = "ays") -> tuple[np.ndarray, np.ndarray]:
  """Align Your Steps sigmas for `model` ("ays": SD 1.5, "ays_xl": SDXL) at `num_steps` steps."""
  _check(schedule, num_steps)
  table = np.array(AYS_SIGMAS[model], np.float64)
  train = schedules.train_sigmas(schedule)
  if table[0] > 1.001 * train.max() or table[-1] < train.min() / 1.01:
    raise ValueError(f"steps {model!r} (Align Your Steps) needs training sigmas spanning [{table[-1]}, {table[0]}] "
                     f"(SD's scaled_linear betas); this schedule's span [{train.min():.4g}, {train.max():.4g}]")
  sigmas = table if num_steps + 1 == len(table) else loglinear_interp(table, num_steps + 1)
  return _finish(schedule, sigmas)


def karras(schedule: Schedule, num_steps: int, rho: float = 7.0) -> tuple[np.ndarray, np.ndarray]:
  """Karras et al. (2022) eq. 5 from the largest to the smallest training sigma, then 0."""
  _check(schedule, num_steps)
  train = schedules.train_sigmas(schedule)
  lo, hi = float(train.min()) ** (1 / rho), float(train.max()) ** (1 / rho)
  sigmas = (hi + np.linspace(0, 1, num_steps) * (lo - hi)) ** rho
  return _finish(schedule, np.concatenate([sigmas, [0.0]]))


STEPS: dict[str, Callable[[Schedule, int], tuple[np.ndarray, np.ndarray]]] = {
    "ays": lambda s, n: ays(s, n, "ays"), "ays_xl": lambda s, n: ays(s, n, "ays_xl"), "karras": karras,
}


def step_schedule(name: str, schedule: Schedule, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """(timesteps float32 [n], sigmas float32 [n + 1] ending in 0) of step discretisation `name`."""
  if name not in STEPS:
    raise ValueError(f"unknown steps {name!r}; available: {sorted(STEPS)}")
  return STEPS[name](schedule, num_steps)


def tables_of(name: str) -> Callable[[Schedule, int], dict[str, np.ndarray]]:
  def tables(schedule: Schedule, num_steps: int) -> dict[str, np.ndarray]:
    timesteps, sigmas = step_schedule(name, schedule, num_steps)
    return {"timesteps": timesteps, "sigmas": sigmas}
  return tables


def init_vp_noise(schedule: Schedule, noise, tables):
  """Standard-normal noise in the VP parameterisation, as sigma-space x: noise sqrt(sigma_0^2 + 1)."""
  return {"x": noise * np.float32((float(tables["sigmas"][0]) ** 2 + 1) ** 0.5)}


def init_vp_noise_ipndm(schedule: Schedule, noise, tables):
  return {**ipndm.init(schedule, noise, tables), **init_vp_noise(schedule, noise, tables)}


for _steps in STEPS:
  _tables = tables_of(_steps)
  if _steps != "karras":
    samplers.register(f"euler_{_steps}", samplers.Sampler(_tables, init_vp_noise, euler.euler_step,
                                                          samplers.noised_sigma))
    samplers.register(f"dpmpp_2m_{_steps}", samplers.Sampler(_tables, dpmpp._init, dpmpp.dpmpp_2m_step,
                                                             samplers.noised_vp_sigma))
  ipndm.register_ipndm(f"ipndm_{_steps}", _tables, variable=False, init_fn=init_vp_noise_ipndm)
  ipndm.register_ipndm(f"ipndm_v_{_steps}", _tables, variable=True, init_fn=init_vp_noise_ipndm)
