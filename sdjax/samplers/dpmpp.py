"""Multistep DPM-Solver++ (Lu et al. 2022, "DPM-Solver++", Algorithm 2 and its third-order form; SDE-DPM-Solver++,
appendix), as diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++" / "sde-dpmsolver++",
solver_type="midpoint"): dpmpp_1m / dpmpp_2m / dpmpp_3m (solver_order 1, 2, 3) and their "_sde" forms.

Each step evaluates the model once and updates with the current and up to two previous x0 predictions, at the order
of the step's entry in the "order" table (diffusers' warm-up, `lower_order_final`, `euler_at_final` and
`final_sigmas_type` rules). The schedule carries the table options: `use_karras_sigmas`, `use_lu_lambdas` (uniform
in lambda, Lu et al. 2022), `use_exponential_sigmas`, `use_beta_sigmas` (Beta(0.6, 0.6) quantiles, Lee et al. 2024),
`final_sigmas_type` ("zero" or "sigma_min"), and dynamic thresholding of the x0 predictions (Saharia et al. 2022).
"""
from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np

from sdjax import samplers, schedules
from sdjax.samplers import custom_steps
from sdjax.schedules import Schedule

BETA_SIGMAS_AB = (0.6, 0.6)  # diffusers' _convert_to_beta defaults


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


def order_table(schedule: Schedule, num_steps: int, solver_order: int) -> np.ndarray:
  """Each step's solver order before the warm-up (diffusers' `step`: first order at the last step with
  `euler_at_final`, a zero final sigma, or `lower_order_final` under 15 steps; at most second order at the one
  before with `lower_order_final` under 15 steps). The step applies min(order, steps done + 1)."""
  n = num_steps
  order = np.full(n, solver_order, np.int32)
  if schedule.lower_order_final and n < 15 and n >= 2:
    order[-2] = min(solver_order, 2)
  if schedule.euler_at_final or (schedule.lower_order_final and n < 15) or schedule.final_sigmas_type == "zero":
    order[-1] = 1
  return order


