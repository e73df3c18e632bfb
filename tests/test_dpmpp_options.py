"""DPMSolverMultistepScheduler's options vs diffusers 0.42.1 on the analytic Gaussian-mixture model: dpmpp_1m / 2m / 3m
and their SDE forms, lower_order_final, euler_at_final, final_sigmas_type="sigma_min", Lu lambdas, exponential and
beta sigmas, dynamic thresholding, img2img. Fixtures: tools/make_dpmpp_options_fixtures.py (torch 2.13, CPU)."""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import samplers, schedules
from sdjax.samplers import analytic, dpmpp

FIXTURES = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "samplers_dpmpp_options.npz"))
INDEX = json.loads(str(FIXTURES["index"]))


@pytest.mark.parametrize("case", INDEX["cases"], ids=lambda c: c["key"])
def test_matches_diffusers(case):
  config = {**case["config"], "_class_name": case["class"]}
  schedule = schedules.from_diffusers_config(config)
  assert schedules.sampler_from_diffusers_config(config) == case["sampler"]
  sampler = samplers.get(case["sampler"])
  tables = sampler.tables(schedule, case["steps"])
  key = case["key"]
  np.testing.assert_array_equal(tables["sigmas"], FIXTURES[key + "/sigmas"])
  start = case["steps"] - int(case["steps"] * case["strength"])
  np.testing.assert_array_equal(tables["timesteps"][start:], FIXTURES[key + "/timesteps"])
  extra = {}
  if case["strength"] < 1.0:
    extra = {"init_image": jnp.asarray(FIXTURES["init_image"]), "strength": case["strength"]}
  if case["stochastic"]:
    extra["step_noise"] = jnp.asarray(FIXTURES[key + "/step_noise"])
  model = analytic.mixture_model(schedule, *(case["mixture"][k] for k in ("weights", "means", "stds")),
                                 interpolation="linear")
  out = samplers.sample(model, jnp.asarray(FIXTURES["noise"]), schedule=schedule, sampler=case["sampler"],
                        num_steps=case["steps"], **extra)
  ref = FIXTURES[key + "/final"]
  err = float(np.max(np.abs(np.asarray(out) - ref)) / np.max(np.abs(ref)))
  print(f"{key}: max error {err:.2e} relative to the sample scale")
  assert err < 1e-4, f"max error {err:.2e} relative to the sample scale"


def test_beta_ppf_matches_scipy_in_float64():
  p, ref = FIXTURES["beta_ppf/p"], FIXTURES["beta_ppf/x"]
  x = dpmpp.beta_ppf(p, 0.6, 0.6)
  assert x[p == 0].tolist() == [0.0] and x[p == 1].tolist() == [1.0]
  assert np.max(np.abs(x - ref)) < 2e-15
  assert np.max(np.abs(x - ref) / np.maximum(ref, 1e-300)) < 2e-14


def test_thresholding_clips_in_these_fixtures():
  """The thresholding cases would fail if thresholding were a no-op there."""
  case = next(c for c in INDEX["cases"] if c["key"] == "2m_threshold/epsilon/10")
  config = {**case["config"], "_class_name": case["class"], "thresholding": False}
  schedule = schedules.from_diffusers_config(config)
  model = analytic.mixture_model(schedule, *(case["mixture"][k] for k in ("weights", "means", "stds")),
                                 interpolation="linear")
  out = samplers.sample(model, jnp.asarray(FIXTURES["noise"]), schedule=schedule, sampler="dpmpp_2m", num_steps=10)
  ref = FIXTURES[case["key"] + "/final"]
  assert np.max(np.abs(np.asarray(out) - ref)) / np.max(np.abs(ref)) > 1e-2


def test_dynamic_threshold_is_torch_quantile_then_clamp():
  x = jnp.asarray(np.random.default_rng(0).normal(0, 1.5, (3, 5, 4, 2)), jnp.float32)
  flat = np.abs(np.asarray(x).reshape(3, -1))
  s = np.clip(np.quantile(flat, 0.8, axis=1), 1.0, 1.7)[:, None]
  want = (np.clip(np.asarray(x).reshape(3, -1), -s, s) / s).reshape(x.shape)
  np.testing.assert_allclose(np.asarray(dpmpp.dynamic_threshold(x, 0.8, 1.7)), want, rtol=1e-6, atol=1e-6)


