"""Regenerate tests/fixtures/samplers_dpmpp_options.npz: diffusers' DPMSolverMultistepScheduler options on the
analytic model.

  pip install torch==2.13.0 "diffusers==0.42.*" scipy && python tools/make_dpmpp_options_fixtures.py

The mixture model and loop of tools/make_sampler_fixtures.py, SD's betas and the class's other defaults, with:
solver_order 1 / 2 / 3 (ODE and SDE), lower_order_final=False, final_sigmas_type="sigma_min", euler_at_final,
use_lu_lambdas (rounded timesteps, and unrounded for squaredcos_cap_v2), use_exponential_sigmas, use_beta_sigmas,
dynamic thresholding (on a wider mixture, so that it clips), zero terminal SNR, and img2img (the first
n - int(n * strength) steps skipped, `set_begin_index`). Also scipy's Beta(0.6, 0.6) ppf on a grid, float64, the
reference for sdjax's scipy-free inverse CDF. torch's float32 sqrt is made correctly rounded, as sdjax's (see
tools/make_schedule_fixtures.py: MKL's is 1 ulp off for some inputs on some CPUs), so that the sigmas are comparable
bit for bit on any host.
"""
import importlib
import json
import os
import sys

import numpy as np
import scipy.stats
import torch
import diffusers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_sampler_fixtures  # noqa: E402
from make_sampler_fixtures import mixture_model, run_loop  # noqa: E402

CLS = "DPMSolverMultistepScheduler"
_POW, _SQRT, _TORCH_SQRT = torch.Tensor.__pow__, torch.Tensor.sqrt, torch.sqrt
SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
SDE = {"algorithm_type": "sde-dpmsolver++"}
SIGMA_MIN = {"final_sigmas_type": "sigma_min"}
# Wide enough that the 90% quantile of |x0| exceeds 1 (so the threshold s moves within [1, 1.3]).
WIDE = {"weights": [0.5, 0.5], "means": [-1.1, 1.0], "stds": [0.3, 0.4]}
THRESH = {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.3}
CASES = [  # (name, extra config, prediction types, step counts[, mixture])
    ("1m", {"solver_order": 1}, ("epsilon",), (10,)),
    ("1m_sde", {"solver_order": 1, **SDE}, ("epsilon",), (10,)),
    ("3m", {"solver_order": 3}, ("epsilon", "v_prediction"), (10,)),
    ("3m", {"solver_order": 3}, ("epsilon",), (25,)),
    ("3m_sde", {"solver_order": 3, **SDE}, ("epsilon", "v_prediction"), (10,)),
    ("3m_no_lower_final", {"solver_order": 3, "lower_order_final": False}, ("epsilon",), (10,)),
    ("2m_sigma_min", {**SIGMA_MIN}, ("epsilon",), (10, 25)),
    ("3m_sigma_min", {"solver_order": 3, **SIGMA_MIN}, ("epsilon",), (25,)),
    ("3m_sigma_min_no_lower_final", {"solver_order": 3, **SIGMA_MIN, "lower_order_final": False}, ("epsilon",), (10,)),
    ("3m_sde_sigma_min_euler_final", {"solver_order": 3, **SDE, **SIGMA_MIN, "euler_at_final": True}, ("epsilon",),
     (25,)),
    ("2m_lu", {"use_lu_lambdas": True}, ("epsilon",), (25,)),
    ("3m_lu_cosine", {"solver_order": 3, "use_lu_lambdas": True, "beta_schedule": "squaredcos_cap_v2"}, ("epsilon",),
     (10,)),
    ("2m_exponential", {"use_exponential_sigmas": True}, ("epsilon",), (25,)),
    ("3m_beta", {"solver_order": 3, "use_beta_sigmas": True}, ("epsilon",), (10, 25)),
    ("2m_sde_beta", {"use_beta_sigmas": True, **SDE}, ("epsilon",), (10,)),
    ("3m_karras", {"solver_order": 3, "use_karras_sigmas": True}, ("epsilon",), (10,)),
    ("3m_zsnr", {"solver_order": 3, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, ("v_prediction",),
     (10,)),
    ("2m_threshold", {**THRESH}, ("epsilon",), (10,), WIDE),
    ("3m_threshold", {"solver_order": 3, **THRESH}, ("v_prediction",), (10,), WIDE),
    ("2m_threshold_clip", {"thresholding": True}, ("epsilon",), (10,), WIDE),
]
# (name, extra config, steps, strength): 25 steps at 0.6 start at step 10.
IMG2IMG = [("3m", {"solver_order": 3}, 25, 0.6), ("3m_sde", {"solver_order": 3, **SDE}, 25, 0.6),
           ("2m_beta_sigma_min", {"use_beta_sigmas": True, **SIGMA_MIN}, 25, 0.6)]
OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures",
                   "samplers_dpmpp_options.npz")


