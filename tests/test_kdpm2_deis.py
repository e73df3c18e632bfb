"""kdpm2, kdpm2_a (DPM-Solver-2, k-diffusion's sample_dpm_2 / _ancestral) and deis_1 / deis / deis_3 (DEIS logrho)
vs diffusers 0.42.1's KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler and DEISMultistepScheduler on the
analytic mixture model. Fixtures: tools/make_kdpm2_deis_fixtures.py (torch 2.13, CPU, float32)."""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import diffusers_schedulers, samplers, schedules
from sdjax.samplers import analytic, deis, kdpm2

FIXTURES = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "samplers_kdpm2_deis.npz"))
INDEX = json.loads(str(FIXTURES["index"]))
CLASSES = ("KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DEISMultistepScheduler")


def _run(case):
  config = {"_class_name": case["class"], **case["config"]}
  schedule = schedules.from_diffusers_config(config)
  sampler = schedules.sampler_from_diffusers_config(config)
  assert sampler == case["sampler"]
  extra = {}
  if case["strength"] < 1.0:
    extra = {"init_image": jnp.asarray(FIXTURES["init_image"]), "strength": case["strength"]}
  seen = []
  model = analytic.mixture_model(schedule, interpolation="linear")

  def model_fn(x, t):
    jax.debug.callback(lambda t: seen.append(float(t[0])), t)
    return model(x, t)

  step_noise = FIXTURES.get(case["key"] + "/step_noise")  # what diffusers drew, by step (kdpm2_a)
  out = jax.jit(lambda n, z: samplers.sample(model_fn, n, schedule=schedule, sampler=sampler,
                                             num_steps=case["steps"], step_noise=z, **extra))(
                                                 jnp.asarray(FIXTURES["noise"]), step_noise)
  jax.effects_barrier()
  return np.asarray(out), np.asarray(seen, np.float32)


@pytest.mark.parametrize("case", INDEX["cases"], ids=lambda c: c["key"])
def test_matches_diffusers(case):
  out, seen = _run(case)
  ref_t = FIXTURES[case["key"] + "/timesteps"]
  assert seen.shape == ref_t.shape
  if case["sampler"].startswith("kdpm2"):
    # The model runs at diffusers' interleaved timesteps: each step's own (exact) and, but on the last step, its
    # log-sigma midpoint's (fractional, through log sigma: within torch's 1-ulp MKL sqrt / log / exp spread).
    np.testing.assert_array_equal(seen[::2], ref_t[::2])
    np.testing.assert_allclose(seen[1::2], ref_t[1::2], rtol=1e-6, atol=1e-5)
  else:
    np.testing.assert_array_equal(seen, ref_t)
  ref = FIXTURES[case["key"] + "/final"]
  err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
  print(f"{case['key']}: max error {err:.2e} relative to the sample scale")
  # DEIS: diffusers evaluates its order-2/3 coefficients in float32, where they cancel (off by up to ~4e-5);
  # sdjax's are float64. That is most of the (< 3e-5) difference for deis_3.
  assert err < 1e-4, f"max error {err:.2e} relative to the sample scale"


def test_kdpm2_steps_are_one_scan_step_each_with_two_model_calls():
  s = schedules.from_diffusers_config({"_class_name": "KDPM2DiscreteScheduler"})
  assert samplers.scan_length(s, "kdpm2", 10) == 10 and samplers.scan_length(s, "kdpm2_a", 10) == 10
  assert samplers.scan_length(s, "kdpm2_a", 25, strength=0.6) == 15
  t = kdpm2.kdpm2_tables(s, 10)
  # The midpoint is the geometric mean of the step's sigmas; the last step (to 0) has none.
  np.testing.assert_allclose(t["mid_sigmas"][:-1], np.sqrt(t["sigmas"][:-2] * t["sigmas"][1:-1]), rtol=1e-6)
  assert t["mid_sigmas"][-1] == 0 and t["sigmas"][-1] == 0
  # Ancestral: sigma_down = sigma_{i+1}^2 / sigma_i, so the midpoint of sigma_i and sigma_down is sigma_{i+1}.
  t = kdpm2.kdpm2_ancestral_tables(s, 10)
  np.testing.assert_allclose(t["mid_sigmas"][:-1], t["sigmas"][1:-1], rtol=1e-6)


