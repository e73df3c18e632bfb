"""dpmpp_2s / dpmpp_3s vs diffusers' DPMSolverSinglestepScheduler (dpmsolver++, solver_order 2 / 3) on the analytic
Gaussian-mixture model. Fixtures: tools/make_dpm_singlestep_fixtures.py (diffusers 0.42.1 / torch 2.13, CPU)."""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import samplers, schedules
from sdjax.samplers import analytic, dpm_singlestep

FIXTURES = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "samplers_dpm_singlestep.npz"))
INDEX = json.loads(str(FIXTURES["index"]))


@pytest.mark.parametrize("case", INDEX["cases"], ids=lambda c: c["key"])
def test_matches_diffusers(case):
  config = {**case["config"], "_class_name": case["class"]}
  schedule = schedules.from_diffusers_config(config)
  assert schedules.sampler_from_diffusers_config(config) == case["sampler"]
  order = 3 if case["sampler"] == "dpmpp_3s" else 2
  assert dpm_singlestep.order_list(case["steps"], order) == case["order_list"]
  extra = {}
  if case["strength"] < 1.0:
    extra = {"init_image": jnp.asarray(FIXTURES["init_image"]), "strength": case["strength"]}
  seen = []
  model = analytic.mixture_model(schedule, *(INDEX["mixture"][k] for k in ("weights", "means", "stds")),
                                 interpolation="linear")

  def model_fn(x, t):
    jax.debug.callback(lambda t: seen.append(float(t[0])), t)
    return model(x, t)

  out = jax.jit(lambda n: samplers.sample(model_fn, n, schedule=schedule, sampler=case["sampler"],
                                          num_steps=case["steps"], **extra))(jnp.asarray(FIXTURES["noise"]))
  jax.effects_barrier()
  np.testing.assert_array_equal(np.asarray(seen, np.float32), FIXTURES[case["key"] + "/timesteps"])
  ref = FIXTURES[case["key"] + "/final"]
  err = float(np.max(np.abs(np.asarray(out) - ref)) / np.max(np.abs(ref)))
  print(f"{case['key']}: max error {err:.2e} relative to the sample scale")
  assert err < 1e-4, f"max error {err:.2e} relative to the sample scale"


def test_a_diffusers_config_round_trips_and_refuses_what_it_would_get_wrong():
  base = {"_class_name": "DPMSolverSinglestepScheduler"}
  s = schedules.from_diffusers_config(base)  # the class's own defaults: linear betas 1e-4..0.02
  np.testing.assert_array_equal(np.asarray(s.alphas_cumprod), np.asarray(schedules.make_schedule().alphas_cumprod))
  assert schedules.sampler_from_diffusers_config(base) == "dpmpp_2s"
  assert schedules.sampler_from_diffusers_config({**base, "solver_order": 3}) == "dpmpp_3s"
  # lower_order_final=False (the class default) is turned on by diffusers' set_timesteps: accepted.
  schedules.from_diffusers_config({**base, "lower_order_final": False, "solver_order": 3})
  assert schedules.from_diffusers_config({**base, "use_karras_sigmas": True}).use_karras_sigmas
  for field, value in (("algorithm_type", "sde-dpmsolver++"), ("solver_type", "heun"),
                       ("final_sigmas_type", "sigma_min"), ("solver_order", 1), ("variance_type", "learned_range")):
    with pytest.raises(ValueError, match=re.escape(f"{field}={value!r}")):
      schedules.from_diffusers_config({**base, field: value})
  with pytest.raises(ValueError, match=r"solver_order=1 is not supported by sdjax for DPMSolverSinglestepScheduler"):
    schedules.sampler_from_diffusers_config({**base, "solver_order": 1})
