"""Regenerate tests/fixtures/schedule_tables.npz: diffusers' schedule tables, for bit-exact comparison.

  /work/tvenv/bin/python tools/make_schedule_fixtures.py   (torch 2.13 CPU + diffusers 0.42; torch only here)

For every beta schedule (linear, scaled_linear, squaredcos_cap_v2, each with and without
rescale_betas_zero_snr, and an odd num_train_timesteps) the fixture holds diffusers' `betas` and
`alphas_cumprod`; for every scheduler class sdjax implements, every timestep spacing (leading with
steps_offset 0 and 1, trailing, linspace), with and without Karras sigmas where the class has them, and a
few step counts, it holds `set_timesteps`' `timesteps` and `sigmas` (DDPM: also `previous_timestep` of each
timestep; DDIM/PNDM: `final_alpha_cumprod` for both set_alpha_to_one).

Everything is recorded twice:
- "host": diffusers as it runs on this machine;
- "ieee": the same code with torch's float32 sqrt (`tensor.sqrt()`, `tensor ** 0.5`) replaced by the correctly
  rounded one (np.sqrt). torch computes these with MKL's vsSqrt, whose result depends on the CPU: its
  AVX2 kernel is correctly rounded, but the kernel MKL picks on AMD CPUs (seeded by the `rsqrtps`
  approximation) and its AVX-512 kernel are off by 1 ulp for some inputs. Only sigma tables and the
  zero-terminal-SNR rescaling take a sqrt; everything else is identical in both. Arrays are stored once by
  content, and "ieee" lists only the arrays that differ from "host".
Index: {"meta", "spacings", "samplers" (class -> sdjax sampler), "betas": [{"beta", "config", "host",
"ieee"}], "cases": [{"class", "beta", "spacing", "karras", "steps", "host", "ieee"}]}; a case's diffusers
config is the beta entry's config, its spacing, set_alpha_to_one=False, use_karras_sigmas=karras (and
skip_prk_steps=True for PNDM). Classes without rescale_betas_zero_snr (PNDM, LMS, Heun) have no zero-SNR
cases, and PNDM no 1-step cases (sdjax's pndm needs 2).
"""
import inspect
import json
import os
import platform

import numpy as np
import torch
import diffusers

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures",
                   "schedule_tables.npz")

BETAS = {
    "linear": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "cosine": {"beta_schedule": "squaredcos_cap_v2"},
    "linear_zsnr": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "rescale_betas_zero_snr": True},
    "scaled_linear_zsnr": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                           "rescale_betas_zero_snr": True},
    "cosine_zsnr": {"beta_schedule": "squaredcos_cap_v2", "rescale_betas_zero_snr": True},
    "scaled_linear_T777": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                           "num_train_timesteps": 777},
}
SPACINGS = {
    "leading": {"timestep_spacing": "leading", "steps_offset": 0},
    "leading_offset1": {"timestep_spacing": "leading", "steps_offset": 1},
    "trailing": {"timestep_spacing": "trailing", "steps_offset": 0},
    "linspace": {"timestep_spacing": "linspace", "steps_offset": 0},
}
# diffusers class -> (sdjax sampler, has use_karras_sigmas)
CLASSES = {
    "DDIMScheduler": ("ddim", False), "DDPMScheduler": ("ddpm", False), "PNDMScheduler": ("pndm", False),
    "EulerDiscreteScheduler": ("euler", True), "EulerAncestralDiscreteScheduler": ("euler_a", False),
    "HeunDiscreteScheduler": ("heun", True), "LMSDiscreteScheduler": ("lms", True),
    "DPMSolverMultistepScheduler": ("dpmpp_2m", True), "UniPCMultistepScheduler": ("unipc", True),
}
STEPS = (1, 4, 10, 25, 50)


class Pool:
  """1-D arrays stored once by content, concatenated per dtype ("pool/float32", "pool/int64"); a reference
  is "dtype:offset:length" into that array."""

  def __init__(self):
    self.refs, self.parts, self.sizes = {}, {}, {}

  def put(self, a) -> str:
    a = np.ascontiguousarray(a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)).reshape(-1)
    assert a.dtype in (np.float32, np.int64), a.dtype
    key = (a.dtype.name, a.tobytes())
    if key not in self.refs:
      offset = self.sizes.get(a.dtype.name, 0)
      self.parts.setdefault(a.dtype.name, []).append(a)
      self.sizes[a.dtype.name] = offset + len(a)
      self.refs[key] = f"{a.dtype.name}:{offset}:{len(a)}"
    return self.refs[key]

  def arrays(self):
    return {f"pool/{k}": np.concatenate(v) for k, v in self.parts.items()}


_pow, _sqrt, _torch_sqrt = torch.Tensor.__pow__, torch.Tensor.sqrt, torch.sqrt


def _ieee_sqrt(t):
  if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cpu":
    return torch.from_numpy(np.sqrt(t.detach().numpy()))
  return _torch_sqrt(t)


def _ieee_pow(t, e):
  if isinstance(e, float) and e == 0.5:
    return _ieee_sqrt(t)
  return _pow(t, e)