def test_deis_coefficients_integrate_polynomials_exactly():
  """Order k integrates eps(rho) exactly when eps is a polynomial of degree < k in log rho (Zhang & Chen 2022)."""
  s = schedules.from_diffusers_config({"_class_name": "DEISMultistepScheduler"})
  for order in (1, 2, 3):
    t = deis.deis_tables(s, 12, order=order)
    rho = t["sigmas"].astype(np.float64)
    for i in range(order - 1, 10):
      u = np.log(rho[i - order + 1:i + 1][::-1])
      c = t["coef"][i, order - 1, :order].astype(np.float64)
      for degree in range(order):
        # integral of (log rho)^degree d rho, by parts
        f = lambda r: sum(r * np.log(r) ** (degree - m) * (-1) ** m * np.prod(np.arange(degree - m + 1, degree + 1))
                          for m in range(degree + 1))
        exact = f(rho[i + 1]) - f(rho[i])
        np.testing.assert_allclose(c @ u**degree, exact, rtol=1e-5, atol=1e-5)
  # lower_order_final under 15 steps; the warm-up is left to the step.
  assert list(deis.deis_tables(s, 10, order=3)["order"][-3:]) == [3, 2, 1]
  assert list(deis.deis_tables(s, 15, order=3)["order"][-2:]) == [3, 3]


@pytest.mark.parametrize("cls", CLASSES)
def test_the_diffusers_config_round_trips(cls):
  """A saved diffusers config (every field at the class default, as save_config writes it) loads to the same
  schedule as a minimal one, and names the sampler; solver_order picks the DEIS sampler."""
  minimal = {"_class_name": cls, "beta_schedule": "scaled_linear", "prediction_type": "v_prediction",
             "timestep_spacing": "trailing", "use_karras_sigmas": True}
  full = {**diffusers_schedulers.CLASS_DEFAULTS[cls], **minimal, "_diffusers_version": "0.42.1"}
  a, b = schedules.from_diffusers_config(minimal), schedules.from_diffusers_config(full)
  (la, ta), (lb, tb) = jax.tree.flatten(a), jax.tree.flatten(b)
  assert ta == tb and all(np.array_equal(x, y) for x, y in zip(la, lb))
  assert a.prediction_type == "v_prediction" and a.use_karras_sigmas
  assert a.timestep_spacing == "trailing" and a.betas.shape == (1000,)
  name = {"KDPM2DiscreteScheduler": "kdpm2", "KDPM2AncestralDiscreteScheduler": "kdpm2_a",
          "DEISMultistepScheduler": "deis"}[cls]
  assert schedules.sampler_from_diffusers_config(full) == name
  if cls == "DEISMultistepScheduler":
    for order, name in ((1, "deis_1"), (2, "deis"), (3, "deis_3")):
      assert schedules.sampler_from_diffusers_config({**full, "solver_order": order}) == name
    # diffusers rewrites these to deis / logrho itself.
    schedules.from_diffusers_config({**full, "algorithm_type": "dpmsolver++", "solver_type": "bh2"})


def test_settings_sdjax_does_not_implement_are_refused_naming_them():
  deis_cfg = {"_class_name": "DEISMultistepScheduler"}
  for field, value in (("solver_order", 4), ("lower_order_final", False), ("thresholding", True),
                       ("use_flow_sigmas", True), ("use_exponential_sigmas", True),
                       ("algorithm_type", "sde-dpmsolver++")):
    with pytest.raises(ValueError, match=re.escape(f"{field}={value!r} is not supported")):
      schedules.from_diffusers_config({**deis_cfg, field: value})
  with pytest.raises(ValueError, match="solver_order=4 is not supported by sdjax for DEISMultistepScheduler"):
    schedules.sampler_from_diffusers_config({**deis_cfg, "solver_order": 4})
  for cls in CLASSES[:2]:
    with pytest.raises(ValueError, match="use_beta_sigmas=True is not supported"):
      schedules.from_diffusers_config({"_class_name": cls, "use_beta_sigmas": True})
  with pytest.raises(ValueError, match="DEIS solver order"):
    deis.deis_tables(schedules.make_schedule(), 10, order=4)
