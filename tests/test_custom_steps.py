"""Custom step lists (`sample(..., timesteps=[...])` / `sigmas=[...]`) vs diffusers' `set_timesteps(timesteps=...)` /
`(sigmas=...)` on the analytic Gaussian-mixture model, and the refusals.

Fixtures: tools/make_custom_steps_fixtures.py (diffusers 0.42.1 / torch 2.13, CPU, float32).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import samplers, schedules
from sdjax.samplers import analytic

FIXTURES = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "samplers_custom_steps.npz"))
INDEX = json.loads(str(FIXTURES["index"]))
AYS_T = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]


@pytest.mark.parametrize("case", INDEX["cases"], ids=lambda c: c["key"])
def test_matches_diffusers(case):
  config = {**case["config"], "_class_name": case["class"]}
  schedule = schedules.from_diffusers_config(config)
  assert schedules.sampler_from_diffusers_config(config) == case["sampler"]
  custom = {k: case[k] for k in ("timesteps", "sigmas") if k in case}
  extra = {}
  if case["strength"] < 1.0:
    extra = {"init_image": jnp.asarray(FIXTURES["init_image"]), "strength": case["strength"]}
  seen = []
  model = analytic.mixture_model(schedule, *(INDEX["mixture"][k] for k in ("weights", "means", "stds")),
                                 interpolation="linear")

  def model_fn(x, t):
    jax.debug.callback(lambda t: seen.append(float(t[0])), t)
    return model(x, t)

  out = jax.jit(lambda n, z: samplers.sample(model_fn, n, schedule=schedule, sampler=case["sampler"], step_noise=z,
                                             **custom, **case["options"], **extra))(
                                                 jnp.asarray(FIXTURES["noise"]), FIXTURES.get(case["key"] + "/step_noise"))
  jax.effects_barrier()
  ref_t = FIXTURES[case["key"] + "/timesteps"]
  if "sigmas" in custom:  # fractional timesteps through log sigma (torch's MKL sqrt in the fixture: a few ulp)
    np.testing.assert_allclose(seen, ref_t, rtol=1e-6)
  else:
    np.testing.assert_array_equal(np.asarray(seen, np.float32), ref_t)
  ref = FIXTURES[case["key"] + "/final"]
  err = float(np.max(np.abs(np.asarray(out) - ref)) / np.max(np.abs(ref)))
  print(f"{case['key']}: max error {err:.2e} relative to the sample scale")
  assert err < 1e-4, f"max error {err:.2e} relative to the sample scale"


def _run(sampler, schedule=None, **kwargs):
  schedule = schedule or schedules.make_schedule("scaled_linear", 1000, 0.00085, 0.012)
  return samplers.sample(lambda x, t: jnp.zeros_like(x), jnp.ones((1, 2)), schedule=schedule, sampler=sampler,
                         **kwargs)


def test_num_steps_is_the_list_length():
  s = schedules.make_schedule("scaled_linear", 1000, 0.00085, 0.012)
  assert samplers.scan_length(s, "euler", timesteps=AYS_T) == 10
  assert samplers.scan_length(s, "euler", sigmas=[14.6, 1.0, 0.0]) == 2
  assert samplers.scan_length(s, "dpmpp_2m", 10, timesteps=AYS_T) == 10
  assert samplers.scan_length(s, "lcm", timesteps=[999, 499, 259], strength=0.7) == 2
  _run("euler", timesteps=AYS_T, num_steps=10)  # an agreeing num_steps is fine
  # empty lists leave the schedule as it is
  assert samplers.with_custom_steps(s, 10)[0] is s


@pytest.mark.parametrize("kwargs, match", [
    ({"timesteps": AYS_T, "num_steps": 20}, "num_steps=20 conflicts with the 10 steps of the custom timesteps"),
    ({"timesteps": AYS_T, "sigmas": [1.0, 0.0]}, "only one of timesteps and sigmas"),
    ({}, "num_steps is needed"),
    ({"timesteps": []}, "give no steps"),
    ({"timesteps": [999, 999, 500]}, "strictly descending"),
    ({"timesteps": [500, 700]}, "strictly descending"),
    ({"timesteps": [1000, 500]}, r"must lie in \[0, 1000\)"),
    ({"timesteps": [500, -1]}, r"must lie in \[0, 1000\)"),
    ({"sigmas": [1.0, 2.0, 0.0]}, "strictly descending"),
    ({"sigmas": [1.0, -0.5]}, "must be >= 0"),
])
def test_refusals(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _run("euler", **kwargs)


def test_refused_where_diffusers_refuses():
  karras = schedules.make_schedule("scaled_linear", 1000, 0.00085, 0.012, use_karras_sigmas=True)
  for sampler in ("euler", "heun", "dpmpp_2m"):
    with pytest.raises(ValueError, match="custom timesteps cannot be used with use_karras_sigmas=True"):
      _run(sampler, karras, timesteps=AYS_T)
  lu = schedules.make_schedule("scaled_linear", 1000, 0.00085, 0.012, use_lu_lambdas=True)
  with pytest.raises(ValueError, match="use_lu_lambdas=True"):
    _run("dpmpp_2m", lu, timesteps=AYS_T)
  # Classes whose set_timesteps takes no such list (EulerAncestral, DDIM, LMS, PNDM, ...; UniPC: sigmas only
  # for flow matching), and sigmas for the classes that take timesteps only.
  for sampler in ("euler_a", "ddim", "lms", "pndm", "unipc", "kdpm2", "deis", "dpmpp_2s"):
    with pytest.raises(ValueError, match=f"sampler '{sampler}' does not implement the schedule option custom_timesteps"):
      _run(sampler, timesteps=AYS_T)
  for sampler in ("heun", "dpmpp_2m", "ddpm", "unipc", "lcm"):
    with pytest.raises(ValueError, match="does not implement the schedule option custom_sigmas"):
      _run(sampler, sigmas=[14.6, 1.0, 0.0])
  for sampler in ("ddpm", "dpmpp_2m", "lcm", "tcd"):  # integer timesteps: diffusers would truncate
    with pytest.raises(ValueError, match="custom timesteps must be integers"):
      _run(sampler, timesteps=[999.5, 500])
  with pytest.raises(ValueError, match="heun: strength < 1 with custom timesteps"):
    _run("heun", timesteps=AYS_T, init_image=jnp.ones((1, 2)), strength=0.6)
  with pytest.raises(ValueError, match="leaves none of the 3 custom timesteps"):
    _run("lcm", timesteps=[999, 499, 259], init_image=jnp.ones((1, 2)), strength=0.2)