def test_order_table_follows_diffusers_rules():
  s = schedules.make_schedule()
  assert dpmpp.order_table(s, 5, 3).tolist() == [3, 3, 3, 2, 1]
  assert dpmpp.order_table(s, 16, 3).tolist() == [3] * 15 + [1]  # zero final sigma: always first order last
  s_min = schedules.make_schedule(final_sigmas_type="sigma_min")
  assert dpmpp.order_table(s_min, 16, 3).tolist() == [3] * 16
  assert dpmpp.order_table(s_min, 14, 3).tolist() == [3] * 12 + [2, 1]
  no_lower = schedules.make_schedule(final_sigmas_type="sigma_min", lower_order_final=False)
  assert dpmpp.order_table(no_lower, 5, 3).tolist() == [3] * 5
  euler_final = schedules.make_schedule(final_sigmas_type="sigma_min", euler_at_final=True)
  assert dpmpp.order_table(euler_final, 20, 2).tolist() == [2] * 19 + [1]


def test_a_diffusers_config_round_trips_and_refuses_what_it_would_get_wrong():
  base = {"_class_name": "DPMSolverMultistepScheduler"}
  assert schedules.sampler_from_diffusers_config(base) == "dpmpp_2m"
  for order in (1, 2, 3):
    assert schedules.sampler_from_diffusers_config({**base, "solver_order": order}) == f"dpmpp_{order}m"
    assert schedules.sampler_from_diffusers_config({**base, "solver_order": order, "algorithm_type": "sde-dpmsolver++"}) \
        == f"dpmpp_{order}m_sde"
  options = {"final_sigmas_type": "sigma_min", "use_lu_lambdas": True, "thresholding": True,
             "dynamic_thresholding_ratio": 0.9, "sample_max_value": 2.0, "lower_order_final": False,
             "euler_at_final": True}
  s = schedules.from_diffusers_config({**base, **options})
  assert {k: getattr(s, k) for k in options} == options
  assert schedules.from_diffusers_config({**base, "use_exponential_sigmas": True}).use_exponential_sigmas
  assert schedules.from_diffusers_config({**base, "use_beta_sigmas": True}).use_beta_sigmas
  d = schedules.from_diffusers_config(base)
  assert (d.final_sigmas_type, d.use_lu_lambdas, d.thresholding, d.lower_order_final, d.euler_at_final) == \
      ("zero", False, False, True, False)
  for field, value in (("solver_order", 4), ("solver_type", "heun"), ("algorithm_type", "dpmsolver"),
                       ("final_sigmas_type", "foo"), ("lambda_min_clipped", -5.1), ("variance_type", "learned_range")):
    with pytest.raises(ValueError, match=re.escape(f"{value!r}")):
      schedules.from_diffusers_config({**base, field: value})
  with pytest.raises(ValueError, match="only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas"):
    schedules.from_diffusers_config({**base, "use_karras_sigmas": True, "use_beta_sigmas": True})
  with pytest.raises(ValueError, match=r"solver_order=4 is not supported by sdjax for DPMSolverMultistepScheduler"):
    schedules.sampler_from_diffusers_config({**base, "solver_order": 4})
  # The other classes' samplers do not implement these options: still refused there.
  for cls, field, value in (("EulerDiscreteScheduler", "final_sigmas_type", "sigma_min"),
                            ("EulerDiscreteScheduler", "use_exponential_sigmas", True),
                            ("UniPCMultistepScheduler", "use_beta_sigmas", True),
                            ("DEISMultistepScheduler", "lower_order_final", False),
                            ("DDIMScheduler", "thresholding", True),
                            ("DPMSolverSinglestepScheduler", "final_sigmas_type", "sigma_min")):
    with pytest.raises(ValueError, match=re.escape(f"{field}={value!r} is not supported by sdjax for {cls}")):
      schedules.from_diffusers_config({"_class_name": cls, field: value})
  with pytest.raises(ValueError, match="unipc: use_lu_lambdas=True is not supported"):
    samplers.get("unipc").tables(schedules.make_schedule(use_lu_lambdas=True), 10)
