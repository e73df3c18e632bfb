"""Step discretisations: which noise levels a sampler visits, and at which training timesteps the model sees them.

Everything here is host-side numpy that builds the samplers' static tables, bit for bit along diffusers 0.42's
dtype path (float64 numpy where diffusers uses numpy, float32 where it casts). The pieces:
- timestep spacings (`timestep_spacing` leading / linspace / trailing with `steps_offset`), in the three forms
  diffusers' classes use: `discrete_timesteps` (DDIM/DDPM/PNDM: n points), `euler_timesteps` (Euler/Heun/LMS/KDPM2:
  fractional float32), `multistep_timesteps` (DPM-Solver/UniPC/DEIS: n + 1 points, the last dropped);
- sigma spacings between two noise levels: `karras` (Karras et al. 2022, eq. 5), `exponential` (uniform in
  log sigma), `lu_lambdas` (uniform in lambda = -log sigma, Lu et al. 2022), `beta_sigmas` (Beta(0.6, 0.6)
  quantiles, Lee et al. 2024), and the map back to fractional training timesteps (`sigma_to_t`);
- `sigma_timesteps`: Euler's (timesteps, sigmas) from the spacing, optionally Karras;
- custom step lists as diffusers pipelines pass them (`custom_timesteps`, `custom_sigma_tables`);
- named step schedules independent of the spacing (`STEPS`, `step_schedule`: Align Your Steps, Karras).

Which of these a diffusers scheduler class combines, and how it rounds, is the sampler module's business
(e.g. `dpmpp.dpm_tables`). This module imports nothing from sdjax at run time (the schedule is read through its
attributes and `Schedule.train_sigmas()`), so that `sdjax.schedules` can keep its old names as aliases of these.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
  from sdjax.schedules import Schedule

BETA_SIGMAS_AB = (0.6, 0.6)  # diffusers' _convert_to_beta defaults
KARRAS_RHO = 7.0


def check_num_steps(schedule: Schedule, num_steps: int) -> None:
  T = schedule.num_train_timesteps
  if not 1 <= num_steps <= T:
    raise ValueError(f"num_steps must be in [1, {T}], got {num_steps}")


# --- Timestep spacings ---------------------------------------------------------------------------------------

def discrete_timesteps(schedule: Schedule, num_steps: int) -> np.ndarray:
  """Integer timesteps (descending) of `schedule.timestep_spacing`, as diffusers' DDIM/DDPM schedulers.

  leading: [(n-1)r, ..., r, 0] + steps_offset with r = T // n; trailing: round(T, T - T/n, ...) - 1;
  linspace: round(linspace(0, T - 1, n)) reversed.
  """
  check_num_steps(schedule, num_steps)
  T = schedule.num_train_timesteps
  if schedule.timestep_spacing == "leading":
    ratio = T // num_steps
    return (np.arange(num_steps) * ratio).round()[::-1].astype(np.int64) + schedule.steps_offset
  if schedule.timestep_spacing == "trailing":
    return np.round(np.arange(T, 0, -T / num_steps)).astype(np.int64) - 1
  return np.linspace(0, T - 1, num_steps).round()[::-1].astype(np.int64)


def euler_timesteps(schedule: Schedule, num_steps: int) -> np.ndarray:
  """Timesteps float32 [n] (descending, fractional for linspace) of diffusers' EulerDiscreteScheduler's spacing."""
  check_num_steps(schedule, num_steps)
  T = schedule.num_train_timesteps
  if schedule.timestep_spacing == "linspace":
    return np.linspace(0, T - 1, num_steps, dtype=np.float32)[::-1].copy()
  if schedule.timestep_spacing == "leading":
    ratio = T // num_steps
    return (np.arange(0, num_steps) * ratio).round()[::-1].astype(np.float32) + schedule.steps_offset
  return np.arange(T, 0, -T / num_steps).round().astype(np.float32) - 1


def multistep_timesteps(schedule: Schedule, num_steps: int, spacing: str | None = None) -> np.ndarray:
  """Integer timesteps (descending) of diffusers' multistep solvers (DPM-Solver, UniPC, DEIS) for the spacing
  (`spacing`, else the schedule's): linspace/leading take n + 1 points and drop the last; trailing as DDIM's."""
  T = schedule.num_train_timesteps
  spacing = spacing or schedule.timestep_spacing
  if spacing == "linspace":
    return np.linspace(0, T - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
  if spacing == "leading":
    ratio = T // (num_steps + 1)
    return (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + schedule.steps_offset
  return np.arange(T, 0, -T / num_steps).round().astype(np.int64) - 1


# --- Sigma spacings (float64, descending from sigma_max to sigma_min) -----------------------------------------

def karras(sigma_min: float, sigma_max: float, num: int, rho: float = KARRAS_RHO) -> np.ndarray:
  """Karras et al. (2022), eq. 5: (sigma_max^(1/rho) + ramp (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho on a
  float64 ramp linspace(0, 1, num)."""
  lo, hi = float(sigma_min) ** (1 / rho), float(sigma_max) ** (1 / rho)
  return (hi + np.linspace(0, 1, num) * (lo - hi)) ** rho


def exponential(sigma_min: float, sigma_max: float, num: int) -> np.ndarray:
  """Uniform in log sigma (diffusers' `_convert_to_exponential`)."""
  return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num))


def lu_lambdas(log_sigma_min: float, log_sigma_max: float, num: int) -> np.ndarray:
  """Uniform in lambda = -log sigma (Lu et al. 2022; diffusers' `_convert_to_lu`, from the float32 log sigmas)."""
  lo, hi = float(log_sigma_min), float(log_sigma_max)
  return np.exp(hi + np.linspace(0, 1, num) * (lo - hi))


def beta_sigmas(sigma_min: float, sigma_max: float, num: int, ab: tuple[float, float] = BETA_SIGMAS_AB) -> np.ndarray:
  """Beta(a, b) quantiles of 1 - linspace(0, 1, num) mapped onto [sigma_min, sigma_max] (Lee et al. 2024;
  diffusers' `_convert_to_beta`)."""
  lo, hi = float(sigma_min), float(sigma_max)
  return lo + beta_ppf(1 - np.linspace(0, 1, num), *ab) * (hi - lo)


def _betainc(a: float, b: float, x: np.ndarray) -> np.ndarray:
  """The regularized incomplete beta function I_x(a, b), float64, for x in (0, 1): the continued fraction of
  Numerical Recipes' betacf (modified Lentz), on the side of (a + 1) / (a + b + 2) where it converges fast."""
  x = np.asarray(x, np.float64)
  swap = x > (a + 1) / (a + b + 2)
  a_, b_ = np.where(swap, b, a), np.where(swap, a, b)
  xs = np.where(swap, 1 - x, x)
  tiny, qab, qap, qam = 1e-300, a_ + b_, a_ + 1, a_ - 1
  guard = lambda v: np.where(np.abs(v) < tiny, tiny, v)
  c, d = np.ones_like(xs), 1 / guard(1 - qab * xs / qap)
  h = d
  for m in range(1, 300):
    m2 = 2 * m
    aa = m * (b_ - m) * xs / ((qam + m2) * (a_ + m2))
    d, c = 1 / guard(1 + aa * d), guard(1 + aa / c)
    h = h * d * c
    aa = -(a_ + m) * (qab + m) * xs / ((a_ + m2) * (qap + m2))
    d, c = 1 / guard(1 + aa * d), guard(1 + aa / c)
    h = h * d * c
    if np.all(np.abs(d * c - 1) < 4e-16):
      break
  log_front = (math.lgamma(a + b) - np.vectorize(math.lgamma)(a_) - np.vectorize(math.lgamma)(b_)
               + a_ * np.log(xs) + b_ * np.log1p(-xs))
  v = np.exp(log_front) * h / a_
  return np.where(swap, 1 - v, v)


def beta_ppf(p: np.ndarray, a: float, b: float) -> np.ndarray:
  """The Beta(a, b) inverse CDF (scipy.stats.beta.ppf) in float64: bisection on `_betainc` to the last bit;
  exactly 0 and 1 at p = 0 and 1."""
  p = np.asarray(p, np.float64)
  lo, hi = np.zeros_like(p), np.ones_like(p)
  inside = (p > 0) & (p < 1)
  for _ in range(1100):  # halving a float64 interval in [0, 1] reaches adjacent floats in < 1100 steps
    mid = 0.5 * (lo + hi)
    active = inside & (mid > lo) & (mid < hi)
    if not np.any(active):
      break
    below = _betainc(a, b, np.clip(mid, 1e-300, 1 - 2**-53)) < p
    lo, hi = np.where(active & below, mid, lo), np.where(active & ~below, mid, hi)
  x = np.where(np.abs(_betainc(a, b, np.clip(lo, 1e-300, 1 - 2**-53)) - p)
               <= np.abs(_betainc(a, b, np.clip(hi, 1e-300, 1 - 2**-53)) - p), lo, hi)
  return np.where(p <= 0, 0.0, np.where(p >= 1, 1.0, x))


# --- Sigmas <-> timesteps -----------------------------------------------------------------------------------

def sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> float:
  """The fractional timestep whose log sigma interpolates to log(sigma) (k-diffusion / diffusers); computed in
  sigma's own dtype (a float32 sigma against float32 log_sigmas, as diffusers)."""
  log_sigma = np.log(np.maximum(sigma, 1e-10))
  dists = log_sigma - log_sigmas[:, None]
  low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
  w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
  return float(((1 - w) * low + w * (low + 1)).reshape(()))


def sigmas_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
  """`sigma_to_t` of each sigma (in its own dtype), float64 [n]."""
  return np.array([sigma_to_t(s, log_sigmas) for s in sigmas])


def log_train_sigmas(schedule: Schedule) -> np.ndarray:
  """log of the training sigmas, float32 (numpy's float32 log, as diffusers)."""
  return np.log(schedule.train_sigmas())


def sigmas_to_timesteps(schedule: Schedule, sigmas: np.ndarray) -> np.ndarray:
  """Fractional training timesteps (float32) of `sigmas` (log-sigma interpolation of the training sigmas)."""
  return sigmas_to_t(sigmas, log_train_sigmas(schedule)).astype(np.float32)


def sigma_timesteps(schedule: Schedule, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """(timesteps float32 [n], sigmas float32 [n + 1]) as diffusers' EulerDiscreteScheduler builds them.

  sigma(t) = sqrt((1 - abar_t) / abar_t), linearly interpolated at the spacing's (float) timesteps; with
  `use_karras_sigmas`, Karras et al. (2022) eq. 5 (rho = 7) between the end sigmas, mapped back to
  fractional timesteps by interpolating log sigma. The last sigma is 0.
  """
  timesteps = euler_timesteps(schedule, num_steps)
  sigma_table = schedule.train_sigmas()
  sigmas = np.interp(timesteps, np.arange(schedule.num_train_timesteps), sigma_table)  # float64
  if schedule.use_karras_sigmas:
    sigmas = karras(sigmas[-1], sigmas[0], num_steps)
    timesteps = sigmas_to_t(sigmas, np.log(sigma_table))
  sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
  return timesteps.astype(np.float32), sigmas


# --- Custom step lists (diffusers' set_timesteps(timesteps=...) / (sigmas=...)) -------------------------------

def _check_descending(values: np.ndarray, what: str, sampler: str) -> None:
  if len(values) and not np.all(np.isfinite(values)):
    raise ValueError(f"{sampler}: custom {what} must be finite, got {values.tolist()}")
  if np.any(np.diff(values) >= 0):
    raise ValueError(f"{sampler}: custom {what} must be in strictly descending order, got {values.tolist()}")


def custom_timesteps(schedule: Schedule, num_steps: int, sampler: str, integer: bool) -> np.ndarray:
  """The schedule's custom timesteps (float64), checked: num_steps of them, descending, in [0, T), and integers
  where the sampler's diffusers class casts them to int64 (`integer`).

  As in diffusers, the lists must be strictly descending and the timesteps in [0, num_train_timesteps); sdjax also
  refuses what diffusers would silently truncate or clamp (fractional timesteps for the integer-timestep samplers,
  negative timesteps or sigmas) and checks these rules for every class, where diffusers checks them for some."""
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
  return {"timesteps": sigmas_to_timesteps(schedule, sigmas[:-1]), "sigmas": sigmas}


def custom_interp_sigmas(schedule: Schedule, timesteps: np.ndarray, last: float = 0.0) -> np.ndarray:
  """Sigmas float32 [n + 1] at custom timesteps: the training sigmas linearly interpolated, then `last`."""
  timesteps = np.asarray(timesteps, np.float32)  # (diffusers' dtype for fractional timesteps; integers are exact)
  sigmas = np.interp(timesteps, np.arange(schedule.num_train_timesteps), schedule.train_sigmas())
  return np.concatenate([sigmas, [last]]).astype(np.float32)


# --- Named step schedules, independent of the spacing (sdjax.samplers.steps registers samplers on them) -------

# The 10-step Align Your Steps sigmas (Sabour et al. 2024): diffusers' `AysSchedules` (schedulers/scheduling_utils.py,
# diffusers >= 0.28, "StableDiffusionSigmas" / "StableDiffusionXLSigmas"), whose last entry diffusers stores as 0;
# that final sigma_min, 0.029 (SD's training sigma at t = 0), is the 11th published value (NVIDIA's AYS how-to page,
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


def _finish(schedule: Schedule, sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(timesteps of sigmas[:-1], sigmas with the last replaced by 0), float32."""
  sigmas = np.concatenate([sigmas[:-1], [0.0]])
  return sigmas_to_timesteps(schedule, sigmas[:-1]), sigmas.astype(np.float32)


def ays(schedule: Schedule, num_steps: int, model: str = "ays") -> tuple[np.ndarray, np.ndarray]:
  """Align Your Steps sigmas for `model` ("ays": SD 1.5, "ays_xl": SDXL) at `num_steps` steps: the published
  10-step sigmas, log-linearly interpolated (in the step index) to other step counts, as NVIDIA's how-to and
  ComfyUI's AlignYourStepsScheduler do; the final sigma_min becomes 0."""
  check_num_steps(schedule, num_steps)
  table = np.array(AYS_SIGMAS[model], np.float64)
  train = schedule.train_sigmas()
  if table[0] > 1.001 * train.max() or table[-1] < train.min() / 1.01:
    raise ValueError(f"steps {model!r} (Align Your Steps) needs training sigmas spanning [{table[-1]}, {table[0]}] "
                     f"(SD's scaled_linear betas); this schedule's span [{train.min():.4g}, {train.max():.4g}]")
  sigmas = table if num_steps + 1 == len(table) else loglinear_interp(table, num_steps + 1)
  return _finish(schedule, sigmas)


def karras_steps(schedule: Schedule, num_steps: int, rho: float = KARRAS_RHO) -> tuple[np.ndarray, np.ndarray]:
  """Karras et al. (2022) eq. 5 from the largest to the smallest training sigma, then 0."""
  check_num_steps(schedule, num_steps)
  train = schedule.train_sigmas()
  sigmas = karras(train.min(), train.max(), num_steps, rho)
  return _finish(schedule, np.concatenate([sigmas, [0.0]]))


STEPS: dict[str, Callable[[Schedule, int], tuple[np.ndarray, np.ndarray]]] = {
    "ays": lambda s, n: ays(s, n, "ays"), "ays_xl": lambda s, n: ays(s, n, "ays_xl"), "karras": karras_steps,
}


def step_schedule(name: str, schedule: Schedule, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """(timesteps float32 [n], sigmas float32 [n + 1] ending in 0) of the named step schedule `name` (`STEPS`)."""
  if name not in STEPS:
    raise ValueError(f"unknown steps {name!r}; available: {sorted(STEPS)}")
  return STEPS[name](schedule, num_steps)
