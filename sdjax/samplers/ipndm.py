"""iPNDM (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator", appendix):
pseudo linear multistep -- Adams-Bashforth up to fourth order, warmed up with the lower orders instead of
PNDM's Runge-Kutta steps -- on the probability-flow ODE in sigma space, dx/dsigma = (x - D(x, sigma)) / sigma
(Karras et al. 2022, eq. 3), one model evaluation per step; k-diffusion's (ComfyUI's) `sample_ipndm`.

`ipndm` uses the fixed (equal-step) Adams-Bashforth coefficients whatever the step sizes, as the paper and
k-diffusion do; `ipndm_v` uses variable-step Adams-Bashforth coefficients: the mean over the actual step of
the polynomial through the past slopes at their actual sigmas (exact for polynomial slopes of degree < order).
(k-diffusion's `sample_ipndm_v`, from zju-pi/diff-sampler, has the same idea with closed-form weights that
agree with these at order 2, and at orders 3-4 only on equal steps.) The step to sigma = 0 is an Euler
step (x -> D(x, sigma)) in both. Tables, starting noise and model call are euler's, so the model sees
x / sqrt(sigma^2 + 1) at euler's (possibly fractional) timesteps; option `max_order` (1-4, default 4):
with 1 it is euler.
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np

from sdjax import samplers
from sdjax.samplers.denoiser import denoiser
from sdjax.samplers.euler import init_sigma_scaled, sigma_tables
from sdjax.schedules import Schedule

MAX_ORDER = 4
# Adams-Bashforth weights of d_i, d_{i-1}, d_{i-2}, d_{i-3} for orders 1..4 (equal steps).
AB_FIXED = np.array([[1, 0, 0, 0], [3 / 2, -1 / 2, 0, 0], [23 / 12, -16 / 12, 5 / 12, 0],
                     [55 / 24, -59 / 24, 37 / 24, -9 / 24]], np.float64)


def ab_variable(sigmas: np.ndarray, i: int, order: int) -> np.ndarray:
  """Weights w_j (j < order) with x_{i+1} = x_i + (s_{i+1} - s_i) sum_j w_j d_{i-j}: the mean over
  [s_i, s_{i+1}] of the polynomial through (s_{i-j}, d_{i-j}) (variable-step Adams-Bashforth), float64."""
  s = np.asarray(sigmas, np.float64)
  nodes = s[i - np.arange(order)]
  a, b = s[i], s[i + 1]
  w = np.zeros(MAX_ORDER)
  for j in range(order):
    others = np.delete(nodes, j)
    basis = np.polynomial.Polynomial.fromroots(others) / np.prod(nodes[j] - others) if len(others) else \
        np.polynomial.Polynomial([1.0])
    integral = basis.integ()
    w[j] = (integral(b) - integral(a)) / (b - a)
  return w


def with_coeffs(base: Callable[[Schedule, int], dict[str, np.ndarray]], variable: bool
                ) -> Callable[[Schedule, int], dict[str, np.ndarray]]:
  """Tables `base` (timesteps [n], sigmas [n + 1]) plus "coeffs" [n, 4, 4]: at step i, the weights of
  d_i .. d_{i-3} for each order 1..4 (rows an order cannot use at step i, lacking history, are zero)."""

  def tables(schedule: Schedule, num_steps: int) -> dict[str, np.ndarray]:
    t = dict(base(schedule, num_steps))
    sigmas = t["sigmas"]
    n = len(t["timesteps"])
    coeffs = np.zeros((n, MAX_ORDER, MAX_ORDER))
    for i in range(n):
      for k in range(1, MAX_ORDER + 1):
        if sigmas[i + 1] == 0:  # the denoising step: x -> D(x, sigma), Euler's
          coeffs[i, k - 1] = AB_FIXED[0]
        elif k <= i + 1:
          coeffs[i, k - 1] = ab_variable(sigmas, i, k) if variable else AB_FIXED[k - 1]
    t["coeffs"] = coeffs.astype(np.float32)
    return t

  return tables


def init(schedule: Schedule, noise, tables):
  """Euler's starting x, and an empty history of the last three slopes."""
  carry = init_sigma_scaled(schedule, noise, tables)
  return {**carry, "hist": jnp.zeros((MAX_ORDER - 1,) + noise.shape, noise.dtype)}


def max_order_of(options) -> int:
  k = options.get("max_order", MAX_ORDER)
  if not (isinstance(k, (int, np.integer)) and 1 <= k <= MAX_ORDER):
    raise ValueError(f"max_order must be an int in [1, {MAX_ORDER}], got {k!r}")
  return int(k)


def ipndm_step(schedule, model_fn, carry, i, z, tables, options):
  x, hist = carry["x"], carry["hist"]
  sigma, sigma_next = samplers.at(tables, "sigmas", i), samplers.at(tables, "sigmas", i + 1)
  d = (x - denoiser(model_fn, schedule)(x, sigma, samplers.at(tables, "timesteps", i))) / sigma
  # Order min(i + 1, max_order): i counts from the first step run, so img2img warms up again.
  order = jnp.minimum(i + 1, max_order_of(options))
  c = jnp.asarray(tables["coeffs"])[i, order - 1]
  slope = c[0] * d + c[1] * hist[0] + c[2] * hist[1] + c[3] * hist[2]  # exactly d for order 1
  x_next = x + slope * (sigma_next - sigma)
  return {"x": x_next, "hist": jnp.concatenate([d[None], hist[:-1]])}


def register_ipndm(name: str, base_tables: Callable[[Schedule, int], dict[str, np.ndarray]], variable: bool,
                   init_fn: Callable = init, schedule_options: tuple[str, ...] = ()) -> None:
  """Register iPNDM (fixed weights) or, with `variable`, iPNDM-v over the step tables `base_tables`, which
  implement `schedule_options`."""
  samplers.register(name, samplers.Sampler(with_coeffs(base_tables, variable), init_fn, ipndm_step,
                                           samplers.noised_sigma, options=("max_order",),
                                           schedule_options=schedule_options))


register_ipndm("ipndm", sigma_tables, variable=False, schedule_options=("use_karras_sigmas",))
register_ipndm("ipndm_v", sigma_tables, variable=True, schedule_options=("use_karras_sigmas",))
