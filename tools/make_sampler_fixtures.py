"""Regenerate tests/fixtures/samplers.npz: diffusers schedulers run on an analytic model.

  pip install torch==2.13.0 diffusers && python tools/make_sampler_fixtures.py

The data distribution is a per-element two-component Gaussian mixture, whose exact denoiser
E[x0 | x_t] is known in closed form, so the fixture isolates the sampler from any network. For every
(sampler, prediction type, step count) the fixture holds the timesteps diffusers handed to the model
and the final sample, from the same standard-normal noise. For stochastic samplers the noise each
step draws (diffusers' `randn_tensor`, patched here to record it) is stored too, so sdjax can be fed
the same noise (`sample(..., step_noise=...)`) and compared exactly. torch is needed only here.
"""
import importlib
import json
import os

import numpy as np
import torch
import diffusers

MIX = {"weights": [0.3, 0.7], "means": [-0.6, 0.5], "stds": [0.15, 0.3]}
BASE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False, "timestep_spacing": "leading"}
ZSNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
CASES = [  # (name, diffusers class, extra config[, step kwargs = sdjax options])
    ("ddim", "DDIMScheduler", {}),
    ("ddim_eta1", "DDIMScheduler", {}, {"eta": 1.0}),
    ("ddpm", "DDPMScheduler", {}),
    ("euler_a", "EulerAncestralDiscreteScheduler", {}),
    ("lms", "LMSDiscreteScheduler", {}),
    ("pndm", "PNDMScheduler", {"skip_prk_steps": True}),
    ("pndm_trailing", "PNDMScheduler", {"skip_prk_steps": True, "timestep_spacing": "trailing"}),
    ("lms_karras", "LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    ("dpmpp_2m_sde", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    ("unipc", "UniPCMultistepScheduler", {}),
    ("unipc_karras", "UniPCMultistepScheduler", {"use_karras_sigmas": True}),
    ("unipc_linspace", "UniPCMultistepScheduler", {"timestep_spacing": "linspace"}),
    ("euler", "EulerDiscreteScheduler", {}),
    ("euler_karras", "EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    ("euler_trailing", "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    ("heun", "HeunDiscreteScheduler", {}),
    ("heun_karras", "HeunDiscreteScheduler", {"use_karras_sigmas": True}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {}),
    ("dpmpp_2m_karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    ("dpmpp_2m_trailing", "DPMSolverMultistepScheduler", {"timestep_spacing": "trailing"}),
    # Zero terminal SNR (Lin et al. 2023): trailing spacing and v-prediction, as that paper prescribes.
    ("ddim_zsnr", "DDIMScheduler", ZSNR),
    ("euler_zsnr", "EulerDiscreteScheduler", ZSNR),
    ("dpmpp_2m_zsnr", "DPMSolverMultistepScheduler", ZSNR),
    ("unipc_zsnr", "UniPCMultistepScheduler", ZSNR),
]
OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "samplers.npz")


def mixture_model(alphas_cumprod: np.ndarray, prediction_type: str):
  """Exact model output at (possibly fractional) t; abar interpolated linearly between integer steps."""
  ac = alphas_cumprod.astype(np.float64)
  w, mu, sd = (np.array(MIX[k], np.float64) for k in ("weights", "means", "stds"))

  def model(x: torch.Tensor, t: float) -> torch.Tensor:
    abar = np.interp(float(t), np.arange(len(ac)), ac)
    a, b = np.sqrt(abar), np.sqrt(1 - abar)
    xs = x.double().numpy()[..., None]
    var = abar * sd**2 + (1 - abar)
    logp = np.log(w) - 0.5 * np.log(var) - 0.5 * (xs - a * mu) ** 2 / var
    r = np.exp(logp - logp.max(-1, keepdims=True))
    r /= r.sum(-1, keepdims=True)
    x0 = (r * (mu + a * sd**2 * (xs - a * mu) / var)).sum(-1)
    eps = (xs[..., 0] - a * x0) / b
    out = {"epsilon": eps, "v_prediction": a * eps - b * x0, "sample": x0}[prediction_type]
    return torch.from_numpy(out.astype(np.float32))

  return model


SAMPLER_OF = {"DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "EulerDiscreteScheduler": "euler",
              "EulerAncestralDiscreteScheduler": "euler_a", "HeunDiscreteScheduler": "heun",
              "LMSDiscreteScheduler": "lms", "PNDMScheduler": "pndm", "UniPCMultistepScheduler": "unipc"}


def sampler_name(cls, config):
  if cls == "DPMSolverMultistepScheduler":
    return "dpmpp_2m_sde" if config.get("algorithm_type") == "sde-dpmsolver++" else "dpmpp_2m"
  return SAMPLER_OF[cls]


def run_loop(sched, module, model, x, timesteps, step_kwargs, after_step=None):
  """diffusers' denoising loop; records the timesteps seen and the noise each step draws (by step index)."""
  seen, drawn = [], {}
  gen = torch.Generator().manual_seed(1)

  def recording_randn(shape, *args, **kwargs):
    z = torch.randn(shape, generator=gen)
    drawn[len(seen) - 1] = z.numpy()
    return z

  module.randn_tensor = recording_randn
  for i, t in enumerate(timesteps):
    seen.append(float(t))
    out = model(sched.scale_model_input(x, t), float(t))
    x = sched.step(out, t, x, **step_kwargs).prev_sample
    if after_step is not None:
      x = after_step(i, x)
  return seen, drawn, x


def main():
  noise = torch.randn((16, 2, 2, 1), generator=torch.Generator().manual_seed(0))
  arrays = {"noise": noise.numpy()}
  index = []
  for name, cls, extra, *step_kwargs in CASES:
    step_kwargs = step_kwargs[0] if step_kwargs else {}
    module = importlib.import_module(getattr(diffusers, cls).__module__)
    zero_snr = extra.get("rescale_betas_zero_snr", False)  # epsilon is undefined at abar_T = 0
    for prediction_type in ("v_prediction",) if zero_snr else ("epsilon", "v_prediction"):
      for steps in (10, 25):
        config = {**BASE, **extra, "prediction_type": prediction_type}
        sched = getattr(diffusers, cls).from_config(config)
        sched.set_timesteps(steps)
        model = mixture_model(sched.alphas_cumprod.numpy(), prediction_type)
        x = noise * sched.init_noise_sigma
        seen, drawn, x = run_loop(sched, module, model, x, sched.timesteps, step_kwargs)
        key = f"{name}/{prediction_type}/{steps}"
        arrays[key + "/timesteps"] = np.array(seen, np.float32)
        arrays[key + "/final"] = x.numpy()
        if drawn:
          arrays[key + "/step_noise"] = np.stack([drawn.get(i, np.zeros_like(noise.numpy())) for i in range(steps)])
        index.append({"key": key, "mode": "sample", "sampler": sampler_name(cls, config), "class": cls,
                      "config": config, "options": step_kwargs, "steps": steps, "strength": 1.0})
  # img2img (strength 0.6) and inpainting (mask blending), epsilon, 25 steps.
  init = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, noise.shape).astype(np.float32))
  mask = torch.zeros_like(noise)
  mask[:, :, 1:] = 1.0  # generate the right half, keep the left half
  arrays["init_image"], arrays["inpaint_mask"] = init.numpy(), mask.numpy()
  for mode, names in (("img2img", ("ddim", "ddpm", "euler", "euler_a", "heun", "lms", "dpmpp_2m", "dpmpp_2m_sde",
                                   "unipc")),
                      ("inpaint", ("ddim", "ddpm", "euler", "euler_a", "lms", "pndm", "dpmpp_2m", "unipc"))):
    for name, cls, extra, *step_kwargs in CASES:
      if name not in names:
        continue
      step_kwargs = step_kwargs[0] if step_kwargs else {}
      module = importlib.import_module(getattr(diffusers, cls).__module__)
      config = {**BASE, **extra, "prediction_type": "epsilon"}
      sched = getattr(diffusers, cls).from_config(config)
      steps, strength = 25, (0.6 if mode == "img2img" else 1.0)
      sched.set_timesteps(steps)
      model = mixture_model(sched.alphas_cumprod.numpy(), "epsilon")
      start = max(steps - min(int(steps * strength), steps), 0)
      timesteps = sched.timesteps[start * sched.order:]
      if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start * sched.order)
      if mode == "img2img":
        x = sched.add_noise(init, noise, timesteps[:1].repeat(noise.shape[0]))
      else:
        x = noise * sched.init_noise_sigma
      def blend(i, x):  # StableDiffusionInpaintPipeline, 4-channel U-Net branch
        known = init
        if i < len(timesteps) - 1:
          known = sched.add_noise(init, noise, timesteps[i + 1:i + 2])
        return (1 - mask) * known + mask * x

      seen, drawn, x = run_loop(sched, module, model, x, timesteps, step_kwargs,
                                after_step=blend if mode == "inpaint" else None)
      key = f"{mode}/{name}"
      arrays[key + "/timesteps"] = np.array(seen, np.float32)
      arrays[key + "/final"] = x.numpy()
      if drawn:
        arrays[key + "/step_noise"] = np.stack([drawn.get(i, np.zeros_like(noise.numpy()))
                                                for i in range(len(timesteps))])
      index.append({"key": key, "mode": mode, "sampler": sampler_name(cls, config), "class": cls,
                    "config": config, "options": step_kwargs, "steps": steps, "strength": strength})
  arrays["index"] = np.array(json.dumps({"mixture": MIX, "cases": index,
                                         "diffusers": diffusers.__version__, "torch": torch.__version__}))
  np.savez_compressed(OUT, **arrays)
  print(f"wrote {len(index)} cases to {OUT}")


if __name__ == "__main__":
  main()
