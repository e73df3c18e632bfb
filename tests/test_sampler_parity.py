"""sdjax samplers vs diffusers schedulers on an analytic Gaussian-mixture model.

Fixtures: tools/make_sampler_fixtures.py (diffusers 0.42 / torch 2.13, CPU, float32).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import samplers, schedules
from sdjax.samplers import analytic

FIXTURES = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "samplers.npz"))
INDEX = json.loads(str(FIXTURES["index"]))
MIX = INDEX["mixture"]


def mixture_model(schedule):
  assert tuple(MIX["weights"]) == analytic.MIXTURE["weights"] and tuple(MIX["means"]) == analytic.MIXTURE["means"]
  return analytic.mixture_model(schedule, MIX["weights"], MIX["means"], MIX["stds"], interpolation="linear")


@pytest.mark.parametrize("case", INDEX["cases"], ids=lambda c: c["key"])
def test_matches_diffusers(case):
  schedule = schedules.from_diffusers_config(case["config"])
  assert schedules.sampler_from_diffusers_config({**case["config"], "_class_name": case["class"]}) == case["sampler"]
  steps = case["steps"]
  extra = {}
  if case["mode"] == "img2img":
    extra = {"init_image": jnp.asarray(FIXTURES["init_image"]), "strength": case["strength"]}
  elif case["mode"] == "inpaint":
    extra = {"init_image": jnp.asarray(FIXTURES["init_image"]), "inpaint_mask": jnp.asarray(FIXTURES["inpaint_mask"])}
  seen = []
  model = mixture_model(schedule)

  def model_fn(x, t):
    jax.debug.callback(lambda t: seen.append(float(t[0])), t)
    return model(x, t)

  noise = jnp.asarray(FIXTURES["noise"])
  step_noise = FIXTURES.get(case["key"] + "/step_noise")  # the noise diffusers drew, for stochastic samplers
  out = jax.jit(lambda n, z: samplers.sample(model_fn, n, schedule=schedule, sampler=case["sampler"],
                                             num_steps=steps, step_noise=z, **case["options"], **extra))(
                                                 noise, step_noise)
  jax.effects_barrier()
  # The schedule tables are diffusers' bit for bit (tests/test_schedule_tables.py), so the timesteps are
  # exact, except the fractional (Karras) timesteps of euler/heun/lms: they go through log sigma, and this
  # fixture was made with torch's MKL float32 sqrt on a CPU where it is 1 ulp off for some inputs (sdjax's
  # is correctly rounded): up to 8 ulp, 6.3e-7 relative.
  ref_timesteps = FIXTURES[case["key"] + "/timesteps"]
  if case["config"].get("use_karras_sigmas") and case["sampler"] in ("euler", "heun", "lms"):
    np.testing.assert_allclose(seen, ref_timesteps, rtol=1e-6)
  else:
    np.testing.assert_array_equal(np.asarray(seen, np.float32), ref_timesteps)
  ref = FIXTURES[case["key"] + "/final"]
  err = float(np.max(np.abs(np.asarray(out) - ref)) / np.max(np.abs(ref)))
  print(f"{case['key']}: max error {err:.2e} relative to the sample scale")
  assert err < 1e-4, f"max error {err:.2e} relative to the sample scale"


def test_from_diffusers_config_refuses_what_it_would_get_wrong():
  with pytest.raises(ValueError, match="thresholding=True is not supported by sdjax for DDIMScheduler"):
    schedules.from_diffusers_config({"_class_name": "DDIMScheduler", "thresholding": True})
  with pytest.raises(ValueError, match="solver_order=4"):
    schedules.from_diffusers_config({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 4})
  with pytest.raises(ValueError, match="unsupported field"):
    schedules.from_diffusers_config({"beta_shedule": "linear"})
  sd15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
          "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
          "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
          "clip_sample": False}
  s = schedules.from_diffusers_config(sd15)
  assert s.steps_offset == 1 and not s.set_alpha_to_one and s.prediction_type == "epsilon"
