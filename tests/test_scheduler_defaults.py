"""A diffusers scheduler config is read as diffusers reads it: the class's own defaults fill what the config
leaves out, the full config current diffusers saves loads, and only settings that would change sampling
are refused. Fixtures: tools/make_scheduler_default_fixtures.py (diffusers 0.42.1, torch 2.13, CPU)."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import diffusers_schedulers, samplers, schedules
from sdjax.samplers import analytic

FIXTURES = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "scheduler_defaults.npz"))
INDEX = json.loads(str(FIXTURES["index"]))
CLASSES = sorted(INDEX["classes"])


def _plain(v):
  return {"-inf": -math.inf, "inf": math.inf}.get(v, v) if isinstance(v, str) else v


def test_the_defaults_table_is_diffusers():
  assert sorted(diffusers_schedulers.CLASS_DEFAULTS) == CLASSES
  for cls in CLASSES:
    want = {k: _plain(v) for k, v in INDEX["classes"][cls]["defaults"].items()}
    assert diffusers_schedulers.CLASS_DEFAULTS[cls] == want, cls


def test_every_class_field_has_exactly_one_rule():
  rules = (set(diffusers_schedulers.SCHEDULE_FIELDS), set(diffusers_schedulers.SUPPORTED),
           set(diffusers_schedulers.INERT_UNLESS))
  assert not (rules[0] & rules[1] or rules[0] & rules[2] or rules[1] & rules[2])
  assert diffusers_schedulers.all_fields() == set().union(*rules)


def _same(a, b) -> bool:
  """Two Schedules are equal: the same static fields and the same arrays."""
  (la, ta), (lb, tb) = jax.tree.flatten(a), jax.tree.flatten(b)
  return ta == tb and all(np.array_equal(x, y) for x, y in zip(la, lb))


def _sample(config, key):
  schedule = schedules.from_diffusers_config(config)
  sampler = schedules.sampler_from_diffusers_config(config)
  seen = []
  model = analytic.mixture_model(schedule, interpolation="linear")

  def model_fn(x, t):
    jax.debug.callback(lambda t: seen.append(float(t[0])), t)
    return model(x, t)

  out = jax.jit(lambda n, z: samplers.sample(model_fn, n, schedule=schedule, sampler=sampler,
                                             num_steps=INDEX["classes"][config["_class_name"]]["steps"],
                                             step_noise=z))(jnp.asarray(FIXTURES["noise"]),
                                                            FIXTURES.get(key + "/step_noise"))
  jax.effects_barrier()
  return np.asarray(out), np.asarray(seen, np.float32)


@pytest.mark.parametrize("cls", CLASSES)
def test_a_minimal_config_samples_as_diffusers_with_the_class_defaults(cls):
  """The issue's example: SD's betas and steps_offset only. EulerDiscreteScheduler defaults to "linspace"
  spacing (t = 999, 888, ...); sdjax used its own "leading" default (t = 901, 801, ...) and its samples
  differed by ~20%. Each class's own defaults now apply (spacing, set_alpha_to_one, clip_sample, ...)."""
  case = INDEX["classes"][cls]
  out, seen = _sample({"_class_name": cls, **case["minimal"]}, cls)
  ref_timesteps = FIXTURES[cls + "/timesteps"]
  if cls.startswith("KDPM2"):  # every other call is at a log-sigma midpoint: fractional, via torch's log / exp / sqrt
    np.testing.assert_array_equal(seen[::2], ref_timesteps[::2])
    np.testing.assert_allclose(seen[1::2], ref_timesteps[1::2], rtol=1e-6, atol=1e-5)
  else:
    np.testing.assert_array_equal(seen, ref_timesteps)
  ref = FIXTURES[cls + "/final"]
  err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
  assert err < 1e-4, f"{cls}: max error {err:.2e} relative to the sample scale"


@pytest.mark.parametrize("cls", CLASSES)
def test_the_config_current_diffusers_saves_loads_as_the_minimal_one(cls):
  """save_config of diffusers 0.42 writes every field, including ones sdjax does not implement at their inert
  defaults (time_shift_type, flow_shift, shift_terminal, ...): accepted, and the same schedule."""
  case = INDEX["classes"][cls]
  saved = {k: _plain(v) for k, v in case["saved"].items()}
  assert _same(schedules.from_diffusers_config(saved),
               schedules.from_diffusers_config({"_class_name": cls, **case["minimal"]}))
  assert schedules.sampler_from_diffusers_config(saved) == schedules.sampler_from_diffusers_config(
      {"_class_name": cls})


def test_class_defaults_that_sdjax_does_not_implement_are_refused_naming_the_default(monkeypatch):
  # Every class default is implemented now (PNDM's PRK warm-up last: pndm_prk); as if it were not:
  monkeypatch.setitem(diffusers_schedulers.SUPPORTED, "skip_prk_steps", (True,))
  with pytest.raises(ValueError, match=r"skip_prk_steps=False \(PNDMScheduler's default; the config leaves it "
                                       r"out\) is not supported by sdjax \(supported: True\)"):
    schedules.from_diffusers_config({"_class_name": "PNDMScheduler"})
  monkeypatch.undo()
  with pytest.raises(ValueError, match=r"clip_sample=True is not supported by sdjax for HeunDiscreteScheduler"):
    schedules.from_diffusers_config({"_class_name": "HeunDiscreteScheduler", "clip_sample": True})
  with pytest.raises(ValueError, match=r"solver_order=4 is not supported"):
    schedules.from_diffusers_config({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 4})
  with pytest.raises(ValueError, match=r"use_flow_sigmas=True is not supported"):
    schedules.from_diffusers_config({"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True})
  with pytest.raises(ValueError, match=r"no sdjax sampler for _class_name='FooScheduler'"):
    schedules.from_diffusers_config({"_class_name": "FooScheduler"})


def test_inert_and_foreign_fields_are_accepted_as_diffusers_accepts_them():
  # Parameters of features that are off cannot change sampling, whatever their value.
  base = schedules.from_diffusers_config({"_class_name": "DPMSolverMultistepScheduler"})
  assert _same(schedules.from_diffusers_config({"_class_name": "DPMSolverMultistepScheduler", "flow_shift": 3.0,
                                                "time_shift_type": "linear", "sample_max_value": 2.0}), base)
  # A field the class does not take is ignored, as diffusers ignores it (SD 1.5's PNDM config has clip_sample).
  sd15 = {"_class_name": "PNDMScheduler", "skip_prk_steps": True, "set_alpha_to_one": False, "clip_sample": True,
          "steps_offset": 1, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
  s = schedules.from_diffusers_config(sd15)
  assert not s.clip_sample and s.steps_offset == 1 and s.timestep_spacing == "leading"
  # DDIM's own defaults: clip_sample and set_alpha_to_one on.
  ddim = schedules.from_diffusers_config({"_class_name": "DDIMScheduler"})
  assert ddim.clip_sample and ddim.set_alpha_to_one and ddim.timestep_spacing == "leading"
  euler = schedules.from_diffusers_config({"_class_name": "EulerDiscreteScheduler"})
  assert euler.timestep_spacing == "linspace"