def _ieee_sqrt(t):
  if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cpu":
    return torch.from_numpy(np.asarray(np.sqrt(t.detach().numpy()), np.float32))
  return _TORCH_SQRT(t)


def _ieee_pow(t, e):
  return _ieee_sqrt(t) if isinstance(e, float) and e == 0.5 else _POW(t, e)


def set_ieee_sqrt():
  """torch's float32 sqrt (tensor.sqrt(), torch.sqrt, tensor ** 0.5) correctly rounded, as
  tools/make_schedule_fixtures.py's "ieee" mode (also for the 0-d tensors of the solver's step)."""
  torch.Tensor.__pow__, torch.Tensor.sqrt, torch.sqrt = _ieee_pow, _ieee_sqrt, _ieee_sqrt


def sampler_name(config):
  return f"dpmpp_{config.get('solver_order', 2)}m" + ("_sde" if config.get("algorithm_type") == SDE["algorithm_type"]
                                                       else "")


def main():
  set_ieee_sqrt()
  noise = torch.randn((16, 2, 2, 1), generator=torch.Generator().manual_seed(0))
  init = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, noise.shape).astype(np.float32))
  arrays, index = {"noise": noise.numpy(), "init_image": init.numpy()}, []
  module = importlib.import_module(getattr(diffusers, CLS).__module__)
  base_mix = dict(make_sampler_fixtures.MIX)
  runs = [(name, extra, pt, steps, 1.0, mix[0] if mix else base_mix)
          for name, extra, pts, counts, *mix in CASES for pt in pts for steps in counts]
  runs += [(f"img2img/{name}", extra, "epsilon", steps, strength, base_mix) for name, extra, steps, strength in IMG2IMG]
  for name, extra, prediction_type, steps, strength, mix in runs:
    config = {**SD_BETAS, **extra, "prediction_type": prediction_type}
    sched = getattr(diffusers, CLS).from_config(config)
    sched.set_timesteps(steps)
    make_sampler_fixtures.MIX.update(mix)  # mixture_model reads it when called
    model = mixture_model(sched.alphas_cumprod.numpy(), prediction_type)
    make_sampler_fixtures.MIX.update(base_mix)
    timesteps, x = sched.timesteps, noise * sched.init_noise_sigma
    if strength < 1.0:
      start = max(steps - min(int(steps * strength), steps), 0)
      timesteps = sched.timesteps[start * sched.order:]
      sched.set_begin_index(start * sched.order)
      x = sched.add_noise(init, noise, timesteps[:1].repeat(noise.shape[0]))
    seen, drawn, x = run_loop(sched, module, model, x, timesteps, {})
    key = f"{name}/{prediction_type}/{steps}"
    arrays[key + "/timesteps"] = np.array(seen, np.float32)
    arrays[key + "/sigmas"] = sched.sigmas.numpy()
    arrays[key + "/final"] = x.numpy()
    if drawn:
      arrays[key + "/step_noise"] = np.stack([drawn.get(i, np.zeros_like(noise.numpy())) for i in range(len(seen))])
    index.append({"key": key, "sampler": sampler_name(config), "class": CLS, "config": config, "steps": steps,
                  "strength": strength, "mixture": mix, "stochastic": bool(drawn)})
  p = np.concatenate([np.linspace(0, 1, 1001), np.logspace(-12, -1, 45), 1 - np.logspace(-12, -1, 45)])
  arrays["beta_ppf/p"], arrays["beta_ppf/x"] = p, scipy.stats.beta.ppf(p, 0.6, 0.6)
  arrays["index"] = np.array(json.dumps({"cases": index, "diffusers": diffusers.__version__, "torch": torch.__version__,
                                         "scipy": scipy.__version__, "torch_sqrt": "ieee"}))
  np.savez_compressed(OUT, **arrays)
  print(f"wrote {len(index)} cases to {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
  main()