def multistep_timesteps(schedule: Schedule, num_steps: int) -> np.ndarray:
  """Integer timesteps (descending) of diffusers' multistep solvers (DPM-Solver, UniPC, DEIS) for the spacing:
  linspace/leading take n + 1 points and drop the last; trailing as DDIM's."""
  T = schedule.num_train_timesteps
  if schedule.timestep_spacing == "linspace":
    return np.linspace(0, T - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
  if schedule.timestep_spacing == "leading":
    ratio = T // (num_steps + 1)
    return (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + schedule.steps_offset
  return np.arange(T, 0, -T / num_steps).round().astype(np.int64) - 1


def dpm_tables(schedule: Schedule, num_steps: int, *, unipc: bool = False) -> dict[str, np.ndarray]:
  """Integer timesteps and sigmas [n + 1] of diffusers' multistep DPM-Solver (with `unipc`, of
  UniPCMultistepScheduler, which differs only in rounding Karras timesteps for squaredcos_cap_v2 too:
  DPMSolverMultistepScheduler leaves them fractional there, and its int64 cast truncates them; likewise its
  Lu-lambda timesteps, and always its exponential and beta ones). The last sigma is 0, or the smallest training
  sigma with final_sigmas_type="sigma_min"."""
  T = schedule.num_train_timesteps
  if not 1 <= num_steps <= T:
    raise ValueError(f"num_steps must be in [1, {T}], got {num_steps}")
  if unipc:
    for field in ("use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas", "thresholding"):
      if getattr(schedule, field):
        raise ValueError(f"unipc: {field}=True is not supported by sdjax")
    if schedule.final_sigmas_type != "zero":
      raise ValueError(f"unipc: final_sigmas_type={schedule.final_sigmas_type!r} is not supported by sdjax")
  if schedule.custom_timesteps and not unipc:  # set_timesteps(timesteps=...): the training sigmas there
    timesteps = custom_steps.custom_timesteps(schedule, num_steps, "dpmpp", integer=True).astype(np.int64)
    last = schedules.train_sigmas(schedule)[0] if schedule.final_sigmas_type == "sigma_min" else 0.0
    return {"timesteps": timesteps.astype(np.float32),
            "sigmas": custom_steps.custom_interp_sigmas(schedule, timesteps, last)}
  timesteps = multistep_timesteps(schedule, num_steps)
  train_sigmas = schedules.train_sigmas(schedule)
  log_sigmas = np.log(train_sigmas)  # float32, as diffusers
  lo, hi = float(train_sigmas[0]), float(train_sigmas[-1])
  round_t = unipc or schedule.beta_schedule != "squaredcos_cap_v2"
  to_t = lambda sigmas: np.array([schedules._sigma_to_t(s, log_sigmas) for s in sigmas])
  if schedule.use_karras_sigmas:  # Karras et al. (2022), eq. 5, rho = 7
    rho = 7.0
    sigmas = (hi ** (1 / rho) + np.linspace(0, 1, num_steps) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    timesteps = to_t(sigmas)
    timesteps = timesteps.round() if round_t else timesteps
  elif schedule.use_lu_lambdas:  # uniform in log sigma (= -lambda), Lu et al. (2022)
    lam_lo, lam_hi = float(log_sigmas[0]), float(log_sigmas[-1])
    sigmas = np.exp(lam_hi + np.linspace(0, 1, num_steps) * (lam_lo - lam_hi))
    timesteps = to_t(sigmas)
    timesteps = timesteps.round() if round_t else timesteps
  elif schedule.use_exponential_sigmas:
    sigmas = np.exp(np.linspace(math.log(hi), math.log(lo), num_steps))
    timesteps = to_t(sigmas)
  elif schedule.use_beta_sigmas:
    sigmas = lo + beta_ppf(1 - np.linspace(0, 1, num_steps), *BETA_SIGMAS_AB) * (hi - lo)
    timesteps = to_t(sigmas)
  else:
    sigmas = np.interp(timesteps, np.arange(T), train_sigmas)
  last = train_sigmas[0] if schedule.final_sigmas_type == "sigma_min" else 0.0
  sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
  return {"timesteps": timesteps.astype(np.int64).astype(np.float32), "sigmas": sigmas}


def multistep_tables(schedule: Schedule, num_steps: int, solver_order: int) -> dict[str, np.ndarray]:
  return {**dpm_tables(schedule, num_steps), "order": order_table(schedule, num_steps, solver_order)}


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


def dynamic_threshold(x0, ratio: float, max_value: float):
  """Dynamic thresholding (Saharia et al. 2022, Imagen): per sample, s = the `ratio` quantile of |x0| clamped to
  [1, max_value]; x0 clipped to [-s, s] and divided by s (diffusers' `_threshold_sample`)."""
  flat = x0.reshape(x0.shape[0], -1)
  s = jnp.clip(jnp.quantile(jnp.abs(flat), ratio, axis=1, keepdims=True), 1.0, max_value)
  return (jnp.clip(flat, -s, s) / s).reshape(x0.shape)


def _init(schedule, noise, tables):
  return {"x": noise, "prev_x0": jnp.zeros_like(noise)}


def _init3(schedule, noise, tables):
  return {**_init(schedule, noise, tables), "prev2_x0": jnp.zeros_like(noise)}


def _step(schedule, model_fn, carry, i, z, tables, sde: bool, solver_order: int = 2):
  x, prev_x0 = carry["x"], carry["prev_x0"]
  sig = lambda j: samplers.at(tables, "sigmas", jnp.maximum(j, 0))
  alpha_s, sigma_s, lam_s = alpha_sigma_lambda(sig(i))
  alpha_t, sigma_t, lam_t = alpha_sigma_lambda(sig(i + 1))
  out = model_fn(x, samplers.at(tables, "timesteps", i))
  # Data prediction x0 (the "++" variant works with x0 rather than epsilon).
  x0 = data_prediction(schedule.prediction_type, out, x, alpha_s, sigma_s)
  if schedule.thresholding:
    x0 = dynamic_threshold(x0, schedule.dynamic_thresholding_ratio, schedule.sample_max_value)
  if "order" in tables:
    order = jnp.minimum(samplers.at(tables, "order", i), i + 1)
  else:  # tables of sdjax.samplers.steps: second order, first on the first and the last step
    n = tables["timesteps"].shape[0]
    order = jnp.where((i == 0) | (i == n - 1), 1, 2)
  h = lam_t - lam_s
  if sde:  # SDE-DPM-Solver++: x decays by exp(-2h) towards x0, and fresh noise makes up the variance
    decay, phi = sigma_t / sigma_s * jnp.exp(-h), -jnp.expm1(-2.0 * h)
    noise = sigma_t * jnp.sqrt(phi) * z
  else:
    decay, phi, noise = sigma_t / sigma_s, -jnp.expm1(-h), 0.0
  # x_next = decay x + alpha_t (phi D0 + c1 D1 + c2 D2) with D0 = x0 and the divided differences D1, D2 of the
  # x0 predictions in lambda; orders 1, 2 (midpoint: c1 = phi / 2), 3 select the coefficients, and the unused
  # ratios are set to 1 so that an infinite h (the last step to sigma 0) or a missing history stays finite.
  two, three = order >= 2, order >= 3
  _, _, lam_1 = alpha_sigma_lambda(sig(i - 1))
  r0 = jnp.where(two, (lam_s - lam_1) / h, 1.0)
  d1 = (x0 - prev_x0) / r0
  c1 = jnp.where(two, 0.5 * phi, 0.0)
  update = phi * x0 + c1 * d1
  if solver_order == 3:  # DPM-Solver++(3M)
    _, _, lam_2 = alpha_sigma_lambda(sig(i - 2))
    h3 = jnp.where(three, h, 1.0)
    r1 = jnp.where(three, (lam_1 - lam_2) / h3, 1.0)
    d1_1 = (prev_x0 - carry["prev2_x0"]) / r1
    d1_3 = d1 + (r0 / (r0 + r1)) * (d1 - d1_1)
    d2 = (d1 - d1_1) / (r0 + r1)
    if sde:
      c1_3, c2 = phi / (-2.0 * h3) + 1.0, (phi - 2.0 * h3) / (2.0 * h3) ** 2 - 0.5
    else:
      c1_3, c2 = 1.0 - phi / h3, 0.5 - (h3 - phi) / h3**2
    update = jnp.where(three, phi * x0 + c1_3 * d1_3 + c2 * d2, update)
  x_next = decay * x + alpha_t * update + noise
  new = {"x": x_next, "prev_x0": x0}
  if solver_order == 3:
    new["prev2_x0"] = prev_x0
  return new


def dpmpp_2m_step(schedule, model_fn, carry, i, z, tables, options):
  return _step(schedule, model_fn, carry, i, z, tables, sde=False)


def dpmpp_2m_sde_step(schedule, model_fn, carry, i, z, tables, options):
  return _step(schedule, model_fn, carry, i, z, tables, sde=True)


def _register(order: int) -> None:
  """dpmpp_<order>m and dpmpp_<order>m_sde, which share one tables function (the same tables)."""
  tables = lambda schedule, num_steps: multistep_tables(schedule, num_steps, order)
  for sde in (False, True):
    step = functools.partial(_multistep_step, sde=sde, solver_order=order)
    samplers.register(f"dpmpp_{order}m" + ("_sde" if sde else ""),
                      samplers.Sampler(tables, _init3 if order == 3 else _init, step, samplers.noised_vp_sigma,
                                       stochastic=sde))


def _multistep_step(schedule, model_fn, carry, i, z, tables, options, *, sde: bool, solver_order: int):
  return _step(schedule, model_fn, carry, i, z, tables, sde=sde, solver_order=solver_order)


for _order in (1, 2, 3):
  _register(_order)
