"""sdjax.samplers.denoiser (the one place where a prediction type is converted) against closed forms in float64,
and the schedule-option table derived from the samplers' registrations."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import samplers, schedules
from sdjax.samplers import denoiser, discretisation

RNG = np.random.default_rng(0)
X0, EPS = RNG.normal(size=(2, 3, 5)), RNG.normal(size=(2, 3, 5))
SIGMAS = np.array([0.03, 1.7, 14.6])[:, None]  # VE noise levels, one per row


def _vp(sigma):
  """(alpha, sigma_vp) of the VE level sigma: the VP sample is x / sqrt(sigma^2 + 1)."""
  return 1 / np.sqrt(sigma**2 + 1), sigma / np.sqrt(sigma**2 + 1)


def _output(prediction_type, alpha, sigma_vp):
  return {"epsilon": EPS, "v_prediction": alpha * EPS - sigma_vp * X0, "sample": X0}[prediction_type]


@pytest.mark.parametrize("prediction_type", denoiser.PREDICTION_TYPES)
def test_predict_recovers_x0_and_eps(prediction_type):
  alpha, sigma = _vp(SIGMAS)
  x = alpha * X0 + sigma * EPS
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  x0, eps = denoiser.predict(prediction_type, f32(_output(prediction_type, alpha, sigma)), f32(x), f32(alpha),
                             f32(sigma))
  np.testing.assert_allclose(np.asarray(x0), X0, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(np.asarray(eps), EPS, rtol=2e-4, atol=2e-5)
  # schedules.predict_x0_and_eps is the same conversion, bit for bit (alpha = sqrt(abar), sigma = sqrt(1 - abar)).
  abar = f32(alpha**2)
  old = schedules.predict_x0_and_eps(prediction_type, f32(_output(prediction_type, alpha, sigma)), f32(x), abar)
  new = denoiser.predict(prediction_type, f32(_output(prediction_type, alpha, sigma)), f32(x), jnp.sqrt(abar),
                         jnp.sqrt(1.0 - abar))
  for a, b in zip(old, new):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_predict_refuses_an_unknown_prediction_type():
  with pytest.raises(ValueError, match="unknown prediction_type 'flow'"):
    denoiser.predict("flow", jnp.ones(2), jnp.ones(2), 1.0, 0.0)


@pytest.mark.parametrize("prediction_type", denoiser.PREDICTION_TYPES)
def test_vp_denoiser_in_sigma_space(prediction_type):
  """D(x, sigma, t) = x0 for x = x0 + sigma eps; the model sees the VP sample x / sqrt(sigma^2 + 1) and t as given."""
  alpha, sigma_vp = _vp(SIGMAS)
  x = X0 + SIGMAS * EPS
  seen = {}

  def model_fn(x_in, t):
    seen["x_in"], seen["t"] = np.asarray(x_in), t
    return jnp.asarray(_output(prediction_type, alpha, sigma_vp), jnp.float32)

  schedule = schedules.make_schedule(prediction_type=prediction_type)
  d = denoiser.denoiser(model_fn, schedule)(jnp.asarray(x, jnp.float32), jnp.asarray(SIGMAS, jnp.float32), 7.5)
  np.testing.assert_allclose(np.asarray(d), X0, rtol=2e-4, atol=5e-5)
  np.testing.assert_allclose(seen["x_in"], alpha * X0 + sigma_vp * EPS, rtol=2e-5, atol=2e-6)
  assert seen["t"] == 7.5


@pytest.mark.parametrize("prediction_type", ("epsilon", "v_prediction"))
def test_edm_denoiser_preconditioning(prediction_type):
  """EDM (Karras et al. 2022, table 1): the network sees c_in x and D = c_skip x + c_out F, c_out negated for v."""
  sigma_data = 0.5
  x = X0 + SIGMAS * EPS
  c_in = 1 / np.sqrt(SIGMAS**2 + sigma_data**2)
  c_skip = sigma_data**2 / (SIGMAS**2 + sigma_data**2)
  c_out = SIGMAS * sigma_data * c_in * (-1 if prediction_type == "v_prediction" else 1)
  raw = (X0 - c_skip * x) / c_out  # the output of a network whose denoiser is exact

  def model_fn(x_in, t):
    np.testing.assert_allclose(np.asarray(x_in), c_in * x, rtol=2e-5, atol=2e-6)
    return jnp.asarray(raw, jnp.float32)

  schedule = schedules.make_schedule(edm=True, sigma_data=sigma_data, prediction_type=prediction_type)
  d = denoiser.denoiser(model_fn, schedule)(jnp.asarray(x, jnp.float32), jnp.asarray(SIGMAS, jnp.float32), 0.0)
  np.testing.assert_allclose(np.asarray(d), X0, rtol=2e-4, atol=5e-5)


def test_sigma_spacings_closed_form():
  lo, hi, n = 0.0292, 14.61, 6
  ramp = np.linspace(0, 1, n)
  np.testing.assert_allclose(discretisation.karras(lo, hi, n),
                             (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7, rtol=1e-15)
  np.testing.assert_allclose(discretisation.exponential(lo, hi, n), hi * (lo / hi) ** ramp, rtol=1e-13)
  beta = discretisation.beta_sigmas(lo, hi, n)
  np.testing.assert_allclose(beta[[0, -1]], [hi, lo], rtol=1e-14)
  assert np.all(np.diff(beta) < 0)


def test_schedule_option_table_is_derived_from_the_registry():
  for option, (is_set, names) in samplers.SCHEDULE_OPTIONS.items():
    assert names == tuple(n for n, s in samplers.SAMPLERS.items() if option in s.schedule_options), option
    assert not is_set(schedules.make_schedule()), option  # every option is off on a default schedule
  assert samplers.SCHEDULE_OPTIONS["custom_sigmas"][1] == ("euler",)
  assert set(samplers.SCHEDULE_OPTIONS["edm"][1]) == {n for n in samplers.SAMPLERS if n.startswith("edm_")}
  assert set(samplers.SCHEDULE_OPTIONS["clip_sample"][1]) == {"ddim", "ddpm", "lcm"}
  # A sampler registered later appears in the table, and may declare only known options.
  base = samplers.get("euler")
  try:
    samplers.register("euler_test_only", samplers.Sampler(base.tables, base.init, base.step, base.noised,
                                                          schedule_options=("use_karras_sigmas",)))
    assert "euler_test_only" in samplers.SCHEDULE_OPTIONS["use_karras_sigmas"][1]
    samplers.check_schedule(schedules.make_schedule(use_karras_sigmas=True), "euler_test_only")
    with pytest.raises(ValueError, match="does not implement the schedule option clip_sample=True; samplers that "
                                         "do: ddim, ddpm, lcm"):
      samplers.check_schedule(schedules.make_schedule(clip_sample=True), "euler_test_only")
  finally:
    samplers.SAMPLERS.pop("euler_test_only", None)
  with pytest.raises(ValueError, match="unknown schedule option"):
    samplers.register("bad", samplers.Sampler(base.tables, base.init, base.step, base.noised,
                                              schedule_options=("use_karras",)))
  assert "bad" not in samplers.SAMPLERS


def test_sampler_settings_are_a_separate_part_of_the_schedule():
  """The settings from a scheduler config that only say how to sample travel in `schedule.sampler_settings`;
  the old `schedule.<setting>` reads and `schedule.replace(<setting>=...)` keep working."""
  s = schedules.from_diffusers_config({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True,
                                       "final_sigmas_type": "sigma_min", "beta_schedule": "scaled_linear"})
  assert isinstance(s.sampler_settings, schedules.SamplerSettings)
  assert s.sampler_settings.use_karras_sigmas and s.use_karras_sigmas
  assert s.final_sigmas_type == s.sampler_settings.final_sigmas_type == "sigma_min"
  assert s.timestep_spacing == "linspace"  # (DPMSolverMultistepScheduler's default)
  t = s.replace(lower_order_final=False, prediction_type="v_prediction")
  assert (t.lower_order_final, t.prediction_type, s.lower_order_final) == (False, "v_prediction", True)
  assert t.sampler_settings == dataclasses.replace(s.sampler_settings, lower_order_final=False)
  assert set(schedules.SAMPLER_SETTINGS).isdisjoint(f.name for f in dataclasses.fields(schedules.Schedule))
  with pytest.raises(AttributeError, match="no attribute 'use_karras'"):
    s.use_karras  # noqa: B018
