"""The model's output converted, once and here only, into the predictions the samplers integrate with.

A schedule's `prediction_type` says what `model_fn` returns: "epsilon" (the noise), "v_prediction" (Salimans & Ho
2022: v = alpha eps - sigma x0) or "sample" (x0). Every sampler goes through one of:
- `predict(prediction_type, out, x, alpha, sigma) -> (x0, eps)` for the VP sample x = alpha x0 + sigma eps (the
  samplers that step in the model's own parameterisation: ddim/ddpm, pndm, dpmpp, dpm_singlestep, unipc, deis,
  lcm/tcd; alpha = sqrt(abar), sigma = sqrt(1 - abar));
- `denoiser(model_fn, schedule) -> D(x, sigma, t)`, k-diffusion's denoiser (Karras et al. 2022, sec. 2) for the
  samplers that integrate dx/dsigma = (x - D(x, sigma)) / sigma in sigma space, x = x0 + sigma eps (euler, heun,
  lms, kdpm2, ipndm, and the EDM samplers): D returns the x0 prediction. For a VP schedule the model sees
  x / sqrt(sigma^2 + 1) (the VP sample); for an EDM schedule (`schedule.edm`) it is preconditioned (EDM, table 1).
  `t` is the timestep the sampler's tables pair with sigma (the fractional training timestep of sigma, or EDM's
  c_noise = log(sigma) / 4): the tables map sigma to t on the host, as diffusers does, so that the model sees the
  same float32 timesteps.

The float32 operations are diffusers' own, in its order (the parity tests compare bit for bit or at 1e-6), which is
why the sigma-space conversion is written out rather than derived from `predict`. This module imports nothing from
sdjax at run time, so that `schedules.predict_x0_and_eps` can stay an alias of `predict`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
  from sdjax.schedules import Schedule

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
Denoiser = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _unknown(prediction_type: str) -> ValueError:
  return ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def predict(prediction_type: str, out: jax.Array, x: jax.Array, alpha: jax.Array,
            sigma: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(x0, eps) predicted by the model output `out` at x = alpha x0 + sigma eps (alpha, sigma broadcastable).

  epsilon: x0 = (x - sigma out) / alpha; v_prediction: x0 = alpha x - sigma out, eps = alpha out + sigma x
  (with alpha^2 + sigma^2 = 1); sample: eps = (x - alpha out) / sigma. A sampler that needs only one of the two
  leaves the other unused (traced away under jit).
  """
  if prediction_type == "epsilon":
    return (x - sigma * out) / alpha, out
  if prediction_type == "v_prediction":
    return alpha * x - sigma * out, alpha * out + sigma * x
  if prediction_type == "sample":
    return out, (x - alpha * out) / sigma
  raise _unknown(prediction_type)


def eps_from_x0(x: jax.Array, x0: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
  """eps = (x - alpha x0) / sigma: the noise implied by an x0 prediction that was processed (clipped,
  thresholded) or that diffusers' class routes its noise through (DEIS)."""
  return (x - alpha * x0) / sigma


def vp_x0_in_sigma_space(prediction_type: str, out: jax.Array, x: jax.Array, sigma: jax.Array,
                         scale: jax.Array) -> jax.Array:
  """x0 from the output `out` of a VP model that saw x / scale, scale = sqrt(sigma^2 + 1), for the sigma-space
  sample x = x0 + sigma eps (diffusers' Euler/Heun/LMS/KDPM2 `step`, its float32 operation order)."""
  if prediction_type == "epsilon":
    return x - sigma * out
  if prediction_type == "v_prediction":
    return out * (-sigma / scale) + x / (sigma**2 + 1)
  if prediction_type == "sample":
    return out
  raise _unknown(prediction_type)


def edm_x0(prediction_type: str, out: jax.Array, x: jax.Array, sigma: jax.Array, sigma_data: float) -> jax.Array:
  """D = c_skip x + c_out F for the raw output F = `out` of an EDM-preconditioned network (Karras et al. 2022,
  table 1): c_skip = sigma_data^2 / (sigma^2 + sigma_data^2), c_out = +-sigma sigma_data / sqrt(sigma^2 +
  sigma_data^2), + for epsilon, - for v_prediction (diffusers' EDM `precondition_outputs`)."""
  if prediction_type not in ("epsilon", "v_prediction"):
    raise ValueError(f"prediction_type={prediction_type!r} is not defined for EDM schedules (epsilon, v_prediction)")
  sd2 = sigma_data**2
  c_out = sigma * sigma_data / jnp.sqrt(sigma**2 + sd2)
  if prediction_type == "v_prediction":
    c_out = -c_out
  return sd2 / (sigma**2 + sd2) * x + c_out * out


def denoiser(model_fn: Callable[[jax.Array, jax.Array], jax.Array], schedule: Schedule) -> Denoiser:
  """D(x, sigma, t): the x0 prediction at the sigma-space sample x = x0 + sigma eps, from `model_fn(x_in, t)`.

  VP schedule: x_in = x / sqrt(sigma^2 + 1); EDM schedule: x_in = c_in x, c_in = 1 / sqrt(sigma^2 + sigma_data^2),
  and t is c_noise. The prediction type is read once, here.
  """
  prediction_type = schedule.prediction_type
  if schedule.edm:
    sigma_data = schedule.sigma_data

    def edm_denoised(x, sigma, t):
      out = model_fn(x / jnp.sqrt(sigma**2 + sigma_data**2), t)
      return edm_x0(prediction_type, out, x, sigma, sigma_data)

    return edm_denoised

  def denoised(x, sigma, t):
    scale = jnp.sqrt(sigma**2 + 1)
    return vp_x0_in_sigma_space(prediction_type, model_fn(x / scale, t), x, sigma, scale)

  return denoised
