"""Regenerate tests/fixtures/samplers_custom_steps.npz: diffusers schedulers with custom step lists
(`set_timesteps(timesteps=...)` / `set_timesteps(sigmas=...)`, as diffusers pipelines pass them) on the analytic model.

  pip install torch==2.13.0 "diffusers==0.42.*" && python tools/make_custom_steps_fixtures.py

The mixture model and loop of tools/make_sampler_fixtures.py; for stochastic samplers the noise each step draws is
recorded. img2img (strength 0.6): Euler as the generic img2img pipelines (retrieve_timesteps(timesteps=...), then
the first n - int(n * strength) steps skipped), LCM as LatentConsistencyModelImg2ImgPipeline
(`set_timesteps(timesteps=..., strength=...)`).
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

AYS_T = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]  # SD 1.5 Align Your Steps timesteps (diffusers' AysSchedules)
AYS_S = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.0]  # its sigmas, final 0
CASES = [  # (name, sdjax sampler, diffusers class, extra config, step kwargs, "timesteps"/"sigmas", list, pred types)
    ("ddpm", "ddpm", "DDPMScheduler", {}, {}, "timesteps", AYS_T, ("epsilon", "v_prediction")),
    ("euler_t", "euler", "EulerDiscreteScheduler", {}, {}, "timesteps", AYS_T, ("epsilon", "v_prediction")),
    ("euler_t_frac", "euler", "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, {}, "timesteps",
     [999.0, 700.5, 420.25, 150.75, 10.5], ("epsilon",)),
    ("euler_s", "euler", "EulerDiscreteScheduler", {}, {}, "sigmas", AYS_S, ("epsilon", "v_prediction")),
    ("heun", "heun", "HeunDiscreteScheduler", {}, {}, "timesteps", AYS_T, ("epsilon", "v_prediction")),
    ("dpmpp_2m", "dpmpp_2m", "DPMSolverMultistepScheduler", {}, {}, "timesteps", AYS_T, ("epsilon", "v_prediction")),
    ("dpmpp_2m_sde", "dpmpp_2m_sde", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {},
     "timesteps", AYS_T, ("epsilon",)),
    ("dpmpp_3m_sigma_min", "dpmpp_3m", "DPMSolverMultistepScheduler",
     {"solver_order": 3, "final_sigmas_type": "sigma_min"}, {}, "timesteps", AYS_T, ("epsilon",)),
    ("lcm", "lcm", "LCMScheduler", {}, {}, "timesteps", [999, 759, 499, 259], ("epsilon", "v_prediction")),
    ("tcd", "tcd", "TCDScheduler", {}, {}, "timesteps", AYS_T, ("epsilon",)),
]
IMG2IMG = [("euler_t", 0.6), ("lcm", 0.6)]
OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures",
                   "samplers_custom_steps.npz")


def main():
  noise = torch.randn((16, 2, 2, 1), generator=torch.Generator().manual_seed(0))
  init = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, noise.shape).astype(np.float32))
  arrays, index = {"noise": noise.numpy(), "init_image": init.numpy()}, []

  def record(key, seen, drawn, x, n):
    arrays[key + "/timesteps"] = np.array(seen, np.float32)
    arrays[key + "/final"] = x.numpy()
    if drawn:
      arrays[key + "/step_noise"] = np.stack([drawn.get(i, np.zeros_like(noise.numpy())) for i in range(n)])

  for name, sampler, cls, extra, options, kind, values, prediction_types in CASES:
    module = importlib.import_module(getattr(diffusers, cls).__module__)
    for prediction_type in prediction_types:
      config = {**BASE, **extra, "prediction_type": prediction_type}
      sched = getattr(diffusers, cls).from_config(config)
      sched.set_timesteps(**{kind: values})
      model = mixture_model(sched.alphas_cumprod.numpy(), prediction_type)
      seen, drawn, x = run_loop(sched, module, model, noise * sched.init_noise_sigma, sched.timesteps, options)
      key = f"{name}/{prediction_type}"
      n = len(values) - (kind == "sigmas")
      record(key, seen, drawn, x, n)
      index.append({"key": key, "sampler": sampler, "class": cls, "config": config, "options": options,
                    kind: values, "strength": 1.0})
  for name, strength in IMG2IMG:
    _, sampler, cls, extra, options, kind, values, _ = next(c for c in CASES if c[0] == name)
    module = importlib.import_module(getattr(diffusers, cls).__module__)
    config = {**BASE, **extra, "prediction_type": "epsilon"}
    sched = getattr(diffusers, cls).from_config(config)
    if sampler == "lcm":  # LatentConsistencyModelImg2ImgPipeline
      sched.set_timesteps(**{kind: values}, strength=strength)
      timesteps = sched.timesteps
    else:  # retrieve_timesteps(timesteps=...), then StableDiffusionImg2ImgPipeline.get_timesteps
      sched.set_timesteps(**{kind: values})
      steps = len(sched.timesteps)
      start = max(steps - min(int(steps * strength), steps), 0)
      timesteps = sched.timesteps[start * sched.order:]
      sched.set_begin_index(start * sched.order)
    model = mixture_model(sched.alphas_cumprod.numpy(), "epsilon")
    x = sched.add_noise(init, noise, timesteps[:1].repeat(noise.shape[0]))
    denoised = []
    if sampler == "lcm":
      # The pipeline decodes the last step's `denoised`: with custom timesteps and strength < 1, LCMScheduler counts
      # the steps before the strength cut (num_inference_steps), so its last prev_sample is re-noised.
      step = sched.step
      sched.step = lambda *a, **k: (lambda o: (denoised.append(o.denoised), o)[1])(step(*a, **k))
    seen, drawn, x = run_loop(sched, module, model, x, timesteps, options)
    x = denoised[-1] if denoised else x
    key = f"img2img/{name}"
    record(key, seen, drawn, x, len(seen))
    index.append({"key": key, "sampler": sampler, "class": cls, "config": config, "options": options,
                  kind: values, "strength": strength})
  arrays["index"] = np.array(json.dumps({"mixture": MIX, "cases": index}))
  np.savez_compressed(OUT, **arrays)
  print(f"wrote {OUT}: {len(index)} cases, {os.path.getsize(OUT)} bytes")


if __name__ == "__main__":
  main()
