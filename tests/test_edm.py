"""diffusers' EDM schedulers vs diffusers 0.42.1 on the analytic Gaussian-mixture model in EDM form: EDMEulerScheduler
(edm_euler) and EDMDPMSolverMultistepScheduler (edm_dpmpp_1m / 2m / 3m, _sde), karras and exponential sigmas,
epsilon and v_prediction, the solver options, img2img. Fixtures: tools/make_edm_fixtures.py (torch 2.13, CPU)."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import samplers, schedules
from sdjax.samplers import analytic, edm

FIXTURES = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "samplers_edm.npz"))
INDEX = json.loads(str(FIXTURES["index"]))


@pytest.mark.parametrize("case", INDEX["cases"], ids=lambda c: c["key"])
def test_matches_diffusers(case):
  config = {**case["config"], "_class_name": case["class"]}
  schedule = schedules.from_diffusers_config(config)
  assert schedules.sampler_from_diffusers_config(config) == case["sampler"]
  tables = samplers.get(case["sampler"]).tables(schedule, case["steps"])
  key = case["key"]
  # (bit for bit but where torch's float32 exp / log (SLEEF) is not correctly rounded: 1 ulp there)
  np.testing.assert_array_max_ulp(tables["sigmas"], FIXTURES[key + "/sigmas"], maxulp=1)
  start = case["steps"] - int(case["steps"] * case["strength"])
  np.testing.assert_array_max_ulp(tables["timesteps"][start:], FIXTURES[key + "/timesteps"], maxulp=1)
  extra = {}
  if case["strength"] < 1.0:
    extra = {"init_image": jnp.asarray(FIXTURES["init_image"]), "strength": case["strength"]}
  if case["stochastic"]:
    extra["step_noise"] = jnp.asarray(FIXTURES[key + "/step_noise"])
  model = analytic.mixture_model(schedule, *(INDEX["mixture"][k] for k in ("weights", "means", "stds")))
  out = samplers.sample(model, jnp.asarray(FIXTURES["noise"]), schedule=schedule, sampler=case["sampler"],
                        num_steps=case["steps"], **extra)
  ref = FIXTURES[key + "/final"]
  err = float(np.max(np.abs(np.asarray(out) - ref)) / np.max(np.abs(ref)))
  print(f"{key}: max error {err:.2e} relative to the sample scale")
  assert err < 1e-4, f"max error {err:.2e} relative to the sample scale"


def _case(key):
  return next(c for c in INDEX["cases"] if c["key"] == key)


@pytest.mark.parametrize("key, changed", [("2m_threshold/epsilon/10", {"thresholding": False}),
                                          ("3m_no_lof/epsilon/10", {"lower_order_final": True}),
                                          ("euler_params/v_prediction/10", {"sigma_data": 0.5})])
def test_the_option_cases_would_fail_without_the_option(key, changed):
  case = _case(key)
  config = {**case["config"], "_class_name": case["class"]}
  model = analytic.mixture_model(schedules.from_diffusers_config(config))  # (the network as trained)
  schedule = schedules.from_diffusers_config({**config, **changed})
  out = samplers.sample(model, jnp.asarray(FIXTURES["noise"]), schedule=schedule,
                        sampler=case["sampler"], num_steps=case["steps"])
  ref = FIXTURES[key + "/final"]
  assert np.max(np.abs(np.asarray(out) - ref)) / np.max(np.abs(ref)) > 1e-5  # (parity: < 1e-6)


def test_diffusers_config_round_trip():
  s = schedules.from_diffusers_config({"_class_name": "EDMEulerScheduler", "sigma_max": 14.6, "sigma_data": 1.0,
                                       "sigma_schedule": "exponential", "prediction_type": "v_prediction"})
  assert (s.edm, s.edm_sigma_min, s.edm_sigma_max, s.sigma_data, s.sigma_schedule, s.rho) == (
      True, 0.002, 14.6, 1.0, "exponential", 7.0)
  assert s.prediction_type == "v_prediction"
  assert schedules.sampler_from_diffusers_config({"_class_name": "EDMEulerScheduler"}) == "edm_euler"
  dpm = {"_class_name": "EDMDPMSolverMultistepScheduler"}
  for extra, name in (({}, "edm_dpmpp_2m"), ({"solver_order": 1}, "edm_dpmpp_1m"),
                      ({"solver_order": 3}, "edm_dpmpp_3m"),
                      ({"algorithm_type": "sde-dpmsolver++"}, "edm_dpmpp_2m_sde"),
                      ({"algorithm_type": "sde-dpmsolver++", "solver_order": 1}, "edm_dpmpp_1m_sde")):
    assert schedules.sampler_from_diffusers_config({**dpm, **extra}) == name
    assert schedules.from_diffusers_config({**dpm, **extra}).edm
  # Not EDM: the fields keep their defaults, and EDM settings need edm on.
  assert not schedules.from_diffusers_config({"_class_name": "EulerDiscreteScheduler"}).edm
  with pytest.raises(ValueError, match=r"sigma_data=1.0 is an EDM setting"):
    schedules.from_diffusers_config({"sigma_data": 1.0})


@pytest.mark.parametrize("config, match", [
    ({"_class_name": "EDMEulerScheduler", "prediction_type": "sample"}, r"prediction_type='sample' is not defined"),
    ({"_class_name": "EDMEulerScheduler", "sigma_schedule": "linear"}, r"unknown sigma_schedule 'linear'"),
    ({"_class_name": "EDMEulerScheduler", "sigma_min": 90.0}, r"0 < edm_sigma_min < edm_sigma_max"),
    ({"_class_name": "EDMEulerScheduler", "sigma_data": 0.0}, r"sigma_data must be > 0"),
    ({"_class_name": "EDMDPMSolverMultistepScheduler", "solver_type": "heun"}, r"solver_type='heun' is not supported"),
    ({"_class_name": "EDMDPMSolverMultistepScheduler", "algorithm_type": "dpmsolver"},
     r"algorithm_type='dpmsolver' is not supported"),
])
def test_unsupported_settings_are_refused_naming_them(config, match):
  with pytest.raises(ValueError, match=match):
    schedules.from_diffusers_config(config)


def test_sampler_names_refuse_what_diffusers_cannot_run():
  dpm = {"_class_name": "EDMDPMSolverMultistepScheduler"}
  with pytest.raises(ValueError, match=r"solver_order=3 is not supported .* no third-order SDE step"):
    schedules.sampler_from_diffusers_config({**dpm, "solver_order": 3, "algorithm_type": "sde-dpmsolver++"})
  with pytest.raises(ValueError, match=r"algorithm_type='deis' needs final_sigmas_type='sigma_min'"):
    schedules.sampler_from_diffusers_config({**dpm, "algorithm_type": "deis"})


def test_edm_and_vp_schedules_and_samplers_do_not_mix():
  noise = jnp.zeros((1, 2, 2, 1))
  vp, edm_schedule = schedules.make_schedule(), schedules.make_schedule(edm=True)
  with pytest.raises(ValueError, match=r"'edm_euler' needs an EDM schedule"):
    samplers.sample(analytic.mixture_model(vp), noise, schedule=vp, sampler="edm_euler", num_steps=4)
  with pytest.raises(ValueError, match=r"sampler 'euler' does not implement the schedule option edm=True"):
    samplers.sample(analytic.mixture_model(edm_schedule), noise, schedule=edm_schedule, sampler="euler", num_steps=4)


def test_tables_follow_the_edm_formulas():
  s = schedules.make_schedule(edm=True)
  t = edm.euler_tables(s, 5)
  ramp = np.linspace(0, 1, 5)
  want = (80 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
  np.testing.assert_allclose(t["sigmas"], np.append(want, 0), rtol=1e-6)
  np.testing.assert_allclose(t["timesteps"], 0.25 * np.log(want), rtol=1e-6)


def test_training_an_edm_schedule_is_refused():
  s = schedules.make_schedule(edm=True)
  with pytest.raises(ValueError, match=r"edm=True: sdjax trains only discrete VP schedules"):
    schedules.add_noise(s, jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.zeros((1,), jnp.int32))
