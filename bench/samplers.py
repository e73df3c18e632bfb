"""Sampler accuracy versus model evaluations, compile time and per-step overhead.

  python bench/samplers.py [--samples 200000] [--quick] [--spacing leading|trailing|linspace]

1. Accuracy: every sampler, in Stable Diffusion 1.5's scheduler configuration (scaled_linear betas,
   "leading" spacing, steps_offset 1, epsilon), samples the analytic Gaussian-mixture model
   (sdjax.samplers.analytic: exact denoiser, no network) from N standard-normal draws. The error is the
   Wasserstein-1 distance between the samples and the true mixture (computed from its CDF), so
   deterministic and stochastic samplers are measured alike; the row "exact draws" is the distance of N
   direct draws from the mixture (the statistical floor), and "exact ODE from t = 999" that of the ODE's
   exact solution from standard-normal noise at the largest training sigma (the limit of the deterministic
   samplers that start there: Karras and AYS steps). Step counts are chosen so that the number of
   model evaluations (NFE) matches: heun uses (NFE + 1) / 2 steps, pndm NFE - 1.
2. Cost: with the default config's U-Net (batch 64, 28x28x1) as the model, 25 steps: compile time of the
   jitted sampler, its run time, and the per-step overhead of the sampler beyond the model call
   (sampler time / (NFE x model-call time) - 1, the model call timed in the same lax.scan harness).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sdjax import samplers, schedules  # noqa: E402
from sdjax.samplers import analytic  # noqa: E402

SD15 = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
            timestep_spacing="leading")
VARIANTS = [  # (label, sampler, schedule changes)
    ("ddpm", "ddpm", {}), ("ddim", "ddim", {}), ("pndm", "pndm", {}), ("lms", "lms", {}), ("euler", "euler", {}),
    ("euler_a", "euler_a", {}), ("heun", "heun", {}), ("dpmpp_2m", "dpmpp_2m", {}),
    ("dpmpp_2m karras", "dpmpp_2m", {"use_karras_sigmas": True}), ("dpmpp_2m_sde", "dpmpp_2m_sde", {}),
    ("unipc", "unipc", {}),
    # The other diffusers schedulers (issue 16): higher orders, singlestep, KDPM2, DEIS, PRK warm-up.
    ("lms karras", "lms", {"use_karras_sigmas": True}), ("kdpm2", "kdpm2", {}),
    ("kdpm2 karras", "kdpm2", {"use_karras_sigmas": True}), ("dpmpp_3m", "dpmpp_3m", {}),
    ("dpmpp_3m karras", "dpmpp_3m", {"use_karras_sigmas": True}), ("dpmpp_2s", "dpmpp_2s", {}),
    ("dpmpp_3s karras", "dpmpp_3s", {"use_karras_sigmas": True}), ("unipc karras", "unipc", {"use_karras_sigmas": True}),
    ("unipc_3 karras", "unipc_3", {"use_karras_sigmas": True}), ("deis", "deis", {}), ("deis_3", "deis_3", {}),
    ("deis_3 karras", "deis_3", {"use_karras_sigmas": True}), ("pndm_prk", "pndm_prk", {}),
    # Beyond diffusers: iPNDM, and published step schedules (Karras over the full sigma range, Align Your
    # Steps' SD 1.5 schedule) with several solvers.
    ("ipndm", "ipndm", {}), ("ipndm_v", "ipndm_v", {}), ("ipndm_karras", "ipndm_karras", {}),
    ("ipndm_v_karras", "ipndm_v_karras", {}), ("euler_ays", "euler_ays", {}), ("dpmpp_2m_ays", "dpmpp_2m_ays", {}),
    ("ipndm_ays", "ipndm_ays", {}), ("ipndm_v_ays", "ipndm_v_ays", {}),
]
NFES = (5, 6, 8, 10, 15, 20, 50, 100)


def steps_for(sampler, nfe):
  """Steps that spend `nfe` model evaluations (None: not possible, e.g. pndm_prk below 13)."""
  steps = {"heun": (nfe + 1) // 2, "kdpm2": (nfe + 1) // 2, "pndm": nfe - 1, "pndm_prk": nfe - 9}.get(sampler, nfe)
  return steps if steps >= (4 if sampler == "pndm_prk" else 1) else None


def w1(samples: np.ndarray) -> float:
  """Wasserstein-1 distance to the mixture: integral of |F_empirical - F| over a fine grid."""
  grid = np.linspace(-2.5, 2.5, 20001)
  emp = np.searchsorted(np.sort(samples), grid, side="right") / len(samples)
  return float(np.sum(np.abs(emp - analytic.mixture_cdf(grid))) * (grid[1] - grid[0]))


def accuracy(n: int, nfes, only=()) -> None:
  noise = jax.random.normal(jax.random.key(0), (n,))
  print(f"\n## Wasserstein-1 error vs NFE ({n:,} samples; SD 1.5 schedule config with "
        f"{SD15['timestep_spacing']} spacing, {SD15.get('prediction_type', 'epsilon')}"
        f"{', zero terminal SNR' if SD15.get('rescale_betas_zero_snr') else ''})\n")
  print("| sampler | " + " | ".join(f"NFE {k}" for k in nfes) + " |")
  print("|---|" + "---|" * len(nfes))
  for label, name, changes in VARIANTS:
    if only and label not in only:
      continue
    s = schedules.make_schedule(**SD15, **changes)
    model = analytic.mixture_model(s)
    row = []
    for nfe in nfes:
      steps = steps_for(name, nfe)
      if steps is None:
        row.append("–")
        continue
      fn = jax.jit(lambda z, r: samplers.sample(model, z, schedule=s, sampler=name, num_steps=steps, rng=r))
      row.append(f"{w1(np.asarray(fn(noise, jax.random.key(1)), np.float64)):.4f}")
    print(f"| {label} | " + " | ".join(row) + " |", flush=True)
  s = schedules.make_schedule(**SD15)
  if not s.rescale_betas_zero_snr:
    sigma_max = float(schedules.train_sigmas(s)[-1])
    ode = w1(exact_ode(np.asarray(noise, np.float64) * np.sqrt(sigma_max**2 + 1), sigma_max))
    print(f"| exact ODE from t = 999 | " + " | ".join(f"{ode:.4f}" for _ in nfes) + " |")
  exact = np.random.default_rng(0)
  comp = exact.choice(2, size=n, p=analytic.MIXTURE["weights"])
  draws = exact.normal(np.array(analytic.MIXTURE["means"])[comp], np.array(analytic.MIXTURE["stds"])[comp])
  print(f"| exact draws (floor) | " + " | ".join(f"{w1(draws):.4f}" for _ in nfes) + " |")


def exact_ode(x: np.ndarray, sigma_max: float, steps: int = 200, sigma_end: float = 1e-4) -> np.ndarray:
  """The probability-flow ODE solved (float64 RK4 in log sigma, `steps` steps) from x at sigma_max down to
  sigma_end, where x is within sigma_end^2 / std^2 of its sigma = 0 limit: the result every deterministic
  sampler converges to when it starts from standard-normal noise at t = 999 (Karras / AYS steps)."""
  w, mu, sd = (np.array(analytic.MIXTURE[k], np.float64) for k in ("weights", "means", "stds"))

  def f(x, u):  # dx / dlog(sigma) = x - D(x, sigma)
    var = sd**2 + np.exp(2 * u)
    logp = np.log(w) - 0.5 * np.log(var) - 0.5 * (x[:, None] - mu) ** 2 / var
    r = np.exp(logp - logp.max(1, keepdims=True))
    return x - (r / r.sum(1, keepdims=True) * (mu + sd**2 / var * (x[:, None] - mu))).sum(1)

  u, h = np.log(sigma_max), (np.log(sigma_end) - np.log(sigma_max)) / steps
  for _ in range(steps):
    k1 = f(x, u)
    k2 = f(x + h / 2 * k1, u + h / 2)
    k3 = f(x + h / 2 * k2, u + h / 2)
    x, u = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + f(x + h * k3, u + h)), u + h
  return x


def cost(steps: int = 25, batch: int = 64) -> None:
  import importlib.util
  from flax import linen as nn
  from sdjax.models import UNet, UNetConfig
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("default", os.path.join(root, "configs", "default.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = UNetConfig.from_dict(module.get_config().model.to_dict())
  unet = UNet(cfg)
  labels = jnp.arange(batch) % 10
  x = jax.random.normal(jax.random.key(0), (batch, 28, 28, 1))
  params = nn.meta.unbox(unet.init(jax.random.key(0), x, jnp.zeros((batch,)), class_labels=labels))["params"]
  model = lambda x, t: unet.apply({"params": params}, x, t, class_labels=labels)
  s = schedules.make_schedule(**SD15)

  def timed(fn, *args, reps=3):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))
    t0 = time.perf_counter()
    for _ in range(reps):
      jax.block_until_ready(compiled(*args))
    return compile_s, (time.perf_counter() - t0) / reps

  def model_only(x):  # the same number of model calls in the same scan harness, no sampler arithmetic
    def body(x, t):
      return model(x, jnp.full((batch,), t, jnp.float32)) * 0.5 + x * 0.5, None
    return jax.lax.scan(body, x, jnp.linspace(999.0, 1.0, steps))[0]

  _, call_s = timed(model_only, x)
  call_s /= steps
  print(f"\n## Cost with the default U-Net (919,921 params), batch {batch}, {steps} steps, this CPU\n")
  print(f"One model call in a lax.scan: {call_s * 1000:.1f} ms.\n")
  print("| sampler | NFE | compile (s) | run (s) | overhead per model call |")
  print("|---|---|---|---|---|")
  for label, name, changes in VARIANTS:
    sch = schedules.make_schedule(**SD15, **changes)
    nfe = {"heun": 2 * steps - 1, "pndm": steps + 1}.get(name, steps)
    compile_s, run_s = timed(lambda z, r: samplers.sample(model, z, schedule=sch, sampler=name, num_steps=steps,
                                                          rng=r), x, jax.random.key(1))
    print(f"| {label} | {nfe} | {compile_s:.2f} | {run_s:.2f} | {run_s / (nfe * call_s) - 1:+.1%} |", flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--samples", type=int, default=200_000)
  p.add_argument("--quick", action="store_true", help="10k samples, NFE 10 and 20, no cost table")
  p.add_argument("--spacing", default="leading", choices=schedules.TIMESTEP_SPACINGS,
                 help="timestep spacing (SD 1.5 uses leading with steps_offset 1; the others use offset 0)")
  p.add_argument("--zero-snr", action="store_true",
                 help="rescale betas to zero terminal SNR (Lin et al. 2023): trailing spacing, v-prediction")
  p.add_argument("--no-cost", action="store_true", help="skip the cost table")
  p.add_argument("--only", default="", help="comma-separated row labels to run (default: all)")
  args = p.parse_args()
  if args.spacing != "leading":
    SD15.update(timestep_spacing=args.spacing, steps_offset=0)
  if args.zero_snr:
    SD15.update(timestep_spacing="trailing", steps_offset=0, rescale_betas_zero_snr=True,
                prediction_type="v_prediction")
  only = tuple(x.strip() for x in args.only.split(",") if x.strip())
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {jax.device_count()} device(s)")
  if args.quick:
    accuracy(10_000, (10, 20), only)
    return
  accuracy(args.samples, NFES, only)
  if not args.no_cost:
    cost()


if __name__ == "__main__":
  main()
