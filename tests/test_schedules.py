import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import schedules


def test_linear_and_scaled_linear_betas_match_closed_form():
  s = schedules.make_schedule("linear", 1000, 1e-4, 0.02)
  ref = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
  np.testing.assert_allclose(np.asarray(s.betas), ref, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(s.alphas_cumprod), np.cumprod(1 - ref), rtol=2e-5)
  s = schedules.make_schedule("scaled_linear", 1000, 0.00085, 0.012)
  ref = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
  np.testing.assert_allclose(np.asarray(s.betas), ref, rtol=1e-5)


def test_squaredcos_cap_v2_matches_nichol_dhariwal():
  T = 1000
  f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
  s = schedules.make_schedule("squaredcos_cap_v2", T)
  abar = np.array([f(t + 1) / f(0) for t in range(T)])
  # Capping betas at 0.999 changes only the last few entries.
  np.testing.assert_allclose(np.asarray(s.alphas_cumprod)[:-5], abar[:-5], rtol=1e-4)
  assert float(s.betas.max()) <= 0.999 + 1e-7


@pytest.mark.parametrize("prediction_type", schedules.PREDICTION_TYPES)
def test_training_target_inverts_to_x0_and_eps(prediction_type):
  s = schedules.make_schedule("linear", 1000, prediction_type=prediction_type)
  k1, k2 = jax.random.split(jax.random.key(0))
  x0 = jax.random.normal(k1, (6, 4, 4, 2))
  eps = jax.random.normal(k2, x0.shape)
  t = jnp.array([0, 10, 250, 500, 900, 999])
  xt = schedules.add_noise(s, x0, eps, t)
  out = schedules.training_target(s, x0, eps, t)
  abar = s.alphas_cumprod[t][:, None, None, None]
  x0_hat, eps_hat = schedules.predict_x0_and_eps(prediction_type, out, xt, abar)
  np.testing.assert_allclose(x0_hat, x0, atol=2e-3 if prediction_type == "epsilon" else 1e-4)
  np.testing.assert_allclose(eps_hat, eps, atol=1e-4 if prediction_type != "sample" else 2e-3)


def test_add_noise_and_snr_closed_form():
  s = schedules.make_schedule("linear", 1000)
  t = jnp.array([3, 700])
  x0, eps = jnp.ones((2, 1)), 2 * jnp.ones((2, 1))
  abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[[3, 700]]
  np.testing.assert_allclose(schedules.add_noise(s, x0, eps, t)[:, 0], np.sqrt(abar) + 2 * np.sqrt(1 - abar),
                             rtol=1e-5)
  np.testing.assert_allclose(schedules.snr(s, t), abar / (1 - abar), rtol=1e-4)


def test_leading_timesteps_as_diffusers():
  s = schedules.make_schedule("scaled_linear", 1000, 0.00085, 0.012, steps_offset=1)
  np.testing.assert_array_equal(schedules.discrete_timesteps(s, 10), [901, 801, 701, 601, 501, 401, 301, 201, 101, 1])
  assert schedules.discrete_timesteps(s, 50)[0] == 981
  with pytest.raises(ValueError, match="num_steps"):
    schedules.discrete_timesteps(s, 0)


def test_schedule_is_a_pytree_usable_under_jit():
  s = schedules.make_schedule("linear", 1000)
  f = jax.jit(lambda s, t: schedules.snr(s, t))
  np.testing.assert_allclose(f(s, jnp.array([5])), schedules.snr(s, jnp.array([5])))


def test_unknown_fields_are_named():
  with pytest.raises(ValueError, match="prediction_type"):
    schedules.make_schedule(prediction_type="eps")
  with pytest.raises(ValueError, match="beta_shedule"):
    schedules.from_config({"beta_shedule": "linear"})
