"""lcm and tcd vs diffusers' LCMScheduler / TCDScheduler on the analytic Gaussian-mixture model (standing in for a
consistency-distilled model: the sampler maths is compared), fed the noise diffusers drew between steps.

Fixtures: tools/make_lcm_fixtures.py (diffusers 0.42.1 / torch 2.13, CPU, float32).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import samplers, schedules
from sdjax.samplers import analytic, lcm

FIXTURES = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "samplers_lcm.npz"))
INDEX = json.loads(str(FIXTURES["index"]))


def run(schedule, sampler, steps, key, **kwargs):
  """(final sample, timesteps handed to the model) of sdjax, with the step noise diffusers drew for `key`."""
  seen = []
  model = analytic.mixture_model(schedule, *(INDEX["mixture"][k] for k in ("weights", "means", "stds")),
                                 interpolation="linear")

  def model_fn(x, t):
    jax.debug.callback(lambda t: seen.append(float(t[0])), t)
    return model(x, t)

  out = jax.jit(lambda n, z: samplers.sample(model_fn, n, schedule=schedule, sampler=sampler, num_steps=steps,
                                             step_noise=z, **kwargs))(jnp.asarray(FIXTURES["noise"]),
                                                                      FIXTURES.get(key + "/step_noise"))
  jax.effects_barrier()
  return np.asarray(out), np.asarray(seen, np.float32)


@pytest.mark.parametrize("case", INDEX["cases"], ids=lambda c: c["key"])
def test_matches_diffusers(case):
  config = {**case["config"], "_class_name": case["class"]}
  schedule = schedules.from_diffusers_config(config)
  assert schedules.sampler_from_diffusers_config(config) == case["sampler"]
  extra = {}
  if case["strength"] < 1.0:
    extra = {"init_image": jnp.asarray(FIXTURES["init_image"]), "strength": case["strength"]}
  out, seen = run(schedule, case["sampler"], case["steps"], case["key"], **case["options"], **extra)
  np.testing.assert_array_equal(seen, FIXTURES[case["key"] + "/timesteps"])
  ref = FIXTURES[case["key"] + "/final"]
  err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
  print(f"{case['key']}: max error {err:.2e} relative to the sample scale")
  assert err < 1e-4, f"max error {err:.2e} relative to the sample scale"


def test_the_distillation_timesteps():
  s = schedules.make_schedule("scaled_linear", 1000, 0.00085, 0.012)
  np.testing.assert_array_equal(lcm.distilled_timesteps(s, 4), [999, 759, 499, 259])
  # img2img (LatentConsistencyModelImg2ImgPipeline): num_steps steps from the first 30 of the 50 timesteps.
  np.testing.assert_array_equal(lcm.distilled_timesteps(s, 4, 0.6), [599, 459, 299, 159])
  assert samplers.scan_length(s, "lcm", 4, 0.6) == 4 and samplers.scan_length(s, "tcd", 4, 0.6) == 2


def test_settings_it_cannot_take_are_one_line_errors():
  s = schedules.make_schedule("scaled_linear", 1000, 0.00085, 0.012)
  x = jnp.ones((1, 2))
  zero = lambda x, t: jnp.zeros_like(x)
  with pytest.raises(ValueError, match=r"lcm: num_steps must be in \[1, 50\] \(original_inference_steps\)"):
    samplers.sample(zero, x, schedule=s, sampler="lcm", num_steps=51)
  with pytest.raises(ValueError, match=r"strength=0.1 keeps 5 of the 50 distillation timesteps"):
    samplers.sample(zero, x, schedule=s, sampler="lcm", num_steps=8, strength=0.1, init_image=x)
  with pytest.raises(ValueError, match=r"original_inference_steps must be an integer in \[1, 1000\]"):
    samplers.sample(zero, x, schedule=s.replace(original_inference_steps=2000), sampler="tcd", num_steps=4)
  with pytest.raises(ValueError, match=r"tcd: eta \(gamma\) must be a number in \[0, 1\], got 1.5"):
    samplers.sample(zero, x, schedule=s, sampler="tcd", num_steps=4, eta=1.5)
  with pytest.raises(ValueError, match="zero terminal SNR"):
    samplers.sample(zero, x, schedule=schedules.make_schedule("scaled_linear", 1000, 0.00085, 0.012,
                                                              rescale_betas_zero_snr=True), sampler="lcm", num_steps=4)
  with pytest.raises(ValueError, match=r"thresholding=True is not supported"):
    schedules.from_diffusers_config({"_class_name": "LCMScheduler", "thresholding": True})


def test_a_diffusers_config_round_trips():
  """The class's own defaults (SD's betas, 50 distillation steps, scaling 10) fill a minimal config; every
  setting that changes sampling lands in the schedule; the name comes from _class_name."""
  for cls, name in (("LCMScheduler", "lcm"), ("TCDScheduler", "tcd")):
    s = schedules.from_diffusers_config({"_class_name": cls})
    ref = schedules.make_schedule("scaled_linear", 1000, 0.00085, 0.012)
    np.testing.assert_array_equal(np.asarray(s.alphas_cumprod), np.asarray(ref.alphas_cumprod))
    assert (s.original_inference_steps, s.timestep_scaling, s.set_alpha_to_one) == (50, 10.0, True)
    assert schedules.sampler_from_diffusers_config({"_class_name": cls}) == name
    s = schedules.from_diffusers_config({"_class_name": cls, "original_inference_steps": 100, "timestep_scaling": 5.0,
                                         "prediction_type": "v_prediction", "clip_sample": True,
                                         "timestep_spacing": "trailing"})
    assert (s.original_inference_steps, s.timestep_scaling, s.prediction_type, s.clip_sample) == (
        100, 5.0, "v_prediction", True)
