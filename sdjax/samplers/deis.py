"""DEIS (Zhang & Chen 2022, "Fast Sampling of Diffusion Models with Exponential Integrator"): the multistep
exponential integrator in rho = sigma / alpha with the noise prediction interpolated by a polynomial in
log rho through the last k model outputs ("logrho" tAB-DEIS), as diffusers' DEISMultistepScheduler
(algorithm_type="deis", solver_type="logrho", lower_order_final=True).

Step i: x_{i+1} / alpha_{i+1} = x_i / alpha_i + sum_j c_{i,j} eps_{i-j}, where c_{i,j} is the integral over rho
from rho_i to rho_{i+1} of the j-th Lagrange basis polynomial (in log rho) on rho_i, ..., rho_{i-k+1}. The
coefficients depend on the schedule alone, so the tables hold them for every step and order. Order k is
the sampler's (1, 2 or 3: "deis_1", "deis", "deis_3"), lower on the first steps (warm-up) and, under 15
steps, on the last two (diffusers' lower_order_final). As in diffusers, the last step ends at the smallest
training sigma rather than 0 (with Karras sigmas at the last Karras sigma, so that step leaves x as it is).
One model evaluation per step; the model sees x itself (the VP sample).
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from sdjax import samplers, schedules
from sdjax.samplers import discretisation as disc
from sdjax.samplers.denoiser import eps_from_x0, predict
from sdjax.schedules import Schedule

ORDERS = (1, 2, 3)


def deis_sigmas(schedule: Schedule, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """(integer timesteps [n], sigmas float32 [n + 1]) of diffusers' DEISMultistepScheduler: DPM-Solver's spacing
  (n + 1 points, the last dropped, for linspace/leading); the final sigma is the training sigma at t = 0, or
  with `use_karras_sigmas` (Karras et al. 2022, eq. 5, rho = 7, timesteps rounded) the last Karras sigma again."""
  T = schedule.num_train_timesteps
  disc.check_num_steps(schedule, num_steps)
  timesteps = disc.multistep_timesteps(schedule, num_steps)
  train_sigmas = schedules.train_sigmas(schedule)
  if schedule.use_karras_sigmas:
    sigmas = disc.karras(train_sigmas[0], train_sigmas[-1], num_steps)
    timesteps = disc.sigmas_to_t(sigmas, np.log(train_sigmas)).round().astype(np.int64)
    sigmas = np.concatenate([sigmas, sigmas[-1:]])
  else:
    sigmas = np.concatenate([np.interp(timesteps, np.arange(T), train_sigmas), train_sigmas[:1]])
  return timesteps, sigmas.astype(np.float32)


def _lagrange_integral(nodes: np.ndarray, j: int, rho_from: float, rho_to: float) -> float:
  """The integral over rho in [rho_from, rho_to] of the Lagrange basis polynomial l_j(log rho) on `nodes` (log
  rho values): with u = log rho, the integral of l_j(u) e^u du, whose antiderivative is e^u sum_m (-1)^m l_j^(m)(u)."""
  p = np.polynomial.Polynomial([1.0])
  for m, root in enumerate(nodes):
    if m != j:
      p = p * np.polynomial.Polynomial([-root, 1.0]) / (nodes[j] - root)

  def antiderivative(u):
    total, q, sign = 0.0, p, 1.0
    for _ in range(len(nodes)):
      total, q, sign = total + sign * q(u), q.deriv(), -sign
    return np.exp(u) * total

  return float(antiderivative(np.log(rho_to)) - antiderivative(np.log(rho_from)))


def deis_tables(schedule: Schedule, num_steps: int, order: int = 2) -> dict[str, np.ndarray]:
  """timesteps, sigmas [n + 1], each step's highest order "order" [n] (lower_order_final applied; the warm-up
  is applied in the step, counting from the first step run, as diffusers counts from its begin index) and
  "coef" [n, 3, 3]: coef[i, k - 1, :k] are step i's order-k coefficients (float64 maths, float32 table)."""
  if order not in ORDERS:
    raise ValueError(f"DEIS solver order must be one of {ORDERS}, got {order}")
  timesteps, sigmas = deis_sigmas(schedule, num_steps)
  rho = sigmas.astype(np.float64)  # sigma / alpha of the VP sample is the VE sigma
  n = num_steps
  coef = np.zeros((n, 3, 3))
  for i in range(n):
    for k in range(1, min(order, i + 1) + 1):
      nodes = np.log(rho[i - k + 1:i + 1][::-1])  # rho_i, rho_{i-1}, ...
      if len(set(nodes)) < k:
        raise ValueError(f"num_steps={num_steps} repeats timesteps with timestep_spacing="
                         f"{schedule.timestep_spacing!r}; DEIS of order {order} needs distinct ones")
      coef[i, k - 1, :k] = [_lagrange_integral(nodes, j, rho[i], rho[i + 1]) for j in range(k)]
  orders = np.full(n, order, np.int32)
  if n < 15:  # diffusers' lower_order_final: first order on the last step, at most second on the one before
    orders[-2:] = np.minimum(orders[-2:], [2, 1][-min(n, 2):])
  return {"timesteps": timesteps.astype(np.float32), "sigmas": sigmas, "order": orders,
          "coef": coef.astype(np.float32)}


def _init(schedule, noise, tables):
  zeros = jnp.zeros_like(noise)
  return {"x": noise, "eps_1": zeros, "eps_2": zeros}


def deis_step(schedule, model_fn, carry, i, z, tables, options):
  x, eps_1, eps_2 = carry["x"], carry["eps_1"], carry["eps_2"]
  sig, sig_next = samplers.at(tables, "sigmas", i), samplers.at(tables, "sigmas", i + 1)
  alpha = 1.0 / jnp.sqrt(sig**2 + 1)
  alpha_next = 1.0 / jnp.sqrt(sig_next**2 + 1)
  out = model_fn(x, samplers.at(tables, "timesteps", i))
  # diffusers goes through the data prediction (where thresholding would apply) back to the noise.
  x0, _ = predict(schedule.prediction_type, out, x, alpha, sig * alpha)
  eps = eps_from_x0(x, x0, alpha, sig * alpha)
  order = jnp.minimum(samplers.at(tables, "order", i), i + 1)  # warm-up: the first steps have no history
  c = jnp.asarray(tables["coef"])[i, order - 1]
  x_next = alpha_next * (x / alpha + c[0] * eps + c[1] * eps_1 + c[2] * eps_2)
  return {"x": x_next, "eps_1": eps, "eps_2": eps_1}


for _order, _name in zip(ORDERS, ("deis_1", "deis", "deis_3")):
  samplers.register(_name, samplers.Sampler(functools.partial(deis_tables, order=_order), _init, deis_step,
                                            samplers.noised_vp_sigma, schedule_options=("use_karras_sigmas",)))
