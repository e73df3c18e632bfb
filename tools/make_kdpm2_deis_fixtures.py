"""Regenerate tests/fixtures/samplers_kdpm2_deis.npz: diffusers' KDPM2DiscreteScheduler,
KDPM2AncestralDiscreteScheduler and DEISMultistepScheduler on the analytic mixture model.

  pip install torch==2.13.0 "diffusers==0.42.*" && python tools/make_kdpm2_deis_fixtures.py

Same model, noise and loop as tools/make_sampler_fixtures.py. The KDPM2 schedulers call the model twice per
step (their `timesteps` interleave each step's midpoint); the noise KDPM2-ancestral draws on a step's second
call is stored by step (sdjax runs one scan step per KDPM2 step), zeros on the last step, which draws none.
"""
import importlib
import json
import os
import sys

import numpy as np
import torch
import diffusers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_sampler_fixtures import BASE, MIX, mixture_model, run_loop  # noqa: E402

EPS, V, SAMPLE = "epsilon", "v_prediction", "sample"
BOTH = [(EPS, 10), (V, 25)]  # each prediction type and step count once (the test's runtime is mostly compiling)
KARRAS = {"use_karras_sigmas": True}
LINSPACE, TRAILING = {"timestep_spacing": "linspace"}, {"timestep_spacing": "trailing"}
CASES = [  # (name, sdjax sampler, diffusers class, extra config, [(prediction type, steps)]); BASE spacing: leading
    ("kdpm2", "kdpm2", "KDPM2DiscreteScheduler", {}, BOTH),
    ("kdpm2_karras", "kdpm2", "KDPM2DiscreteScheduler", KARRAS, [(EPS, 25)]),
    ("kdpm2_linspace", "kdpm2", "KDPM2DiscreteScheduler", LINSPACE, [(V, 10)]),
    ("kdpm2_trailing", "kdpm2", "KDPM2DiscreteScheduler", TRAILING, [(EPS, 10)]),
    ("kdpm2_a", "kdpm2_a", "KDPM2AncestralDiscreteScheduler", {}, [(EPS, 25), (V, 10)]),
    ("kdpm2_a_karras", "kdpm2_a", "KDPM2AncestralDiscreteScheduler", KARRAS, [(V, 25)]),
    ("kdpm2_a_linspace", "kdpm2_a", "KDPM2AncestralDiscreteScheduler", LINSPACE, [(EPS, 10)]),
    ("deis", "deis", "DEISMultistepScheduler", {}, BOTH + [(SAMPLE, 10)]),
    ("deis_karras", "deis", "DEISMultistepScheduler", KARRAS, [(EPS, 25)]),
    ("deis_linspace", "deis", "DEISMultistepScheduler", LINSPACE, [(V, 10)]),
    ("deis_trailing", "deis", "DEISMultistepScheduler", TRAILING, [(EPS, 25)]),
    ("deis_1", "deis_1", "DEISMultistepScheduler", {"solver_order": 1}, [(EPS, 10)]),
    ("deis_3", "deis_3", "DEISMultistepScheduler", {"solver_order": 3}, BOTH),
]
IMG2IMG = ("kdpm2", "kdpm2_a", "deis_3")  # epsilon, 25 steps, strength 0.6
OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures",
                   "samplers_kdpm2_deis.npz")


def by_step(drawn, order, steps, like):
  """The noise drawn on model call k belongs to sdjax step k // order."""
  per_step = {k // order: z for k, z in drawn.items()}
  return np.stack([per_step.get(i, np.zeros_like(like)) for i in range(steps)])


def run(cls, config, noise, steps, strength=1.0, init=None):
  klass = getattr(diffusers, cls)
  module = importlib.import_module(klass.__module__)
  sched = klass.from_config(config)
  sched.set_timesteps(steps)
  model = mixture_model(sched.alphas_cumprod.numpy(), config["prediction_type"])
  start = steps - min(int(steps * strength), steps)
  timesteps = sched.timesteps[start * sched.order:]
  if strength < 1.0:  # StableDiffusionImg2ImgPipeline
    sched.set_begin_index(start * sched.order)
    x = sched.add_noise(init, noise, timesteps[:1].repeat(noise.shape[0]))
  else:
    x = noise * sched.init_noise_sigma
  seen, drawn, x = run_loop(sched, module, model, x, timesteps, {})
  return seen, by_step(drawn, sched.order, steps - start, noise.numpy()) if drawn else None, x


def main():
  noise = torch.randn((16, 2, 2, 1), generator=torch.Generator().manual_seed(0))
  init = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, noise.shape).astype(np.float32))
  arrays = {"noise": noise.numpy(), "init_image": init.numpy()}
  index = []

  def record(key, name, sampler, cls, config, steps, strength, result):
    seen, step_noise, x = result
    arrays[key + "/timesteps"] = np.array(seen, np.float32)
    arrays[key + "/final"] = x.numpy()
    if step_noise is not None:
      arrays[key + "/step_noise"] = step_noise
    index.append({"key": key, "name": name, "sampler": sampler, "class": cls, "config": config, "steps": steps,
                  "strength": strength})

  for name, sampler, cls, extra, combos in CASES:
    for prediction_type, steps in combos:
      config = {**BASE, **extra, "prediction_type": prediction_type}
      record(f"{name}/{prediction_type}/{steps}", name, sampler, cls, config, steps, 1.0,
             run(cls, config, noise, steps))
  for name, sampler, cls, extra, _ in CASES:
    if name in IMG2IMG:
      config = {**BASE, **extra, "prediction_type": EPS}
      record(f"img2img/{name}", name, sampler, cls, config, 25, 0.6, run(cls, config, noise, 25, 0.6, init))
  arrays["index"] = np.array(json.dumps({"mixture": MIX, "cases": index, "diffusers": diffusers.__version__,
                                         "torch": torch.__version__}))
  np.savez_compressed(OUT, **arrays)
  print(f"wrote {len(index)} cases to {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
  main()