def set_sqrt(mode):
  if mode == "ieee":
    torch.Tensor.__pow__, torch.Tensor.sqrt, torch.sqrt = _ieee_pow, _ieee_sqrt, _ieee_sqrt
  else:
    torch.Tensor.__pow__, torch.Tensor.sqrt, torch.sqrt = _pow, _sqrt, _torch_sqrt


def make(cls_name, config):
  cls = getattr(diffusers, cls_name)
  accepted = set(inspect.signature(cls.__init__).parameters)
  missing = sorted(set(config) - accepted - {"num_train_timesteps"})
  # Karras and zero-SNR flags must reach the class (the fixture would otherwise record something else).
  assert not any(k in missing for k in ("use_karras_sigmas", "rescale_betas_zero_snr")), (cls_name, missing)
  return cls(**{k: v for k, v in config.items() if k in accepted})


def tables(cls_name, config, steps):
  sched = make(cls_name, config)
  sched.set_timesteps(steps)
  out = {"timesteps": sched.timesteps.clone()}
  if getattr(sched, "sigmas", None) is not None and cls_name not in ("DDIMScheduler", "DDPMScheduler",
                                                                       "PNDMScheduler"):
    out["sigmas"] = sched.sigmas.clone()
  if cls_name == "DDPMScheduler":
    out["prev"] = torch.tensor([int(sched.previous_timestep(t)) for t in sched.timesteps], dtype=torch.int64)
  return out


def sqrt_is_ieee() -> bool:
  x = torch.from_numpy(np.random.default_rng(0).uniform(1e-4, 1e4, 100000).astype(np.float32))
  return bool(np.array_equal(_sqrt(x).numpy(), np.sqrt(x.numpy())))


def main():
  pool = Pool()
  betas_index, cases = [], []
  for beta_name, beta in BETAS.items():
    zsnr = beta.get("rescale_betas_zero_snr", False)
    base = {"num_train_timesteps": 1000, **beta, "prediction_type": "v_prediction" if zsnr else "epsilon",
            "clip_sample": False}
    entry = {"beta": beta_name, "config": base}
    for mode in ("host", "ieee"):
      set_sqrt(mode)
      d = {}
      for set_alpha_to_one in (False, True):
        s = make("DDIMScheduler", {**base, "set_alpha_to_one": set_alpha_to_one})
        d["betas"], d["alphas_cumprod"] = pool.put(s.betas), pool.put(s.alphas_cumprod)
        d[f"final_alpha_cumprod/{set_alpha_to_one}"] = pool.put(s.final_alpha_cumprod.reshape(1))
      entry[mode] = d
    set_sqrt("host")
    entry["ieee"] = {k: v for k, v in entry["ieee"].items() if v != entry["host"][k]}
    betas_index.append(entry)
    for spacing_name, spacing in SPACINGS.items():
      for cls_name, (sampler, has_karras) in CLASSES.items():
        for karras in (False, True) if has_karras else (False,):
          config = {**base, **spacing, "set_alpha_to_one": False}
          if zsnr and "rescale_betas_zero_snr" not in inspect.signature(getattr(diffusers, cls_name)).parameters:
            continue  # PNDM, LMS and Heun have no zero-SNR rescaling in diffusers: no reference to compare to
          if karras:
            config["use_karras_sigmas"] = True
          if cls_name == "PNDMScheduler":
            config["skip_prk_steps"] = True
          for steps in STEPS:
            if cls_name == "PNDMScheduler" and steps < 2:
              continue  # sdjax's pndm needs 2 steps (its pseudo-Heun warm-up)
            case = {"class": cls_name, "beta": beta_name, "spacing": spacing_name, "karras": karras, "steps": steps}
            for mode in ("host", "ieee"):
              set_sqrt(mode)
              case[mode] = {k: pool.put(v) for k, v in tables(cls_name, config, steps).items()}
            set_sqrt("host")
            case["ieee"] = {k: v for k, v in case["ieee"].items() if v != case["host"][k]}  # only what differs
            cases.append(case)
  meta = {"diffusers": diffusers.__version__, "torch": torch.__version__, "numpy": np.__version__,
          "machine": platform.machine(), "cpu": _cpu_name(), "torch_cpu_capability":
          torch.backends.cpu.get_cpu_capability(), "torch_sqrt_is_ieee": sqrt_is_ieee()}
  arrays = pool.arrays()
  arrays["index"] = np.array(json.dumps({"meta": meta, "spacings": SPACINGS, "samplers": {k: v[0] for k, v in
                                                                                         CLASSES.items()},
                                         "betas": betas_index, "cases": cases}, separators=(",", ":")))
  np.savez_compressed(OUT, **arrays)
  n_diff = sum(bool(c["ieee"]) for c in cases)
  print(f"wrote {len(cases)} cases ({len(pool.refs)} distinct arrays; {n_diff} cases differ host vs ieee "
        f"sqrt) to {OUT}: {os.path.getsize(OUT) / 1024:.0f} KiB; meta {meta}")


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


if __name__ == "__main__":
  main()
