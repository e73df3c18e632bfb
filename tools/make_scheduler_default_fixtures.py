"""Regenerate tests/fixtures/scheduler_defaults.npz: what each diffusers scheduler class does with a config
that leaves fields out (its own defaults apply), and the config it saves.

  pip install torch==2.13.0 "diffusers==0.42.*" && python tools/make_scheduler_default_fixtures.py

For each class sdjax maps to a sampler: the default of every `__init__` argument (sdjax keeps them as data in
sdjax/diffusers_schedulers.py; the test checks that table against these), the full config the class writes
with `save_config` for a minimal SD-style config (no spacing, no set_alpha_to_one, ...), and for that minimal
config the timesteps handed to the model and the final sample of 10 steps on the analytic mixture model (the
same model and noise as tools/make_sampler_fixtures.py).
"""
import importlib
import inspect
import json
import math
import os
import sys

import numpy as np
import torch
import diffusers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_sampler_fixtures import mixture_model, run_loop  # noqa: E402
from make_edm_fixtures import edm_mixture_model  # noqa: E402

CLASSES = ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
           "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
           "UniPCMultistepScheduler", "LCMScheduler", "TCDScheduler", "DPMSolverSinglestepScheduler",
           "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DEISMultistepScheduler", "EDMEulerScheduler",
           "EDMDPMSolverMultistepScheduler")
# The example: SD's betas and steps_offset, nothing else (diffusers fills in the rest per class).
MINIMAL = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
           "steps_offset": 1}
# Per-class additions to MINIMAL (none: PNDM's default, the PRK warm-up, is sdjax's pndm_prk).
EXTRA: dict[str, dict] = {}
STEPS = 10
OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures",
                   "scheduler_defaults.npz")


def plain(v):
  if isinstance(v, float) and math.isinf(v):
    return "-inf" if v < 0 else "inf"
  return list(v) if isinstance(v, tuple) else v


def main():
  noise = torch.randn((16, 2, 2, 1), generator=torch.Generator().manual_seed(0))
  arrays, index = {"noise": noise.numpy()}, {"diffusers": diffusers.__version__, "torch": torch.__version__,
                                              "classes": {}}
  for cls in CLASSES:
    klass = getattr(diffusers, cls)
    defaults = {k: plain(p.default) for k, p in inspect.signature(klass.__init__).parameters.items() if k != "self"}
    config = {**MINIMAL, **EXTRA.get(cls, {})}
    sched = klass.from_config(config)
    saved = json.loads(sched.to_json_string())  # exactly what save_config writes
    sched.set_timesteps(STEPS)
    if cls.startswith("EDM"):  # (no betas: the model in EDM form, tools/make_edm_fixtures.py)
      model = edm_mixture_model(sched.config.sigma_data, "epsilon")
    else:
      model = mixture_model(sched.alphas_cumprod.numpy(), "epsilon")
    module = importlib.import_module(klass.__module__)
    seen, drawn, x = run_loop(sched, module, model, noise * sched.init_noise_sigma, sched.timesteps, {})
    arrays[f"{cls}/timesteps"] = np.array(seen, np.float32)
    arrays[f"{cls}/final"] = x.numpy()
    if drawn:
      # By sdjax step: a scheduler of order 2 (KDPM2-ancestral) calls the model twice per step.
      drawn = {k // klass.order: z for k, z in drawn.items()}
      arrays[f"{cls}/step_noise"] = np.stack([drawn.get(i, np.zeros_like(noise.numpy())) for i in range(STEPS)])
    index["classes"][cls] = {"defaults": defaults, "minimal": config, "saved": saved, "steps": STEPS}
  arrays["index"] = np.array(json.dumps(index))
  np.savez_compressed(OUT, **arrays)
  print(f"wrote {len(CLASSES)} classes to {OUT}")


if __name__ == "__main__":
  main()
