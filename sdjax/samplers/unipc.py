"""UniPC (Zhao et al. 2023): UniP predictor + UniC corrector, order 2, B(h) = e^h - 1 ("bh2"), data
prediction, as diffusers' UniPCMultistepScheduler defaults (lower_order_final, no disabled correctors).

Each step k: the model's x0 prediction m_k at x_k first corrects x_k (UniC, using m_{k-1}, m_{k-2} and
m_k; not at k = 0), then UniP predicts x_{k+1} from m_k, m_{k-1}. Orders warm up (1 on the first step)
and drop to 1 on the last step. One model evaluation per step.
"""
from __future__ import annotations

import jax.numpy as jnp

from sdjax import samplers
from sdjax.samplers.dpmpp import alpha_sigma_lambda as _lam
from sdjax.samplers.dpmpp import data_prediction, dpm_tables


def _init(schedule, noise, tables):
  zeros = jnp.zeros_like(noise)
  return {"x": noise, "last_x": zeros, "m1": zeros, "m2": zeros}


def _b(h):
  """(h phi_1, B(h), b_1, b_2) with hh = -h (data prediction): the coefficients of Zhao et al. eq. (9)."""
  hh = -h
  h_phi_1 = jnp.expm1(hh)
  b_h = jnp.expm1(hh)
  h_phi_k = h_phi_1 / hh - 1
  b1 = h_phi_k / b_h
  h_phi_k = h_phi_k / hh - 1 / 2
  b2 = h_phi_k * 2 / b_h
  return h_phi_1, b_h, b1, b2


def unipc_step(schedule, model_fn, carry, i, z, tables, options):
  x, last_x, m1, m2 = carry["x"], carry["last_x"], carry["m1"], carry["m2"]
  sig = lambda k: samplers.at(tables, "sigmas", jnp.maximum(k, 0))
  alpha_k, sigma_k, lam_k = _lam(sig(i))
  out = model_fn(x, samplers.at(tables, "timesteps", i))
  m = data_prediction(schedule.prediction_type, out, x, alpha_k, sigma_k)

  # UniC: correct x_k (the predictor's output) with the new model output m; base point k - 1.
  _, sigma_p, lam_p = _lam(sig(i - 1))
  _, _, lam_pp = _lam(sig(i - 2))
  h = lam_k - lam_p
  h_phi_1, b_h, b1, b2 = _b(h)
  base = sigma_k / sigma_p * last_x - alpha_k * h_phi_1 * m1
  x_c1 = base - alpha_k * b_h * (0.5 * (m - m1))
  rk = (lam_pp - lam_p) / h
  # rhos_c solves [[1, 1], [rk, 1]] rho = [b1, b2].
  rho0 = (b1 - b2) / (1 - rk)
  rho1 = b1 - rho0
  x_c2 = base - alpha_k * b_h * (rho0 * (m2 - m1) / rk + rho1 * (m - m1))
  n = tables["timesteps"].shape[0]
  order = lambda k: jnp.minimum(jnp.minimum(2, n - k), k + 1)  # warm-up, and lower order on the last step
  order_c = jnp.where(i == 0, 0, order(i - 1))  # the corrector reuses the previous step's order
  x = jnp.where(order_c == 0, x, jnp.where(order_c == 1, x_c1, x_c2))

  # UniP: predict x_{k+1} from m (and m1), rhos_p = 0.5 for order 2.
  alpha_n, sigma_n, lam_n = _lam(samplers.at(tables, "sigmas", i + 1))
  h = lam_n - lam_k
  h_phi_1, b_h, _, _ = _b(h)
  x_p1 = sigma_n / sigma_k * x - alpha_n * h_phi_1 * m
  rk = (lam_p - lam_k) / h
  x_p2 = x_p1 - alpha_n * b_h * 0.5 * (m1 - m) / rk
  x_next = jnp.where(order(i) == 1, x_p1, x_p2)
  return {"x": x_next, "last_x": x, "m1": m, "m2": m1}


def unipc_tables(schedule, num_steps):
  return dpm_tables(schedule, num_steps, unipc=True)


samplers.register("unipc", samplers.Sampler(unipc_tables, _init, unipc_step, samplers.noised_vp_sigma))
