"""Consistency-distilled samplers, as diffusers' LCMScheduler and TCDScheduler.

lcm: multistep Latent Consistency Model sampling (Luo et al. 2023, Algorithm 1). At each timestep the model's
x0 prediction goes through the consistency boundary condition f(x, t) = c_skip(t) x + c_out(t) x0 (Song et al.
2023, eq. 10; with sigma_data = 0.5 and t scaled by `timestep_scaling`), and the result is re-noised with fresh
noise to the next timestep; the last step returns f itself.
tcd: Trajectory Consistency Distillation's strategic stochastic sampling (Zheng et al. 2024, Algorithm 4): from
t, jump along the predicted trajectory to s = floor((1 - gamma) t_prev) (the DDIM map with the model's x0 and
epsilon), then add fresh noise from s up to t_prev; gamma is the option `eta` (diffusers' default 0.3; 0 is
deterministic).

Both take `num_steps` timesteps evenly (by index) from the distillation schedule k - 1, 2k - 1, ..., T - 1,
k = T // original_inference_steps, starting from its top; the model sees x unscaled. diffusers' `timestep_spacing`
and `steps_offset` do not enter (nor `set_alpha_to_one`: no step reaches t < 0), and TCD ignores `clip_sample`
and `timestep_scaling`, as there. img2img: lcm follows LatentConsistencyModelImg2ImgPipeline (all num_steps
steps, taken from the first int(original_inference_steps * strength) distillation timesteps); tcd the generic
img2img pipelines (the first num_steps - int(num_steps * strength) steps skipped).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sdjax import samplers
from sdjax.samplers import discretisation as disc
from sdjax.samplers.ddim import check_terminal_snr
from sdjax.samplers.denoiser import predict
from sdjax.schedules import Schedule

SIGMA_DATA = 0.5  # the consistency parameterisation's data standard deviation (diffusers' LCMScheduler)


def distilled_timesteps(schedule: Schedule, num_steps: int, strength: float = 1.0, sampler: str = "lcm") -> np.ndarray:
  """The integer timesteps (descending) diffusers' LCM/TCD `set_timesteps(num_steps, strength=strength)` picks."""
  T = schedule.num_train_timesteps
  original = schedule.original_inference_steps
  if not isinstance(original, (int, np.integer)) or not 1 <= original <= T:
    raise ValueError(f"{sampler}: original_inference_steps must be an integer in [1, {T}] (num_train_timesteps), "
                     f"got {original!r}")
  if not 1 <= num_steps <= original:
    raise ValueError(f"{sampler}: num_steps must be in [1, {original}] (original_inference_steps), got {num_steps}")
  k = T // original
  origin = (np.arange(1, int(original * strength) + 1) * k - 1)[::-1]
  if len(origin) < num_steps:
    raise ValueError(f"{sampler}: strength={strength} keeps {len(origin)} of the {original} distillation timesteps "
                     f"(original_inference_steps), fewer than num_steps={num_steps}")
  return origin[np.floor(np.linspace(0, len(origin), num=num_steps, endpoint=False)).astype(np.int64)]


