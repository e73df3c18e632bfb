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

import jax.numpy as jnp
import numpy as np

from sdjax import samplers, schedules
from sdjax.samplers import discretisation as disc
from sdjax.samplers.denoiser import predict
from sdjax.schedules import Schedule

beta_ppf = disc.beta_ppf  # (kept here for users: the Beta inverse CDF of use_beta_sigmas)
DPM_OPTIONS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "thresholding",
               "final_sigmas_type", "lower_order_final", "euler_at_final", "custom_timesteps")


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


def dpm_tables(schedule: Schedule, num_steps: int, *, unipc: bool = False) -> dict[str, np.ndarray]:
  """Integer timesteps and sigmas [n + 1] of diffusers' multistep DPM-Solver (with `unipc`, of
  UniPCMultistepScheduler, which differs only in rounding Karras timesteps for squaredcos_cap_v2 too:
  DPMSolverMultistepScheduler leaves them fractional there, and its int64 cast truncates them; likewise its
  Lu-lambda timesteps, and always its exponential and beta ones). The last sigma is 0, or the smallest training
  sigma with final_sigmas_type="sigma_min"."""
  T = schedule.num_train_timesteps
  disc.check_num_steps(schedule, num_steps)
  if unipc:
    for field in ("use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas", "thresholding"):
      if getattr(schedule, field):
        raise ValueError(f"unipc: {field}=True is not supported by sdjax")
    if schedule.final_sigmas_type != "zero":
      raise ValueError(f"unipc: final_sigmas_type={schedule.final_sigmas_type!r} is not supported by sdjax")
  if schedule.custom_timesteps and not unipc:  # set_timesteps(timesteps=...): the training sigmas there
    timesteps = disc.custom_timesteps(schedule, num_steps, "dpmpp", integer=True).astype(np.int64)
    last = schedules.train_sigmas(schedule)[0] if schedule.final_sigmas_type == "sigma_min" else 0.0
    return {"timesteps": timesteps.astype(np.float32),
            "sigmas": disc.custom_interp_sigmas(schedule, timesteps, last)}
  timesteps = disc.multistep_timesteps(schedule, num_steps)
  train_sigmas = schedules.train_sigmas(schedule)
  log_sigmas = np.log(train_sigmas)  # float32, as diffusers
  lo, hi = float(train_sigmas[0]), float(train_sigmas[-1])
  round_t = unipc or schedule.beta_schedule != "squaredcos_cap_v2"
  spacings = {"use_karras_sigmas": lambda: disc.karras(lo, hi, num_steps),
              "use_lu_lambdas": lambda: disc.lu_lambdas(log_sigmas[0], log_sigmas[-1], num_steps),
              "use_exponential_sigmas": lambda: disc.exponential(lo, hi, num_steps),
              "use_beta_sigmas": lambda: disc.beta_sigmas(lo, hi, num_steps)}
  spacing = next((option for option in spacings if getattr(schedule, option)), None)
  if spacing is None:
    sigmas = np.interp(timesteps, np.arange(T), train_sigmas)
  else:  # the spaced sigmas' timesteps; Karras and Lu-lambda ones rounded (but see round_t above)
    sigmas = spacings[spacing]()
    timesteps = disc.sigmas_to_t(sigmas, log_sigmas)
    if round_t and spacing in ("use_karras_sigmas", "use_lu_lambdas"):
      timesteps = timesteps.round()
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
  x0, _ = predict(schedule.prediction_type, out, x, alpha_s, sigma_s)
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
                                       stochastic=sde, schedule_options=DPM_OPTIONS))


def _multistep_step(schedule, model_fn, carry, i, z, tables, options, *, sde: bool, solver_order: int):
  return _step(schedule, model_fn, carry, i, z, tables, sde=sde, solver_order=solver_order)


for _order in (1, 2, 3):
  _register(_order)
