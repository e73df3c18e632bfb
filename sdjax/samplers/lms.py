"""Linear multistep (order 4), as diffusers' LMSDiscreteScheduler / k-diffusion's `sample_lms`:
x_next = x + sum_k c_k d_{i-k}, with c_k the integral over [sigma_i, sigma_{i+1}] of the Lagrange
basis polynomial through the last (up to 4) sigmas. Coefficients are exact and precomputed."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sdjax import samplers
from sdjax.samplers.denoiser import denoiser
from sdjax.samplers.euler import SCHEDULE_OPTIONS, init_sigma_scaled, sigma_tables

ORDER = 4


def lms_coefficients(sigmas: np.ndarray, order: int = ORDER) -> np.ndarray:
  """[n, order] coefficients; column k multiplies the derivative from k steps back (0 = current)."""
  s = sigmas.astype(np.float64)
  n = len(sigmas) - 1
  if np.any(np.diff(s[:-1]) == 0):
    raise ValueError("lms: the schedule repeats a sigma (too many steps for this timestep spacing)")
  coeffs = np.zeros((n, order))
  for i in range(n):
    m = min(i + 1, order)
    for k in range(m):
      basis = np.polynomial.Polynomial([1.0])
      for j in range(m):
        if j != k:
          basis *= np.polynomial.Polynomial([-s[i - j], 1.0]) / (s[i - k] - s[i - j])
      integral = basis.integ()
      coeffs[i, k] = integral(s[i + 1]) - integral(s[i])
  return coeffs


def _tables(schedule, num_steps):
  t = sigma_tables(schedule, num_steps)
  t["lms"] = lms_coefficients(t["sigmas"]).astype(np.float32)
  return t


def _init(schedule, noise, tables):
  carry = init_sigma_scaled(schedule, noise, tables)
  carry["history"] = jnp.zeros((ORDER,) + noise.shape, noise.dtype)  # derivatives, newest first
  return carry


def lms_step(schedule, model_fn, carry, i, z, tables, options):
  x = carry["x"]
  sigma = samplers.at(tables, "sigmas", i)
  d = (x - denoiser(model_fn, schedule)(x, sigma, samplers.at(tables, "timesteps", i))) / sigma
  history = jnp.concatenate([d[None], carry["history"][:-1]], axis=0)
  c = samplers.at(tables, "lms", i).reshape((ORDER,) + (1,) * x.ndim)
  return {"x": x + jnp.sum(c * history, axis=0), "history": history}


samplers.register("lms", samplers.Sampler(_tables, _init, lms_step, samplers.noised_sigma,
                                          schedule_options=SCHEDULE_OPTIONS))