def boundary_scalings(schedule: Schedule, timesteps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(c_skip, c_out) of the consistency boundary condition at `timesteps`, float32 as diffusers computes them."""
  s = timesteps.astype(np.float32) * np.float32(schedule.timestep_scaling)
  d = s * s + np.float32(SIGMA_DATA**2)
  return np.float32(SIGMA_DATA**2) / d, s / np.sqrt(d)


def _custom(schedule: Schedule, num_steps: int, sampler: str, strength: float = 1.0) -> np.ndarray:
  """Custom timesteps (set_timesteps(timesteps=..., strength=...)): less the first n - int(n * strength)."""
  distilled_timesteps(schedule, 1, sampler=sampler)  # (checks original_inference_steps, as diffusers' LCM)
  timesteps = disc.custom_timesteps(schedule, num_steps, sampler, integer=True).astype(np.int64)
  start = num_steps - min(int(num_steps * strength), num_steps)
  if start >= num_steps:
    raise ValueError(f"{sampler}: strength={strength} leaves none of the {num_steps} custom timesteps")
  return timesteps[start:]


def _lcm_tables(schedule: Schedule, num_steps: int, strength: float = 1.0) -> dict[str, np.ndarray]:
  if schedule.custom_timesteps:
    timesteps = _custom(schedule, num_steps, "lcm", strength)
  else:
    timesteps = distilled_timesteps(schedule, num_steps, strength)
  check_terminal_snr(schedule, timesteps, "lcm")
  c_skip, c_out = boundary_scalings(schedule, timesteps)
  # The next timestep (re-noising target); the last step returns the boundary-conditioned x0, no re-noising.
  prev = np.concatenate([timesteps[1:], timesteps[-1:]])
  return {"timesteps": timesteps, "prev": prev, "c_skip": c_skip, "c_out": c_out}


def _tcd_tables(schedule: Schedule, num_steps: int) -> dict[str, np.ndarray]:
  if schedule.custom_timesteps:
    timesteps = _custom(schedule, num_steps, "tcd")
  else:
    timesteps = distilled_timesteps(schedule, num_steps, sampler="tcd")
  check_terminal_snr(schedule, timesteps, "tcd")
  return {"timesteps": timesteps, "prev": np.concatenate([timesteps[1:], [0]]).astype(np.int64)}


def _init(schedule, noise, tables):
  return {"x": noise}


def lcm_step(schedule, model_fn, carry, i, z, tables, options):
  """One step of multistep consistency sampling (Luo et al. 2023, Algorithm 1)."""
  x = carry["x"]
  t = samplers.at(tables, "timesteps", i)
  abar_prev = schedule.alphas_cumprod[samplers.at(tables, "prev", i)]
  out = model_fn(x, t.astype(jnp.float32))
  abar = schedule.alphas_cumprod[t]
  x0, _ = predict(schedule.prediction_type, out, x, jnp.sqrt(abar), jnp.sqrt(1.0 - abar))
  if schedule.clip_sample:
    x0 = jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
  denoised = samplers.at(tables, "c_out", i) * x0 + samplers.at(tables, "c_skip", i) * x
  renoised = jnp.sqrt(abar_prev) * denoised + jnp.sqrt(1.0 - abar_prev) * z
  return {"x": jnp.where(i == tables["timesteps"].shape[0] - 1, denoised, renoised)}


def tcd_step(schedule, model_fn, carry, i, z, tables, options):
  """One step of TCD's strategic stochastic sampling (Zheng et al. 2024, Algorithm 4) with gamma = `eta`."""
  eta = options.get("eta", 0.3)
  if not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
    raise ValueError(f"tcd: eta (gamma) must be a number in [0, 1], got {eta!r}")
  x = carry["x"]
  t = samplers.at(tables, "timesteps", i)
  prev = tables["prev"]
  # s = floor((1 - gamma) t_prev), with diffusers' float32 product.
  s_table = np.floor(np.float32(1.0 - eta) * prev.astype(np.float32)).astype(np.int64)
  abar_prev = schedule.alphas_cumprod[samplers.at(tables, "prev", i)]
  abar_s = schedule.alphas_cumprod[jnp.asarray(s_table)[i]]
  out = model_fn(x, t.astype(jnp.float32))
  abar = schedule.alphas_cumprod[t]
  x0, eps = predict(schedule.prediction_type, out, x, jnp.sqrt(abar), jnp.sqrt(1.0 - abar))
  x_s = jnp.sqrt(abar_s) * x0 + jnp.sqrt(1.0 - abar_s) * eps  # the trajectory's point at s
  if eta == 0:
    return {"x": x_s}
  ratio = abar_prev / abar_s
  renoised = jnp.sqrt(ratio) * x_s + jnp.sqrt(1.0 - ratio) * z
  return {"x": jnp.where(i == tables["timesteps"].shape[0] - 1, x_s, renoised)}


samplers.register("lcm", samplers.Sampler(_lcm_tables, _init, lcm_step, samplers.noised_vp, stochastic=True,
                                          strength_tables=_lcm_tables,
                                          schedule_options=("clip_sample", "custom_timesteps")))
samplers.register("tcd", samplers.Sampler(_tcd_tables, _init, tcd_step, samplers.noised_vp, ("eta",), stochastic=True,
                                          schedule_options=("custom_timesteps",), denoising_split=False))
