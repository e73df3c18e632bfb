"""pndm_prk (PNDM with its pseudo Runge-Kutta warm-up) and the UniPC variants (unipc_1 / unipc / unipc_3, "_bh1",
"_eps"; final_sigmas_type, lower_order_final and disable_corrector from the schedule) vs diffusers 0.42.1's
PNDMScheduler(skip_prk_steps=False) and UniPCMultistepScheduler on the analytic mixture model.
Fixtures: tools/make_unipc_pndm_fixtures.py (torch 2.13, CPU, float32)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import samplers, schedules
from sdjax.samplers import analytic, unipc

FIXTURES = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "samplers_unipc_pndm.npz"))
INDEX = json.loads(str(FIXTURES["index"]))


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

  out = jax.jit(lambda n: samplers.sample(model_fn, n, schedule=schedule, sampler=sampler, num_steps=case["steps"],
                                          **extra))(jnp.asarray(FIXTURES["noise"]))
  jax.effects_barrier()
  return np.asarray(out), np.asarray(seen, np.float32)


@pytest.mark.parametrize("case", INDEX["cases"], ids=lambda c: c["key"])
def test_matches_diffusers(case):
  out, seen = _run(case)
  np.testing.assert_array_equal(seen, FIXTURES[case["key"] + "/timesteps"])
  ref = FIXTURES[case["key"] + "/final"]
  err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
  print(f"{case['key']}: max error {err:.2e} relative to the sample scale")
  assert err < 1e-4, f"max error {err:.2e} relative to the sample scale"


def test_pndm_prk_is_the_class_default_and_takes_num_steps_plus_nine_evaluations():
  assert schedules.sampler_from_diffusers_config({"_class_name": "PNDMScheduler"}) == "pndm_prk"
  assert schedules.sampler_from_diffusers_config({"_class_name": "PNDMScheduler", "skip_prk_steps": True}) == "pndm"
  s = schedules.from_diffusers_config({"_class_name": "PNDMScheduler", "steps_offset": 1})
  assert samplers.scan_length(s, "pndm_prk", 10) == 19
  t = samplers.get("pndm_prk").tables(s, 10)["timesteps"]
  np.testing.assert_array_equal(t[:13], [901, 851, 851, 801, 801, 751, 751, 701, 701, 651, 651, 601, 601])
  with pytest.raises(ValueError, match=r"pndm_prk needs num_steps in \[4, 1000\], got 3"):
    samplers.sample(lambda x, t: x, jnp.ones((1, 1)), schedule=s, sampler="pndm_prk", num_steps=3)
  with pytest.raises(ValueError, match="does not support strength < 1"):
    samplers.sample(lambda x, t: x, jnp.ones((1, 1)), schedule=s, sampler="pndm_prk", num_steps=10, strength=0.5,
                    init_image=jnp.ones((1, 1)))


def test_unipc_configs_round_trip_to_their_sampler_and_schedule():
  cls = {"_class_name": "UniPCMultistepScheduler"}
  name = lambda **c: schedules.sampler_from_diffusers_config({**cls, **c})
  assert name() == "unipc" and name(solver_order=1) == "unipc_1" and name(solver_order=3) == "unipc_3"
  assert name(solver_type="bh1", solver_order=3, predict_x0=False) == "unipc_3_bh1_eps"
  assert name(solver_type="midpoint") == "unipc"  # diffusers rewrites it to bh2
  for order in unipc.ORDERS:
    for solver_type in ("bh1", "bh2"):
      for predict_x0 in (True, False):
        assert name(solver_order=order, solver_type=solver_type, predict_x0=predict_x0) in samplers.SAMPLERS
  s = schedules.from_diffusers_config({**cls, "final_sigmas_type": "sigma_min", "lower_order_final": False,
                                       "disable_corrector": [0, 2]})
  assert s.final_sigmas_type == "sigma_min" and not s.lower_order_final and s.disable_corrector == (0, 2)
  t = samplers.get("unipc").tables(s, 5)
  np.testing.assert_array_equal(t["corrector"], [True, False, True, False, True])
  np.testing.assert_array_equal(t["cap"], [2, 2, 2, 2, 2])
  assert t["sigmas"][-1] == schedules.train_sigmas(s)[0]
  with pytest.raises(ValueError, match=r"solver_order=4 is not supported by sdjax"):
    schedules.from_diffusers_config({**cls, "solver_order": 4})
  with pytest.raises(ValueError, match=r"solver_p=.* is not supported by sdjax"):
    schedules.from_diffusers_config({**cls, "solver_p": "DPMSolverMultistepScheduler"})


def test_unipc_settings_that_make_diffusers_nan_are_refused_naming_them():
  s = schedules.from_diffusers_config({"_class_name": "UniPCMultistepScheduler"})
  run = lambda s, name: samplers.sample(lambda x, t: x, jnp.ones((1, 1)), schedule=s, sampler=name, num_steps=4)
  with pytest.raises(ValueError, match=r"unipc_bh1: final_sigmas_type='zero' .* use final_sigmas_type='sigma_min'"):
    run(s, "unipc_bh1")
  with pytest.raises(ValueError, match=r"unipc_eps: final_sigmas_type='zero'"):
    run(s, "unipc_eps")
  with pytest.raises(ValueError, match=r"unipc_3: lower_order_final=False with final_sigmas_type='zero'"):
    run(s.replace(lower_order_final=False), "unipc_3")
  assert np.isfinite(np.asarray(run(s.replace(lower_order_final=False), "unipc_1"))).all()
