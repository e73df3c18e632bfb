"""Regenerate tests/fixtures/samplers_edm.npz: diffusers' EDM schedulers (EDMEulerScheduler,
EDMDPMSolverMultistepScheduler) run on an analytic model in EDM form.

  pip install torch==2.13.0 "diffusers==0.42.*" && python tools/make_edm_fixtures.py

The data is the per-element Gaussian mixture of tools/make_sampler_fixtures.py, noised in sigma space
(x = x0 + sigma eps, Karras et al. 2022). Its exact denoiser D(x, sigma) = E[x0 | x] is known in closed form; the
model is called as an EDM network is (diffusers' pipelines): with c_in x and c_noise = 0.25 log sigma, and returns
the raw output F with D = c_skip x + c_out F for the config's sigma_data and prediction type. For each case the
fixture holds the timesteps (c_noise) handed to the model, the sigmas, the final sample and, for the SDE solver, the
noise each step draws. torch is needed only here.
"""
import importlib
import json
import os
import sys

import numpy as np
import torch
import diffusers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_sampler_fixtures import MIX, run_loop  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures",
                   "samplers_edm.npz")
EULER, DPM = "EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"
EXP = {"sigma_schedule": "exponential"}
ALL = (("epsilon", 10), ("epsilon", 25), ("v_prediction", 10), ("v_prediction", 25))
EPS10, SOME = (("epsilon", 10),), (("epsilon", 10), ("epsilon", 25))
CASES = [  # (name, class, sdjax sampler, extra config, (prediction type, steps) runs)
    ("euler", EULER, "edm_euler", {}, ALL),
    ("euler_exp", EULER, "edm_euler", EXP, SOME),
    ("euler_sigma_min", EULER, "edm_euler", {"final_sigmas_type": "sigma_min"}, EPS10),
    ("euler_params", EULER, "edm_euler", {"sigma_min": 0.01, "sigma_max": 20.0, "sigma_data": 0.7, "rho": 5.0},
     (("v_prediction", 10),)),
    ("2m", DPM, "edm_dpmpp_2m", {}, ALL),
    ("2m_exp", DPM, "edm_dpmpp_2m", EXP, SOME),
    ("1m", DPM, "edm_dpmpp_1m", {"solver_order": 1}, EPS10),
    ("3m", DPM, "edm_dpmpp_3m", {"solver_order": 3}, SOME),
    ("2m_sde", DPM, "edm_dpmpp_2m_sde", {"algorithm_type": "sde-dpmsolver++"}, (("v_prediction", 10),)),
    ("1m_sde", DPM, "edm_dpmpp_1m_sde", {"algorithm_type": "sde-dpmsolver++", "solver_order": 1}, EPS10),
    ("3m_no_lof", DPM, "edm_dpmpp_3m", {"solver_order": 3, "lower_order_final": False}, EPS10),
    ("2m_sigma_min", DPM, "edm_dpmpp_2m", {"final_sigmas_type": "sigma_min"}, EPS10),
    ("2m_euler_at_final", DPM, "edm_dpmpp_2m", {"euler_at_final": True, "final_sigmas_type": "sigma_min"},
     (("epsilon", 25),)),
    ("2m_threshold", DPM, "edm_dpmpp_2m", {"thresholding": True, "dynamic_thresholding_ratio": 0.9,
                                           "sample_max_value": 1.0}, EPS10),
    ("2m_params", DPM, "edm_dpmpp_2m", {"sigma_min": 0.01, "sigma_max": 20.0, "sigma_data": 0.7, "rho": 5.0,
                                        "algorithm_type": "deis", "solver_type": "bh2",
                                        "final_sigmas_type": "sigma_min"}, (("v_prediction", 10),)),
]
IMG2IMG = ("euler", "2m", "2m_sde")


def edm_mixture_model(sigma_data: float, prediction_type: str):
  """The raw network output F(c_in x, c_noise) of the exact denoiser of the mixture in sigma space."""
  w, mu, sd = (np.array(MIX[k], np.float64) for k in ("weights", "means", "stds"))

  def model(x_in: torch.Tensor, c_noise: float) -> torch.Tensor:
    sigma = np.exp(4.0 * float(c_noise))
    x = x_in.double().numpy() * np.sqrt(sigma**2 + sigma_data**2)  # undo c_in
    xs = x[..., None]
    var = sd**2 + sigma**2
    logp = np.log(w) - 0.5 * np.log(var) - 0.5 * (xs - mu) ** 2 / var
    r = np.exp(logp - logp.max(-1, keepdims=True))
    r /= r.sum(-1, keepdims=True)
    d = (r * (mu + sd**2 / var * (xs - mu))).sum(-1)
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / np.sqrt(sigma**2 + sigma_data**2)
    f = (d - c_skip * x) / (c_out if prediction_type == "epsilon" else -c_out)
    return torch.from_numpy(f.astype(np.float32))

  return model


def main():
  noise = torch.randn((16, 2, 2, 1), generator=torch.Generator().manual_seed(0))
  init = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, noise.shape).astype(np.float32))
  arrays = {"noise": noise.numpy(), "init_image": init.numpy()}
  index = []
  runs = [(name, cls, sampler, extra, p, steps, 1.0) for name, cls, sampler, extra, combos in CASES
          for p, steps in combos]
  runs += [(name, cls, sampler, extra, "epsilon", 25, 0.6) for name, cls, sampler, extra, *_ in CASES
           if name in IMG2IMG]
  for name, cls, sampler, extra, prediction_type, steps, strength in runs:
    klass = getattr(diffusers, cls)
    module = importlib.import_module(klass.__module__)
    config = {**extra, "prediction_type": prediction_type}
    sched = klass.from_config(config)
    sched.set_timesteps(steps)
    sigmas = sched.sigmas.numpy().copy()
    model = edm_mixture_model(sched.config.sigma_data, prediction_type)
    # img2img as diffusers' img2img pipelines: skip the first steps, noise the image to the first remaining sigma.
    start = max(steps - min(int(steps * strength), steps), 0)
    timesteps = sched.timesteps[start * sched.order:]
    if strength < 1.0:
      sched.set_begin_index(start * sched.order)
      x = sched.add_noise(init, noise, timesteps[:1].repeat(noise.shape[0]))
    else:
      x = noise * sched.init_noise_sigma
    seen, drawn, x = run_loop(sched, module, model, x, timesteps, {})
    key = f"{name}/{prediction_type}/{steps}" + ("" if strength == 1.0 else f"/img2img{strength}")
    arrays[key + "/timesteps"] = np.array(seen, np.float32)
    arrays[key + "/sigmas"] = sigmas
    arrays[key + "/final"] = x.numpy()
    if drawn:
      arrays[key + "/step_noise"] = np.stack([drawn.get(i, np.zeros_like(noise.numpy()))
                                              for i in range(len(timesteps))])
    index.append({"key": key, "sampler": sampler, "class": cls, "config": config, "steps": steps,
                  "strength": strength, "stochastic": bool(drawn)})
  arrays["index"] = np.array(json.dumps({"mixture": MIX, "cases": index, "diffusers": diffusers.__version__,
                                         "torch": torch.__version__}))
  np.savez_compressed(OUT, **arrays)
  print(f"wrote {len(index)} cases to {OUT}")


if __name__ == "__main__":
  main()
