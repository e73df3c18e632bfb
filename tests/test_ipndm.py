"""iPNDM and the named step schedules (sdjax/samplers/ipndm.py, steps.py). They have no diffusers
equivalent, so they are checked against euler, closed-form ODE solutions for Gaussian data, a float64 RK4
solution of the mixture model's probability-flow ODE, and the published Align Your Steps tables."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import samplers, schedules
from sdjax.samplers import analytic, ipndm, steps

SD15 = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
NEW = ["ipndm", "ipndm_v", "ipndm_karras", "ipndm_v_karras", "euler_ays", "dpmpp_2m_ays", "ipndm_ays",
       "ipndm_v_ays", "euler_ays_xl", "dpmpp_2m_ays_xl", "ipndm_ays_xl", "ipndm_v_ays_xl"]
# diffusers >= 0.28, schedulers/scheduling_utils.py `AysSchedules` (the AYS paper's 10-step SD 1.5 / SDXL
# schedules; diffusers stores the final sigma_min as 0).
AYS_DIFFUSERS = {
    "ays": ([14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.0],
            [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]),
    "ays_xl": ([14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.0],
               [999, 845, 730, 587, 443, 310, 193, 116, 53, 13]),
}


def noise(key=0):
  return jax.random.normal(jax.random.key(key), (16, 2, 2, 1))


def test_first_order_ipndm_is_euler():
  s = schedules.make_schedule(**SD15)
  model, z, init = analytic.mixture_model(s), noise(), 0.4 * noise(1)
  run = functools.partial(samplers.sample, model, z, schedule=s)
  np.testing.assert_array_equal(run(sampler="ipndm", num_steps=10, max_order=1), run(sampler="euler", num_steps=10))
  np.testing.assert_array_equal(run(sampler="ipndm", num_steps=10, max_order=1, init_image=init, strength=0.6),
                                run(sampler="euler", num_steps=10, init_image=init, strength=0.6))
  # ipndm_v differs from ipndm only in its table of weights, whose first-order rows are Euler's too; the first
  # step runs at order 1 (no history), and the last (to sigma = 0) is Euler's at every order.
  euler_row = np.eye(4)[0]
  for name in ("ipndm", "ipndm_v", "ipndm_ays", "ipndm_v_karras"):
    coeffs = samplers.get(name).tables(s, 10)["coeffs"]
    np.testing.assert_array_equal(coeffs[:, 0], np.broadcast_to(euler_row, (10, 4)))
    np.testing.assert_array_equal(coeffs[-1], np.broadcast_to(euler_row, (4, 4)))
  with pytest.raises(ValueError, match="max_order"):
    run(sampler="ipndm", num_steps=10, max_order=5)


W, MU, SD = (np.array(analytic.MIXTURE[k], np.float64) for k in ("weights", "means", "stds"))


def denoised64(x, sigma):
  """E[x0 | x0 + sigma eps = x] for the mixture, float64."""
  var = SD**2 + sigma**2
  logp = np.log(W) - 0.5 * np.log(var) - 0.5 * (x[..., None] - MU) ** 2 / var
  r = np.exp(logp - logp.max(-1, keepdims=True))
  return (r / r.sum(-1, keepdims=True) * (MU + SD**2 / var * (x[..., None] - MU))).sum(-1)


@functools.lru_cache(maxsize=None)
def ode64(sigma_to: float, sigma_from: float = 3.0, steps_: int = 1000) -> np.ndarray:
  """x(sigma_to) from x(sigma_from) = X0: classical RK4 in log sigma, dx/dlog(sigma) = x - D(x, sigma), float64."""
  x, u, h = X0.copy(), np.log(sigma_from), (np.log(sigma_to) - np.log(sigma_from)) / steps_
  f = lambda x, u: x - denoised64(x, np.exp(u))
  for k in range(steps_):
    k1 = f(x, u)
    k2 = f(x + h / 2 * k1, u + h / 2)
    k3 = f(x + h / 2 * k2, u + h / 2)
    k4 = f(x + h * k3, u + h)
    x, u = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), u + h
  return x


X0 = np.linspace(-3.0, 3.0, 16)


def multistep_error(grid: np.ndarray, variable: bool, max_order: int) -> float:
  """Run ipndm's step from sigma = grid[3] = 3 to grid[-1] = 1, its history d at grid[0..2] and x at grid[3]
  taken from the reference solution, so every step has full order; max error vs the reference."""
  s = schedules.make_schedule(**SD15)
  model = analytic.mixture_model(s)
  sig = grid.astype(np.float32)
  base = {"timesteps": steps.sigmas_to_timesteps(s, sig[:-1]), "sigmas": sig}
  tables = ipndm.with_coeffs(lambda *_: base, variable)(s, 0)
  hist = [(ode64(float(g)) - denoised64(ode64(float(g)), g)) / g for g in grid[2::-1]]
  carry = {"x": jnp.asarray(X0, jnp.float32)[:, None], "hist": jnp.asarray(np.stack(hist), jnp.float32)[..., None]}
  for i in range(3, len(grid) - 1):  # eagerly: cheaper here than compiling a step per grid
    carry = ipndm.ipndm_step(s, lambda x, t: model(x, jnp.full((16,), t)), carry, i, None, tables,
                             {"max_order": max_order})
  return float(np.abs(np.asarray(carry["x"][:, 0], np.float64) - ode64(1.0)).max())


def test_multistep_order_on_the_mixture_ode():
  # Errors over sigma 3 -> 1 (a smooth stretch of the mixture's ODE) at 8, 16, 32 steps. Adams-Bashforth of
  # order k should gain 2^k per doubling; on this stretch the step counts are pre-asymptotic and the ratios
  # still climb (measured: 3.0/3.4, 4.7/6.0, 7.3/10.8 for orders 2/3/4 on equal steps).
  def errors(kind, variable, order, counts=(8, 16, 32)):
    out = []
    for n in counts:
      k = np.arange(-3, n + 1)
      grid = 3.0 - 2.0 / n * k if kind == "equal" else 3.0 * (1 / 3) ** (k / n)
      out.append(multistep_error(grid, variable, order))
    return np.array(out)

  e = {k: errors("equal", False, k) for k in (2, 3, 4)}
  ratios = {k: v[:-1] / v[1:] for k, v in e.items()}
  assert 2.5 < ratios[2][-1] < 4.5 and 5.0 < ratios[3][-1] < 9.0 and ratios[4][-1] > 9.5, ratios
  assert np.all(np.diff(ratios[4]) > 0) and e[4][-1] < e[3][-1] / 4 < e[2][-1] / 16, e
  # Geometric steps (constant ratio, as Karras / AYS schedules roughly are): the variable-step weights keep
  # the order; the fixed equal-step weights of plain iPNDM do not (about second order there).
  variable, fixed = errors("geometric", True, 4, (16, 32)), errors("geometric", False, 4, (16, 32))
  assert variable[-2] / variable[-1] > 9.5 and variable[-1] < 1e-5, variable
  assert fixed[-2] / fixed[-1] < 4.5, fixed


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_samplers_solve_the_gaussian_ode(prediction_type):
  # Gaussian data N(mu, sd^2): the ODE's solution from x at sigma_0 is mu + (x - mu) sd / sqrt(sd^2 + sigma_0^2).
  # Ten steps (the last one first order, to sigma = 0) land within a few percent of it; a sampler whose start,
  # or whose img2img noising, used the wrong parameterisation (sigma vs VP) would be off by tens of percent.
  mu, sd = 0.2, 0.5
  s = schedules.make_schedule(**SD15, prediction_type=prediction_type)
  model = analytic.mixture_model(s, weights=(1.0,), means=(mu,), stds=(sd,))
  z, init = np.asarray(noise(), np.float64), mu + sd * noise(1)
  def solution(x, sigmas):  # the exact ODE solution at sigma = 0, or Euler's method on `sigmas` if given
    if sigmas is None:
      return mu + (x - mu) * sd / np.sqrt(sd**2 + sigma0**2)
    for a, b in zip(sigmas[:-1], sigmas[1:]):
      x = x + (x - mu - sd**2 / (sd**2 + a**2) * (x - mu)) / a * (b - a)
    return x

  # One of each start / noising / step combination (the ipndm_v_* and *_xl variants share these code paths).
  names = ["ipndm", "ipndm_v", "ipndm_karras", "euler_ays", "dpmpp_2m_ays", "ipndm_ays"]
  for name in names if prediction_type == "epsilon" else ["ipndm_ays"]:
    sampler = samplers.get(name)
    sig = samplers.get(name).tables(s, 10)["sigmas"].astype(np.float64)
    sigma0 = sig[0]
    # Sigma-space start: euler's for ipndm/ipndm_v (leading spacing: sqrt(sigma^2 + 1)), else VP noise.
    x_start = z * (float(sampler.init(s, jnp.ones(()), {"sigmas": sig})["x"]) if name in ("ipndm", "ipndm_v")
                   else np.sqrt(sigma0**2 + 1))
    # Euler: its own float64 recursion, to float32 rounding; the others: the exact solution, to a few percent.
    tol, ref = (1e-5, sig) if name.startswith("euler") else (0.1, None)
    out = samplers.sample(model, noise(), schedule=s, sampler=name, num_steps=10)
    assert np.abs(np.asarray(out) - solution(x_start, ref)).max() < tol, name
    if name not in ("euler_ays", "dpmpp_2m_ays", "ipndm_ays"):  # one img2img run per way of noising
      continue
    sigma0 = sig[4]  # strength 0.6 of 10 steps starts at step 4, from init noised to sigma_4
    out = samplers.sample(model, noise(), schedule=s, sampler=name, num_steps=10, init_image=init, strength=0.6)
    ref = None if ref is None else sig[4:]
    assert np.abs(np.asarray(out) - solution(np.asarray(init, np.float64) + sig[4] * z, ref)).max() < tol, name


def test_align_your_steps_tables():
  s = schedules.make_schedule(**SD15)
  for name, (sigmas, timesteps) in AYS_DIFFUSERS.items():
    t, sig = steps.step_schedule(name, s, 10)
    assert t.dtype == sig.dtype == np.float32 and sig[-1] == 0
    np.testing.assert_array_equal(sig, np.float32(sigmas))
    assert np.abs(t - np.array(timesteps)).max() < 0.6  # the published integer timesteps, to rounding
    # Other step counts: log-linear in the step index through the published 11 values (last sigma_min 0.029).
    t20, sig20 = steps.step_schedule(name, s, 20)
    np.testing.assert_allclose(sig20[:-1:2], sigmas[:-1], rtol=1e-6)
    np.testing.assert_allclose(sig20[1:-2:2], np.sqrt(np.multiply(sigmas[:-2], sigmas[1:-1])), rtol=1e-6)
    np.testing.assert_allclose(sig20[-2], np.sqrt(sigmas[-2] * 0.029), rtol=1e-6)
    assert sig20[-1] == 0
    t5, sig5 = steps.step_schedule(name, s, 5)
    np.testing.assert_allclose(sig5[:-1], sigmas[:-1:2], rtol=1e-6)
    # The timesteps are where the training sigmas, interpolated in log sigma, equal the sigmas.
    # (The first, 14.615, is a hair above SD's largest training sigma, 14.6146: it maps to t = 999.)
    log_train = np.log(schedules.train_sigmas(s).astype(np.float64))
    np.testing.assert_allclose(np.exp(np.interp(t20[1:], np.arange(1000), log_train)), sig20[1:-1], rtol=1e-5)
    assert t20[0] == 999
  t, sig = steps.step_schedule("karras", s, 7)
  train = schedules.train_sigmas(s)
  np.testing.assert_allclose([sig[0], sig[-2]], [train[-1], train[0]], rtol=1e-6)
  np.testing.assert_allclose(t[[0, -1]], [999, 0], atol=1e-3)
  np.testing.assert_allclose(np.diff(sig[:-1] ** (1 / 7)), (sig[-2] ** (1 / 7) - sig[0] ** (1 / 7)) / 6, rtol=1e-4)
  with pytest.raises(ValueError, match="steps 'ays'.*training sigmas"):
    samplers.sample(lambda x, t: x, noise(), schedule=schedules.make_schedule(**{**SD15, "beta_end": 0.002}),
                    sampler="euler_ays", num_steps=10)
  with pytest.raises(ValueError, match="unknown steps"):
    steps.step_schedule("ays_sd3", s, 10)
  for name in NEW:  # every registered combination builds consistent tables
    for n in (1, 5, 10, 27):
      tables = samplers.get(name).tables(s, n)
      assert tables["timesteps"].shape == (n,) and tables["sigmas"].shape == (n + 1,) and tables["sigmas"][-1] == 0
      assert np.all(np.diff(tables["sigmas"]) < 0) and np.all(np.diff(tables["timesteps"]) < 0)
      assert tables["coeffs"].shape == (n, 4, 4) if "ipndm" in name else "coeffs" not in tables
      if "coeffs" in tables:  # consistent weights (they sum to 1) wherever an order is usable
        usable = np.arange(n)[:, None] >= np.arange(4)[None, :]
        np.testing.assert_allclose(tables["coeffs"].sum(-1)[usable], 1.0, rtol=1e-5)
