"""Regenerate tests/fixtures/samplers_unipc_pndm.npz: diffusers' PNDMScheduler with its Runge-Kutta warm-up
(skip_prk_steps=False, the class default) and UniPCMultistepScheduler's options (solver_order 1 / 3, bh1,
predict_x0=False, lower_order_final=False, final_sigmas_type="sigma_min", disable_corrector) on the analytic
mixture model.

  pip install torch==2.13.0 "diffusers==0.42.*" && python tools/make_unipc_pndm_fixtures.py

Same model, noise and loop as tools/make_sampler_fixtures.py (deterministic samplers: no step noise).
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

EPS, V = "epsilon", "v_prediction"
BOTH = [(EPS, 10), (V, 25)]  # each prediction type and step count once (the runtime is mostly compiling)
MIN = {"final_sigmas_type": "sigma_min"}
PRK = {"skip_prk_steps": False}
CASES = [  # (name, sdjax sampler, diffusers class, extra config, [(prediction type, steps)]); BASE spacing: leading
    ("pndm_prk", "pndm_prk", "PNDMScheduler", PRK, BOTH),
    ("pndm_prk_4", "pndm_prk", "PNDMScheduler", PRK, [(EPS, 4)]),
    ("pndm_prk_trailing", "pndm_prk", "PNDMScheduler", {**PRK, "timestep_spacing": "trailing"}, [(EPS, 25)]),
    ("pndm_prk_linspace", "pndm_prk", "PNDMScheduler", {**PRK, "timestep_spacing": "linspace"}, [(V, 10)]),
    ("pndm_prk_odd", "pndm_prk", "PNDMScheduler", PRK, [(EPS, 7)]),  # r = 142: odd midpoint offsets
    ("unipc_1", "unipc_1", "UniPCMultistepScheduler", {"solver_order": 1}, BOTH),
    ("unipc_3", "unipc_3", "UniPCMultistepScheduler", {"solver_order": 3}, BOTH),
    ("unipc_3_karras", "unipc_3", "UniPCMultistepScheduler", {"solver_order": 3, "use_karras_sigmas": True},
     [(EPS, 25)]),
    ("unipc_sigma_min", "unipc", "UniPCMultistepScheduler", MIN, [(V, 25)]),
    ("unipc_sigma_min_karras", "unipc", "UniPCMultistepScheduler", {**MIN, "use_karras_sigmas": True}, [(V, 10)]),
    ("unipc_bh1", "unipc_bh1", "UniPCMultistepScheduler", {**MIN, "solver_type": "bh1"}, [(EPS, 10)]),
    ("unipc_3_bh1", "unipc_3_bh1", "UniPCMultistepScheduler", {**MIN, "solver_type": "bh1", "solver_order": 3},
     [(EPS, 25)]),
    ("unipc_1_bh1", "unipc_1_bh1", "UniPCMultistepScheduler", {**MIN, "solver_type": "bh1", "solver_order": 1},
     [(V, 10)]),
    ("unipc_eps", "unipc_eps", "UniPCMultistepScheduler", {**MIN, "predict_x0": False}, [(V, 25)]),
    ("unipc_3_eps", "unipc_3_eps", "UniPCMultistepScheduler", {**MIN, "predict_x0": False, "solver_order": 3},
     [(EPS, 25)]),
    ("unipc_3_nolof", "unipc_3", "UniPCMultistepScheduler", {**MIN, "lower_order_final": False, "solver_order": 3},
     [(V, 25)]),
    ("unipc_nocorr", "unipc", "UniPCMultistepScheduler", {"disable_corrector": [0, 3, 8]}, [(EPS, 10)]),
    ("unipc_3_nocorr", "unipc_3", "UniPCMultistepScheduler", {"disable_corrector": [1, 4], "solver_order": 3},
     [(V, 25)]),
]
IMG2IMG = [("unipc_3", "unipc_3", {"solver_order": 3, "disable_corrector": [12]}),
           ("unipc_eps", "unipc_eps", {**MIN, "predict_x0": False})]  # epsilon, 25 steps, strength 0.6
OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures",
                   "samplers_unipc_pndm.npz")


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
  seen, _, x = run_loop(sched, module, model, x, timesteps, {})
  return seen, x


def main():
  noise = torch.randn((16, 2, 2, 1), generator=torch.Generator().manual_seed(0))
  init = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, noise.shape).astype(np.float32))
  arrays = {"noise": noise.numpy(), "init_image": init.numpy()}
  index = []

  def record(key, sampler, cls, config, steps, strength, result):
    seen, x = result
    assert torch.isfinite(x).all(), key
    arrays[key + "/timesteps"] = np.array(seen, np.float32)
    arrays[key + "/final"] = x.numpy()
    index.append({"key": key, "sampler": sampler, "class": cls, "config": config, "steps": steps,
                  "strength": strength})

  for name, sampler, cls, extra, runs in CASES:
    for prediction_type, steps in runs:
      config = {**BASE, **extra, "prediction_type": prediction_type}
      record(f"{name}/{prediction_type}/{steps}", sampler, cls, config, steps, 1.0, run(cls, config, noise, steps))
  for name, sampler, extra in IMG2IMG:
    cls = "UniPCMultistepScheduler"
    config = {**BASE, **extra, "prediction_type": EPS}
    record(f"img2img/{name}", sampler, cls, config, 25, 0.6, run(cls, config, noise, 25, 0.6, init))
  arrays["index"] = np.array(json.dumps({"mixture": MIX, "cases": index, "diffusers": diffusers.__version__,
                                         "torch": torch.__version__}))
  np.savez_compressed(OUT, **arrays)
  print(f"wrote {len(index)} cases to {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
  main()
