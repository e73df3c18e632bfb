"""Regenerate tests/fixtures/samplers_dpm_singlestep.npz: diffusers' DPMSolverSinglestepScheduler on the analytic model.

  pip install torch==2.13.0 "diffusers==0.42.*" && python tools/make_dpm_singlestep_fixtures.py

The mixture model and loop of tools/make_sampler_fixtures.py, SD's betas, algorithm_type "dpmsolver++" and the
class's other defaults (lower_order_final False, which set_timesteps turns on). solver_order 2 and 3 at step
counts of every residue mod 3 (the order lists differ), Karras sigmas, and img2img as the generic img2img pipelines
(the first n - int(n * strength) steps skipped, `set_begin_index`), starting inside a solver group.
"""
import importlib
import json
import os
import sys

import numpy as np
import torch
import diffusers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_sampler_fixtures import MIX, mixture_model, run_loop  # noqa: E402

CLS = "DPMSolverSinglestepScheduler"
SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
CASES = [  # (name, extra config, prediction types, step counts)
    ("dpmpp_2s", {"solver_order": 2}, ("epsilon", "v_prediction"), (10, 25)),
    ("dpmpp_3s", {"solver_order": 3}, ("epsilon", "v_prediction"), (10, 25)),
    ("dpmpp_3s", {"solver_order": 3}, ("epsilon",), (12, 14)),
    ("dpmpp_2s_karras", {"solver_order": 2, "use_karras_sigmas": True}, ("epsilon",), (10,)),
    ("dpmpp_3s_karras", {"solver_order": 3, "use_karras_sigmas": True}, ("epsilon",), (25,)),
]
# (name, solver_order, steps, strength): 25 steps at 0.6 start at step 10 (order 1 for 2S, inside a group for 3S),
# 26 steps at 11 (inside a group for 2S).
IMG2IMG = [("dpmpp_2s", 2, 25, 0.6), ("dpmpp_2s", 2, 26, 0.6), ("dpmpp_3s", 3, 25, 0.6)]
OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures",
                   "samplers_dpm_singlestep.npz")


def main():
  noise = torch.randn((16, 2, 2, 1), generator=torch.Generator().manual_seed(0))
  init = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, noise.shape).astype(np.float32))
  arrays, index = {"noise": noise.numpy(), "init_image": init.numpy()}, []
  module = importlib.import_module(getattr(diffusers, CLS).__module__)
  runs = [(name, extra, pt, steps, 1.0) for name, extra, pts, counts in CASES for pt in pts for steps in counts]
  runs += [(f"img2img/{name}", {"solver_order": order}, "epsilon", steps, strength)
           for name, order, steps, strength in IMG2IMG]
  for name, extra, prediction_type, steps, strength in runs:
    config = {**SD_BETAS, **extra, "prediction_type": prediction_type}
    sched = getattr(diffusers, CLS).from_config(config)
    sched.set_timesteps(steps)
    model = mixture_model(sched.alphas_cumprod.numpy(), prediction_type)
    timesteps, x = sched.timesteps, noise * sched.init_noise_sigma
    if strength < 1.0:
      start = max(steps - min(int(steps * strength), steps), 0)
      timesteps = sched.timesteps[start * sched.order:]
      sched.set_begin_index(start * sched.order)
      x = sched.add_noise(init, noise, timesteps[:1].repeat(noise.shape[0]))
    seen, drawn, x = run_loop(sched, module, model, x, timesteps, {})
    assert not drawn
    key = f"{name}/{prediction_type}/{steps}"
    arrays[key + "/timesteps"] = np.array(seen, np.float32)
    arrays[key + "/final"] = x.numpy()
    sampler = "dpmpp_3s" if extra["solver_order"] == 3 else "dpmpp_2s"
    index.append({"key": key, "sampler": sampler, "class": CLS, "config": config, "steps": steps,
                  "strength": strength, "order_list": sched.order_list})
  arrays["index"] = np.array(json.dumps({"mixture": MIX, "cases": index, "diffusers": diffusers.__version__,
                                         "torch": torch.__version__}))
  np.savez_compressed(OUT, **arrays)
  print(f"wrote {len(index)} cases to {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
  main()
