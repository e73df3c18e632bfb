"""An analytic model for testing and benchmarking samplers: the exact denoiser of a per-element
Gaussian mixture, so sampler error can be measured without a network.

For data x0 ~ sum_k w_k N(mu_k, s_k^2) and x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, the posterior
mean E[x0 | x_t] is a responsibility-weighted sum of the per-component Gaussian posterior means.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import schedules
from sdjax.schedules import Schedule

MIXTURE = {"weights": (0.3, 0.7), "means": (-0.6, 0.5), "stds": (0.15, 0.3)}


def mixture_model(schedule: Schedule, weights: Sequence[float] = MIXTURE["weights"],
                  means: Sequence[float] = MIXTURE["means"], stds: Sequence[float] = MIXTURE["stds"],
                  interpolation: str = "log_sigma"):
  """model_fn(x, t) returning the exact output for `schedule.prediction_type` at (fractional) t.

  abar at fractional t: "linear" interpolates abar between integer timesteps (the convention of
  tools/make_sampler_fixtures.py); "log_sigma" interpolates log sigma, the exact inverse of the
  sigma -> t map of Karras schedules, so the model and the sampler agree on the noise level.
  An EDM schedule (`schedule.edm`) gets `edm_mixture_model` instead (no interpolation).
  """
  if schedule.edm:
    return edm_mixture_model(schedule, weights, means, stds)
  w, mu, sd = (jnp.asarray(v, jnp.float32) for v in (weights, means, stds))
  T = schedule.num_train_timesteps
  if interpolation == "linear":
    ac = schedule.alphas_cumprod

    def abar_at(t):
      lo = jnp.clip(jnp.floor(t).astype(jnp.int32), 0, T - 1)
      hi = jnp.clip(lo + 1, 0, T - 1)
      return ac[lo] + (t - lo) * (ac[hi] - ac[lo])
  elif interpolation == "log_sigma":
    abar_np = schedules.sigma_alphas_cumprod(schedule)
    log_sig = jnp.asarray(np.log(np.sqrt((1 - abar_np) / abar_np)), jnp.float32)

    def abar_at(t):
      lo = jnp.clip(jnp.floor(t).astype(jnp.int32), 0, T - 2)
      sig = jnp.exp(log_sig[lo] + (t - lo) * (log_sig[lo + 1] - log_sig[lo]))
      return 1.0 / (1.0 + sig**2)
  else:
    raise ValueError(f"unknown interpolation {interpolation!r}; expected 'linear' or 'log_sigma'")

  def model_fn(x, t):
    abar = abar_at(t.reshape((-1,) + (1,) * (x.ndim - 1)))
    a, b = jnp.sqrt(abar), jnp.sqrt(1 - abar)
    xs, a_ = x[..., None], a[..., None]
    var = abar[..., None] * sd**2 + (1 - abar[..., None])
    logp = jnp.log(w) - 0.5 * jnp.log(var) - 0.5 * (xs - a_ * mu) ** 2 / var
    x0 = jnp.sum(jax.nn.softmax(logp, axis=-1) * (mu + a_ * sd**2 * (xs - a_ * mu) / var), axis=-1)
    eps = (x - a * x0) / b
    return {"epsilon": eps, "v_prediction": a * eps - b * x0, "sample": x0}[schedule.prediction_type]

  return model_fn


def edm_mixture_model(schedule: Schedule, weights: Sequence[float] = MIXTURE["weights"],
                      means: Sequence[float] = MIXTURE["means"], stds: Sequence[float] = MIXTURE["stds"]):
  """model_fn(x_in, c_noise) of an EDM network (Karras et al. 2022, table 1) whose denoiser is exact for the mixture
  noised in sigma space, x = x0 + sigma eps: sigma = exp(4 c_noise), x = x_in / c_in, and the raw output F with
  D(x, sigma) = c_skip x + c_out F (c_out negated for v_prediction), as tools/make_edm_fixtures.py."""
  w, mu, sd = (jnp.asarray(v, jnp.float32) for v in (weights, means, stds))
  sd2 = schedule.sigma_data**2

  def model_fn(x_in, c_noise):
    sigma = jnp.exp(4.0 * c_noise.astype(jnp.float32)).reshape((-1,) + (1,) * (x_in.ndim - 1))
    x = x_in * jnp.sqrt(sigma**2 + sd2)
    xs, s2 = x[..., None], sigma[..., None] ** 2
    var = sd**2 + s2
    logp = jnp.log(w) - 0.5 * jnp.log(var) - 0.5 * (xs - mu) ** 2 / var
    d = jnp.sum(jax.nn.softmax(logp, axis=-1) * (mu + sd**2 / var * (xs - mu)), axis=-1)
    c_out = sigma * schedule.sigma_data / jnp.sqrt(sigma**2 + sd2)
    f = (d - sd2 / (sigma**2 + sd2) * x) / c_out
    return -f if schedule.prediction_type == "v_prediction" else f

  return model_fn


def mixture_cdf(x: np.ndarray, weights=MIXTURE["weights"], means=MIXTURE["means"], stds=MIXTURE["stds"]):
  from math import erf, sqrt
  x = np.asarray(x, np.float64)
  out = np.zeros_like(x)
  for w, m, s in zip(weights, means, stds):
    out += w * 0.5 * (1 + np.vectorize(erf)((x - m) / (s * sqrt(2))))
  return out
