"""Noise schedules as pytrees, and the pure maths of the forward (noising) process.

Conventions follow diffusers' `DDPMScheduler`/`DDIMScheduler`: `alphas_cumprod[t]` is \\bar\\alpha_t for
integer training timesteps t in [0, T). Every table (betas, alphas_cumprod, the samplers' timesteps and
sigmas) is built with numpy alone along diffusers 0.42's dtype path, bit for bit: torch's float32 linspace
(`torch_linspace_f32`), torch's float32 cumprod accumulated in float64 (`cumprod_f32`), float64 numpy where
diffusers uses numpy. tests/test_schedule_tables.py checks them against diffusers.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sdjax import diffusers_schedulers

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """How to sample this schedule: the settings a diffusers scheduler config carries besides the forward process
  (static, hashable). Each is read by the samplers that implement it (`sdjax.samplers.SCHEDULE_OPTIONS`); any other
  sampler refuses a schedule where it is away from its default."""
  # The timestep spacing of the step tables (sdjax.samplers.discretisation).
  timestep_spacing: str = "leading"
  steps_offset: int = 0
  # DDIM / DDPM / PNDM / LCM: x0 clipping, and the abar before t = 0.
  clip_sample: bool = False
  clip_sample_range: float = 1.0
  set_alpha_to_one: bool = True
  # LCM / TCD (Luo et al. 2023; Zheng et al. 2024): the distillation schedule's step count, and the factor on t
  # in the consistency boundary condition (c_skip, c_out); sdjax.samplers.lcm.
  original_inference_steps: int = 50
  timestep_scaling: float = 10.0
  # Sigma spacings (Karras et al. 2022; uniform in log sigma; Beta(0.6, 0.6) quantiles; uniform in lambda).
  use_karras_sigmas: bool = False
  use_exponential_sigmas: bool = False
  use_beta_sigmas: bool = False
  use_lu_lambdas: bool = False
  # Multistep DPM-Solver++ / UniPC / EDM: the last sigma ("zero" or the smallest sigma, "sigma_min"), dynamic
  # thresholding of x0 (Saharia et al. 2022), and the lowered orders of the final steps.
  final_sigmas_type: str = "zero"
  thresholding: bool = False
  dynamic_thresholding_ratio: float = 0.995
  sample_max_value: float = 1.0
  lower_order_final: bool = True
  euler_at_final: bool = False
  # UniPC (sdjax.samplers.unipc): the step indices after which its corrector is skipped (diffusers' list).
  disable_corrector: tuple[int, ...] = ()
  # EDM's step discretisation (sdjax.samplers.edm): "karras" (eq. 5 with `rho`) or "exponential".
  sigma_schedule: str = "karras"
  rho: float = 7.0
  # Custom step lists (diffusers' `set_timesteps(timesteps=...)` / `(sigmas=...)`; sdjax.samplers.discretisation),
  # set per call by `samplers.sample(..., timesteps=..., sigmas=...)`; empty: the spacing's own steps.
  custom_timesteps: tuple[float, ...] = ()
  custom_sigmas: tuple[float, ...] = ()


SAMPLER_SETTINGS = tuple(f.name for f in dataclasses.fields(SamplerSettings))


@struct.dataclass
class Schedule:
  """A discrete diffusion schedule: the forward process (arrays float32 [T]; the rest static, not traced), and in
  `sampler_settings` how to sample it. `schedule.<setting>` reads `schedule.sampler_settings.<setting>`, and
  `schedule.replace(...)` takes both kinds of field.

  A schedule can be passed into `jax.jit` as an argument: samplers build their step tables from
  `host_alphas_cumprod`, a static (hashable) copy, so they never need the traced arrays' values.
  """
  betas: jax.Array
  alphas_cumprod: jax.Array
  prediction_type: str = struct.field(pytree_node=False, default="epsilon")
  rescale_betas_zero_snr: bool = struct.field(pytree_node=False, default=False)
  host_alphas_cumprod: tuple[float, ...] = struct.field(pytree_node=False, default=())
  # Only DPM-Solver's Karras timesteps depend on it (diffusers leaves them unrounded for squaredcos_cap_v2).
  beta_schedule: str = struct.field(pytree_node=False, default="linear")
  # EDM (Karras et al. 2022; sdjax.samplers.edm, diffusers' EDM schedulers): sigma-space noise levels from
  # edm_sigma_max down to edm_sigma_min, the model preconditioned with `sigma_data`; the betas above are then
  # unused. (sigma_data and the settings' sigma_schedule and rho need edm on.)
  edm: bool = struct.field(pytree_node=False, default=False)
  edm_sigma_min: float = struct.field(pytree_node=False, default=0.002)
  edm_sigma_max: float = struct.field(pytree_node=False, default=80.0)
  sigma_data: float = struct.field(pytree_node=False, default=0.5)
  sampler_settings: SamplerSettings = struct.field(pytree_node=False, default=SamplerSettings())

  def __getattr__(self, name: str) -> Any:
    """schedule.<setting> for the fields of SamplerSettings (called only where normal lookup fails)."""
    if name in SAMPLER_SETTINGS:
      return getattr(object.__getattribute__(self, "sampler_settings"), name)
    raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

  def host_abar(self) -> np.ndarray:
    """alphas_cumprod as float32 numpy, available even when the schedule is traced."""
    return np.asarray(self.host_alphas_cumprod, np.float32)

  def train_sigmas(self) -> np.ndarray:
    """`train_sigmas(self)`: the sigma of every training timestep, float32 numpy (for the step discretisations)."""
    return train_sigmas(self)

  @property
  def num_train_timesteps(self) -> int:
    return self.betas.shape[0]


def _replace(self: Schedule, **updates: Any) -> Schedule:
  """A copy with `updates` applied, to fields of the schedule or of its sampler settings."""
  settings = {k: updates.pop(k) for k in list(updates) if k in SAMPLER_SETTINGS}
  if settings:
    updates["sampler_settings"] = dataclasses.replace(updates.get("sampler_settings", self.sampler_settings),
                                                      **settings)
  return dataclasses.replace(self, **updates)


Schedule.replace = _replace  # (set after flax's struct.dataclass, which installs a plain dataclasses.replace)


def _round_sum_f32(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """a + b rounded once to float32 (round to nearest even), for float64 arrays a, b.

  The float64 sum r is rounded again to float32, which is the single rounding of the exact sum unless r
  lies exactly halfway between two float32 values; then the (exact) rounding error of r picks the side.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  r = a + b
  bb = r - a
  err = (a - (r - bb)) + (b - bb)  # Knuth's TwoSum: a + b == r + err exactly
  f = r.astype(np.float32)
  up = np.nextafter(f, np.float32(np.inf))
  down = np.nextafter(f, np.float32(-np.inf))
  to_up = (r == (f.astype(np.float64) + up) / 2) & (err > 0)
  to_down = (r == (f.astype(np.float64) + down) / 2) & (err < 0)
  return np.where(to_up, up, np.where(to_down, down, f))


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
  """`torch.linspace(start, end, steps, dtype=torch.float32)` on the CPU, bit for bit, without torch.

  ATen's kernel takes step = (end - start) / (steps - 1) in float32, then start + step * i for the first
  steps // 2 entries and end - step * (steps - 1 - i) for the rest; in its AVX2 / AVX-512 builds (the ones
  x86 CPUs run) the compiler fuses each into one fma, a single rounding, which is what this computes.
  (numpy's float32 linspace is a float64 linspace rounded once, and differs in ~20% of entries.)
  """
  start32, end32 = np.float32(start), np.float32(end)
  if steps == 1:
    return np.array([start32], np.float32)
  step = np.float32(end32 - start32) / np.float32(steps - 1)
  i = np.arange(steps)
  # step * i is exact in float64 (24-bit step times an integer below 2**24).
  head = _round_sum_f32(np.full(steps, start32, np.float64), np.float64(step) * i)
  tail = _round_sum_f32(np.full(steps, end32, np.float64), -np.float64(step) * (steps - 1 - i))
  return np.where(i < steps // 2, head, tail).astype(np.float32)


def cumprod_f32(x: np.ndarray) -> np.ndarray:
  """`torch.cumprod` of a float32 tensor on the CPU: a float64 running product, each entry rounded to float32
  (np.cumprod(..., dtype=float32) rounds the running product at every step and drifts by up to ~1e-6)."""
  return np.cumprod(np.asarray(x, np.float32).astype(np.float64)).astype(np.float32)


def make_betas(beta_schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
  """Betas as float32 numpy, bit for bit as diffusers computes them."""
  T = num_train_timesteps
  if beta_schedule == "linear":
    return torch_linspace_f32(beta_start, beta_end, T)
  if beta_schedule == "scaled_linear":
    b = torch_linspace_f32(beta_start**0.5, beta_end**0.5, T)
    return b * b  # torch's tensor ** 2 is a float32 square
  if beta_schedule == "squaredcos_cap_v2":
    # Nichol & Dhariwal (2021), eq. 17, with betas capped at 0.999: Python floats, then one rounding to float32
    # (diffusers' betas_for_alpha_bar).
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=np.float32)
  raise ValueError(f"unknown beta_schedule {beta_schedule!r}; expected one of {BETA_SCHEDULES}")


def make_schedule(beta_schedule: str = "linear", num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                  beta_end: float = 0.02, prediction_type: str = "epsilon", clip_sample: bool = False,
                  clip_sample_range: float = 1.0, set_alpha_to_one: bool = True,
                  steps_offset: int = 0, timestep_spacing: str = "leading",
                  use_karras_sigmas: bool = False, rescale_betas_zero_snr: bool = False,
                  original_inference_steps: int = 50, timestep_scaling: float = 10.0,
                  final_sigmas_type: str = "zero", use_lu_lambdas: bool = False,
                  use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False, thresholding: bool = False,
                  dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                  lower_order_final: bool = True, euler_at_final: bool = False,
                  disable_corrector: tuple[int, ...] | list[int] = (), edm: bool = False,
                  edm_sigma_min: float = 0.002, edm_sigma_max: float = 80.0, sigma_data: float = 0.5,
                  sigma_schedule: str = "karras", rho: float = 7.0) -> Schedule:
  if prediction_type not in PREDICTION_TYPES:
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
  if timestep_spacing not in TIMESTEP_SPACINGS:
    raise ValueError(f"unknown timestep_spacing {timestep_spacing!r}; expected one of {TIMESTEP_SPACINGS}")
  if num_train_timesteps < 2:
    raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
  if final_sigmas_type not in FINAL_SIGMAS_TYPES:
    raise ValueError(f"unknown final_sigmas_type {final_sigmas_type!r}; expected one of {FINAL_SIGMAS_TYPES}")
  if sum(map(bool, (use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas))) > 1:
    raise ValueError("only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be set")
  if thresholding and not 0.0 <= dynamic_thresholding_ratio <= 1.0:
    raise ValueError(f"dynamic_thresholding_ratio must be in [0, 1], got {dynamic_thresholding_ratio}")
  _check_edm(edm, prediction_type, edm_sigma_min, edm_sigma_max, sigma_data, sigma_schedule, rho)
  betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
  if rescale_betas_zero_snr:
    betas = rescale_zero_terminal_snr(betas)
  alphas_cumprod = cumprod_f32(np.float32(1) - betas)
  settings = SamplerSettings(
      timestep_spacing=timestep_spacing, steps_offset=steps_offset, clip_sample=clip_sample,
      clip_sample_range=clip_sample_range, set_alpha_to_one=set_alpha_to_one,
      original_inference_steps=original_inference_steps, timestep_scaling=timestep_scaling,
      use_karras_sigmas=bool(use_karras_sigmas), use_exponential_sigmas=bool(use_exponential_sigmas),
      use_beta_sigmas=bool(use_beta_sigmas), use_lu_lambdas=bool(use_lu_lambdas), final_sigmas_type=final_sigmas_type,
      # (the thresholding parameters are kept only where thresholding is on, so that inert values leave the
      # schedule, and its jit cache key, unchanged)
      thresholding=bool(thresholding),
      dynamic_thresholding_ratio=float(dynamic_thresholding_ratio) if thresholding else 0.995,
      sample_max_value=float(sample_max_value) if thresholding else 1.0,
      lower_order_final=bool(lower_order_final), euler_at_final=bool(euler_at_final),
      disable_corrector=tuple(int(k) for k in disable_corrector),
      **(dict(sigma_schedule=sigma_schedule, rho=float(rho)) if edm else {}))  # (EDM's only with edm on, likewise)
  return Schedule(betas=jnp.asarray(betas), alphas_cumprod=jnp.asarray(alphas_cumprod),
                  prediction_type=prediction_type, rescale_betas_zero_snr=bool(rescale_betas_zero_snr),
                  host_alphas_cumprod=tuple(alphas_cumprod.tolist()), beta_schedule=beta_schedule,
                  **(dict(edm=True, edm_sigma_min=float(edm_sigma_min), edm_sigma_max=float(edm_sigma_max),
                          sigma_data=float(sigma_data)) if edm else {}),
                  sampler_settings=settings)


EDM_SIGMA_SCHEDULES = ("karras", "exponential")


def _check_edm(edm: bool, prediction_type: str, sigma_min: float, sigma_max: float, sigma_data: float,
               sigma_schedule: str, rho: float) -> None:
  """One-line errors for EDM settings that diffusers' EDM schedulers do not define, or that need edm on."""
  if not edm:
    for name, value, default in (("sigma_data", sigma_data, 0.5), ("sigma_schedule", sigma_schedule, "karras"),
                                 ("rho", rho, 7.0), ("edm_sigma_min", sigma_min, 0.002),
                                 ("edm_sigma_max", sigma_max, 80.0)):
      if value != default:
        raise ValueError(f"{name}={value!r} is an EDM setting: it needs edm=True (an EDM scheduler class)")
    return
  if sigma_schedule not in EDM_SIGMA_SCHEDULES:
    raise ValueError(f"unknown sigma_schedule {sigma_schedule!r}; expected one of {EDM_SIGMA_SCHEDULES}")
  if prediction_type not in ("epsilon", "v_prediction"):
    raise ValueError(f"prediction_type={prediction_type!r} is not defined for EDM schedules (epsilon, v_prediction)")
  if not 0.0 < sigma_min < sigma_max:
    raise ValueError(f"EDM sigmas need 0 < edm_sigma_min < edm_sigma_max, got {sigma_min}, {sigma_max}")
  if not sigma_data > 0.0:
    raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
  if not rho > 0.0:
    raise ValueError(f"rho must be > 0, got {rho}")


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Lin et al. (2023), Algorithm 1: shift and scale sqrt(abar) so that abar_T = 0 and abar_0 is kept."""
  # float32 throughout, as diffusers' rescale_zero_terminal_snr on a float32 tensor (sqrt correctly
  # rounded: see tests/test_schedule_tables.py for torch's MKL sqrt, which on some CPUs is not).
  abar_sqrt = np.sqrt(cumprod_f32(np.float32(1) - np.asarray(betas, np.float32)))
  first, last = abar_sqrt[0].copy(), abar_sqrt[-1].copy()
  abar_sqrt = (abar_sqrt - last) * (first / (first - last))
  abar = abar_sqrt * abar_sqrt
  alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
  return (np.float32(1) - alphas).astype(np.float32)


def sigma_alphas_cumprod(schedule: Schedule) -> np.ndarray:
  """abar as sigma-space samplers use it: a zero terminal abar (zero-SNR schedules) becomes 2**-24 so
  that the first sigma is finite, as in diffusers' Euler, Euler-ancestral, DPM-Solver and UniPC."""
  abar = schedule.host_abar().copy()
  if abar[-1] == 0:
    abar[-1] = 2.0**-24
  return abar


def train_sigmas(schedule: Schedule) -> np.ndarray:
  """sigma_t = sqrt((1 - abar_t) / abar_t) for t in [0, T), float32 as diffusers' `((1 - ac) / ac) ** 0.5`
  (correctly rounded; torch's MKL sqrt is not on every CPU, see tests/test_schedule_tables.py)."""
  abar = sigma_alphas_cumprod(schedule)
  return np.sqrt((np.float32(1) - abar) / abar)


def from_config(cfg: Any) -> Schedule:
  """A schedule from a mapping (e.g. `config.diffusion`) with make_schedule's argument names."""
  d = dict(cfg)
  known = set(inspect.signature(make_schedule).parameters)
  unknown = sorted(set(d) - known)
  if unknown:
    raise ValueError(f"unknown schedule field(s) {unknown}; known fields are {sorted(known)}")
  return make_schedule(**d)


def _at(a: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
  """a[t] for integer t of shape [B], broadcast against an [B, ...] array of rank `ndim`."""
  return a[t].reshape(t.shape + (1,) * (ndim - t.ndim))


def add_noise(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (Ho et al. 2020, eq. 4); t: int [B]."""
  if schedule.edm:
    raise ValueError("edm=True: sdjax trains only discrete VP schedules (EDM schedules are for sampling)")
  abar = _at(schedule.alphas_cumprod, t, x0.ndim)
  return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise


def velocity(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0 (Salimans & Ho 2022)."""
  abar = _at(schedule.alphas_cumprod, t, x0.ndim)
  return jnp.sqrt(abar) * noise - jnp.sqrt(1.0 - abar) * x0


def training_target(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """What the model is trained to output for the schedule's prediction type."""
  if schedule.prediction_type == "epsilon":
    return noise
  if schedule.prediction_type == "v_prediction":
    return velocity(schedule, x0, noise, t)
  return x0


def snr(schedule: Schedule, t: jax.Array) -> jax.Array:
  """Signal-to-noise ratio abar_t / (1 - abar_t) at integer timesteps t."""
  abar = schedule.alphas_cumprod[t]
  return abar / (1.0 - abar)


def predict_x0_and_eps(prediction_type: str, model_output: jax.Array, x_t: jax.Array,
                       abar: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Convert a model output to (x0, epsilon) given abar_t broadcastable against x_t: alias of
  `sdjax.samplers.denoiser.predict` with alpha = sqrt(abar), sigma = sqrt(1 - abar), kept for users."""
  from sdjax.samplers.denoiser import predict  # (run-time import: samplers import this module)
  return predict(prediction_type, model_output, x_t, jnp.sqrt(abar), jnp.sqrt(1.0 - abar))


def discrete_timesteps(schedule: Schedule, num_steps: int) -> np.ndarray:
  """Integer timesteps (descending) of `schedule.timestep_spacing`, as diffusers' DDIM/DDPM schedulers: alias of
  `sdjax.samplers.discretisation.discrete_timesteps`, kept for users."""
  from sdjax.samplers.discretisation import discrete_timesteps as spacing  # (run-time import, as above)
  return spacing(schedule, num_steps)


_SAMPLER_OF_CLASS = {"DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "PNDMScheduler": "pndm",
                     "LMSDiscreteScheduler": "lms", "EulerDiscreteScheduler": "euler",
                     "EulerAncestralDiscreteScheduler": "euler_a", "HeunDiscreteScheduler": "heun",
                     "UniPCMultistepScheduler": "unipc", "LCMScheduler": "lcm", "TCDScheduler": "tcd",
                     "KDPM2DiscreteScheduler": "kdpm2", "KDPM2AncestralDiscreteScheduler": "kdpm2_a",
                     "EDMEulerScheduler": "edm_euler"}
# DEIS by solver_order (diffusers' default 2).
_DEIS_OF_ORDER = {1: "deis_1", 2: "deis", 3: "deis_3"}


def sampler_from_diffusers_config(config: dict[str, Any]) -> str:
  """The sdjax sampler name for a diffusers scheduler config's `_class_name` (and algorithm_type)."""
  cls = config.get("_class_name")
  if cls == "DPMSolverMultistepScheduler":  # DPM-Solver++(1M/2M/3M) by solver_order, "_sde" for sde-dpmsolver++
    order = config.get("solver_order", 2)
    if order not in (1, 2, 3):
      raise ValueError(f"scheduler config: solver_order={order!r} is not supported by sdjax for {cls} "
                       f"(supported: 1, 2, 3)")
    return f"dpmpp_{order}m" + ("_sde" if config.get("algorithm_type") == "sde-dpmsolver++" else "")
  if cls == "DPMSolverSinglestepScheduler":  # DPM-Solver++(2S) / (3S) by solver_order (diffusers' default 2)
    order = config.get("solver_order", 2)
    if order not in (2, 3):
      raise ValueError(f"scheduler config: solver_order={order!r} is not supported by sdjax for {cls} "
                       f"(supported: 2, 3)")
    return f"dpmpp_{order}s"
  if cls == "EDMDPMSolverMultistepScheduler":  # edm_dpmpp_{1,2,3}m, "_sde" for sde-dpmsolver++ (sdjax.samplers.edm)
    order, sde = config.get("solver_order", 2), config.get("algorithm_type") == "sde-dpmsolver++"
    if order not in ((1, 2) if sde else (1, 2, 3)):
      raise ValueError(f"scheduler config: solver_order={order!r} is not supported by sdjax for {cls} with "
                       f"algorithm_type={config.get('algorithm_type', 'dpmsolver++')!r} (supported: "
                       f"{'1, 2: diffusers has no third-order SDE step' if sde else '1, 2, 3'})")
    if config.get("algorithm_type") == "deis" and config.get("final_sigmas_type", "zero") == "zero":
      raise ValueError(f"scheduler config: algorithm_type='deis' needs final_sigmas_type='sigma_min' for {cls} "
                       f"(as diffusers)")
    return f"edm_dpmpp_{order}m" + ("_sde" if sde else "")
  if cls == "DEISMultistepScheduler":
    order = config.get("solver_order", 2)
    if order not in _DEIS_OF_ORDER:
      raise ValueError(f"scheduler config: solver_order={order!r} is not supported by sdjax for {cls} "
                       f"(supported: {', '.join(map(str, _DEIS_OF_ORDER))})")
    return _DEIS_OF_ORDER[order]
  if cls == "PNDMScheduler":  # PLMS, after the pseudo Runge-Kutta warm-up unless skip_prk_steps (default False)
    return "pndm" if config.get("skip_prk_steps", False) else "pndm_prk"
  if cls == "UniPCMultistepScheduler":  # UniPC-p by solver_order, B(h) and predict_x0 (sdjax.samplers.unipc)
    order = config.get("solver_order", 2)
    if order not in (1, 2, 3):
      raise ValueError(f"scheduler config: solver_order={order!r} is not supported by sdjax for {cls} "
                       f"(supported: 1, 2, 3)")
    # (diffusers rewrites solver_type midpoint / heun / logrho to bh2 for UniPC.)
    return ("unipc" + ("" if order == 2 else f"_{order}") + ("_bh1" if config.get("solver_type") == "bh1" else "")
            + ("" if config.get("predict_x0", True) else "_eps"))
  if cls not in _SAMPLER_OF_CLASS:
    known = sorted(_SAMPLER_OF_CLASS) + ["DEISMultistepScheduler", "DPMSolverMultistepScheduler",
                                         "DPMSolverSinglestepScheduler", "EDMDPMSolverMultistepScheduler"]
    raise ValueError(f"scheduler config: no sdjax sampler for _class_name={cls!r}; known: {known}")
  return _SAMPLER_OF_CLASS[cls]


def from_diffusers_config(config: dict[str, Any]) -> Schedule:
  """A Schedule from a diffusers `scheduler_config.json` dict (see also `sampler_from_diffusers_config`).

  With a `_class_name`, exactly as diffusers reads it: that class's defaults fill every field the config
  leaves out, and fields the class does not take are ignored (sdjax.diffusers_schedulers). Without one, the
  fields given are read with sdjax's own defaults and an unknown field is an error. Either way a setting
  sdjax does not implement is an error naming it: a config that sdjax would silently sample differently
  from diffusers is refused.
  """
  if config.get("_class_name") is not None:
    return make_schedule(**diffusers_schedulers.resolve(config))
  known = diffusers_schedulers.all_fields() | set(diffusers_schedulers.METADATA)
  unknown = sorted(set(config) - known)
  if unknown:
    raise ValueError(f"scheduler config: unsupported field(s) {unknown}; diffusers' schedulers take "
                     f"{sorted(known)}")
  for field, allowed in diffusers_schedulers.SUPPORTED.items():
    if isinstance(allowed, dict):
      allowed = tuple(v for values in allowed.values() for v in values)
    if field in config and config[field] not in allowed:
      raise ValueError(f"scheduler config: {field}={config[field]!r} is not supported by sdjax "
                       f"(supported: {', '.join(map(repr, allowed))})")
  return make_schedule(**{k: config[k] for k in diffusers_schedulers.SCHEDULE_FIELDS if k in config})
