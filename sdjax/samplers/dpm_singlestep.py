"""Singlestep DPM-Solver++ (Lu et al. 2022, "DPM-Solver++", Algorithm 1 / appendix; DPM-Solver, Algorithms 1-2),
as diffusers' DPMSolverSinglestepScheduler(algorithm_type="dpmsolver++", solver_type="midpoint",
final_sigmas_type="zero"): dpmpp_2s (solver_order=2) and dpmpp_3s (solver_order=3).

The timesteps are grouped into solver steps of 1, 2 or 3 (diffusers' `get_order_list`, with `lower_order_final`,
which set_timesteps always turns on for a zero final sigma): a group of order k starts at x_s (the "anchor"),
evaluates the model there and at the k - 1 intermediate points that the group's lower-order updates reach, and
its last update goes from the anchor to the group's end with all k x0 predictions (second order: Lu et al.'s
DPM-Solver-2 in data prediction; third: DPM-Solver-3's final update in its midpoint form). One model evaluation
per timestep, `num_steps` in all. The timesteps are round(linspace(0, T - 1, n + 1)) reversed, less the last
(or Karras sigmas with `use_karras_sigmas`); the schedule's `timestep_spacing` and `steps_offset` do not enter,
as in diffusers' class, which has neither.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import samplers, schedules
from sdjax.samplers import discretisation as disc
from sdjax.samplers.denoiser import predict
from sdjax.samplers.dpmpp import alpha_sigma_lambda
from sdjax.schedules import Schedule


def order_list(num_steps: int, solver_order: int) -> list[int]:
  """The solver order of each timestep (diffusers' `get_order_list` with lower_order_final, last step first order)."""
  n = num_steps
  if solver_order == 3:
    orders = [1, 2, 3] * (n // 3 - 1) + [1, 2, 1] if n % 3 == 0 else [1, 2, 3] * (n // 3) + [1, 2][:n % 3]
  else:
    orders = [1, 2] * (n // 2 - 1) + [1, 1] if n % 2 == 0 else [1, 2] * (n // 2) + [1]
  orders[-1] = 1
  return orders


def singlestep_tables(schedule: Schedule, num_steps: int, solver_order: int) -> dict[str, np.ndarray]:
  T = schedule.num_train_timesteps
  disc.check_num_steps(schedule, num_steps)
  timesteps = disc.multistep_timesteps(schedule, num_steps, spacing="linspace")
  train_sigmas = schedules.train_sigmas(schedule)
  if schedule.use_karras_sigmas:
    sigmas = disc.karras(train_sigmas[0], train_sigmas[-1], num_steps)
    timesteps = disc.sigmas_to_t(sigmas, np.log(train_sigmas)).round().astype(np.int64)
  else:
    sigmas = np.interp(timesteps, np.arange(T), train_sigmas)
  return {"timesteps": timesteps.astype(np.float32), "sigmas": np.concatenate([sigmas, [0.0]]).astype(np.float32),
          "order": np.array(order_list(num_steps, solver_order), np.int32)}


def _init(schedule, noise, tables):
  zeros = jnp.zeros_like(noise)
  return {"x": noise, "anchor": zeros, "x0_1": zeros, "x0_2": zeros}


def singlestep_step(schedule, model_fn, carry, i, z, tables, options):
  """Evaluate the model at x (timestep i), then update from the group's anchor to sigma_{i+1} at this order."""
  x = carry["x"]
  sig = lambda j: samplers.at(tables, "sigmas", jnp.maximum(j, 0))
  alpha_0, sigma_0, lam_0 = alpha_sigma_lambda(sig(i))
  alpha_t, sigma_t, lam_t = alpha_sigma_lambda(sig(i + 1))
  x0, _ = predict(schedule.prediction_type, model_fn(x, samplers.at(tables, "timesteps", i)), x, alpha_0, sigma_0)
  # Fewer earlier predictions than the order needs (img2img starting inside a group): lower the order, as diffusers.
  order = jnp.minimum(samplers.at(tables, "order", i), i + 1)
  anchor = jnp.where(order == 1, x, carry["anchor"])

  def first(_):  # DPM-Solver++(1) (= DDIM) from x at sigma_i
    return (sigma_t / sigma_0) * x - alpha_t * jnp.expm1(lam_0 - lam_t) * x0

  def second(_):  # anchor at sigma_{i-1}; midpoint x0 at sigma_i (Lu et al., DPM-Solver++(2S))
    _, sigma_1, lam_1 = alpha_sigma_lambda(sig(i - 1))
    h = lam_t - lam_1
    d1 = (x0 - carry["x0_1"]) * (h / (lam_0 - lam_1))
    return (sigma_t / sigma_1) * anchor - alpha_t * jnp.expm1(-h) * (carry["x0_1"] + 0.5 * d1)

  def third(_):  # anchor at sigma_{i-2}; x0 at sigma_{i-2} and sigma_i (DPM-Solver-3's last update, midpoint form)
    _, sigma_2, lam_2 = alpha_sigma_lambda(sig(i - 2))
    h = lam_t - lam_2
    d1 = (x0 - carry["x0_2"]) * (h / (lam_0 - lam_2))
    phi = jnp.expm1(-h)
    return (sigma_t / sigma_2) * anchor - alpha_t * phi * carry["x0_2"] + alpha_t * (phi / h + 1.0) * d1

  x_next = jax.lax.switch(order - 1, (first, second, third), None)
  return {"x": x_next, "anchor": anchor, "x0_1": x0, "x0_2": carry["x0_1"]}


# (lower_order_final: diffusers forces it on with a zero final sigma, so False is inert here)
for _order in (2, 3):
  samplers.register(f"dpmpp_{_order}s", samplers.Sampler(
      functools.partial(singlestep_tables, solver_order=_order), _init, singlestep_step, samplers.noised_vp_sigma,
      schedule_options=("use_karras_sigmas", "lower_order_final")))
