"""Regenerate tests/fixtures/samplers_lcm.npz: diffusers' LCMScheduler and TCDScheduler on the analytic model.

  pip install torch==2.13.0 "diffusers==0.42.*" && python tools/make_lcm_fixtures.py

The mixture model and loop of tools/make_sampler_fixtures.py (its analytic model stands in for a
consistency-distilled one: the sampler maths is what is compared). Both schedulers re-noise with fresh noise
between steps; the noise diffusers draws is recorded per step. img2img: LCM as LatentConsistencyModelImg2ImgPipeline
(`set_timesteps(n, strength=...)`, all n steps from `add_noise` at the first timestep), TCD as the generic img2img
pipelines (the first n - int(n * strength) steps skipped, `set_begin_index`).
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

CASES = [  # (name, sdjax sampler, diffusers class, extra config, step kwargs = sdjax options, step counts)
    ("lcm", "lcm", "LCMScheduler", {}, {}, (4, 10, 25)),
    # Every setting of the class that changes sampling; timestep_spacing, which LCMScheduler ignores, is set too.
    ("lcm_custom", "lcm", "LCMScheduler", {"original_inference_steps": 100, "timestep_scaling": 5.0,
                                           "clip_sample": True, "clip_sample_range": 0.8,
                                           "timestep_spacing": "trailing"}, {}, (10, 25)),
    ("tcd", "tcd", "TCDScheduler", {}, {}, (4, 10, 25)),
    ("tcd_eta0", "tcd", "TCDScheduler", {}, {"eta": 0.0}, (10,)),
    ("tcd_eta1_o100", "tcd", "TCDScheduler", {"original_inference_steps": 100}, {"eta": 1.0}, (25,)),
    ("lcm_zsnr", "lcm", "LCMScheduler", {"rescale_betas_zero_snr": True}, {}, (4,)),
]
IMG2IMG = [("lcm", 25, 0.6), ("lcm", 4, 0.6), ("tcd", 25, 0.6)]
OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures",
                   "samplers_lcm.npz")


def main():
  noise = torch.randn((16, 2, 2, 1), generator=torch.Generator().manual_seed(0))
  init = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, noise.shape).astype(np.float32))
  arrays, index = {"noise": noise.numpy(), "init_image": init.numpy()}, []

  def record(key, seen, drawn, x, n):
    arrays[key + "/timesteps"] = np.array(seen, np.float32)
    arrays[key + "/final"] = x.numpy()
    if drawn:
      arrays[key + "/step_noise"] = np.stack([drawn.get(i, np.zeros_like(noise.numpy())) for i in range(n)])

  for name, sampler, cls, extra, options, step_counts in CASES:
    module = importlib.import_module(getattr(diffusers, cls).__module__)
    zero_snr = extra.get("rescale_betas_zero_snr", False)  # epsilon is undefined at abar_T = 0
    for prediction_type in ("v_prediction",) if zero_snr else ("epsilon", "v_prediction"):
      for steps in step_counts:
        config = {**BASE, **extra, "prediction_type": prediction_type}
        sched = getattr(diffusers, cls).from_config(config)
        sched.set_timesteps(steps)
        model = mixture_model(sched.alphas_cumprod.numpy(), prediction_type)
        seen, drawn, x = run_loop(sched, module, model, noise * sched.init_noise_sigma, sched.timesteps, options)
        key = f"{name}/{prediction_type}/{steps}"
        record(key, seen, drawn, x, len(seen))
        index.append({"key": key, "sampler": sampler, "class": cls, "config": config, "options": options,
                      "steps": steps, "strength": 1.0})
  for sampler, steps, strength in IMG2IMG:
    _, _, cls, extra, options, _ = next(c for c in CASES if c[0] == sampler)
    module = importlib.import_module(getattr(diffusers, cls).__module__)
    config = {**BASE, **extra, "prediction_type": "epsilon"}
    sched = getattr(diffusers, cls).from_config(config)
    if sampler == "lcm":  # LatentConsistencyModelImg2ImgPipeline
      sched.set_timesteps(steps, strength=strength)
      timesteps = sched.timesteps
    else:  # StableDiffusion(XL)Img2ImgPipeline.get_timesteps
      sched.set_timesteps(steps)
      start = max(steps - min(int(steps * strength), steps), 0)
      timesteps = sched.timesteps[start * sched.order:]
      sched.set_begin_index(start * sched.order)
    model = mixture_model(sched.alphas_cumprod.numpy(), "epsilon")
    x = sched.add_noise(init, noise, timesteps[:1].repeat(noise.shape[0]))
    seen, drawn, x = run_loop(sched, module, model, x, timesteps, options)
    key = f"img2img/{sampler}/{steps}"
    record(key, seen, drawn, x, len(seen))
    index.append({"key": key, "sampler": sampler, "class": cls, "config": config, "options": options,
                  "steps": steps, "strength": strength})
  arrays["index"] = np.array(json.dumps({"mixture": MIX, "cases": index, "diffusers": diffusers.__version__,
                                         "torch": torch.__version__}))
  np.savez_compressed(OUT, **arrays)
  print(f"wrote {len(index)} cases to {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
  main()
