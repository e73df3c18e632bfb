"""Samplers: one registry, one `sample()` driver, each sampler a step function run by `lax.scan`.

A sampler is a `Sampler(tables, init, step)`:
  tables(schedule, num_steps) -> dict of static numpy arrays, with "timesteps" [num_steps] being
    exactly the timesteps handed to `model_fn` (others: sigmas, previous timesteps, ...);
  init(schedule, noise, tables) -> carry, a dict with "x" (the sampler's own scaling of the
    standard-normal noise) and whatever history a multistep method keeps;
  step(schedule, model_fn, carry, i, z, tables, options) -> carry, for step index i (traced); z is
    this step's standard-normal noise (x's shape) for a `stochastic` sampler, else None.
The loop over i is one `lax.scan`, so `model_fn` is traced once per compile. The model's output is turned into
predictions by `sdjax.samplers.denoiser` (the prediction type is handled there only), the step tables are built
from `sdjax.samplers.discretisation`, and each sampler declares the schedule options it implements
(`Sampler.schedule_options`, keys of `SCHEDULE_OPTIONS`); any other such option set on the schedule is refused.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.schedules import Schedule

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Sampler:
  tables: Callable[[Schedule, int], dict[str, np.ndarray]]
  init: Callable[[Schedule, jax.Array, dict[str, np.ndarray]], dict[str, jax.Array]]
  step: Callable[..., dict[str, jax.Array]]
  # noised(schedule, x0, noise, tables, i): data x0 noised to the level the sampler's x has before step
  # i, in the sampler's own parameterisation (img2img start; inpainting blends).
  noised: Callable[..., jax.Array]
  options: tuple[str, ...] = ()
  stochastic: bool = False
  img2img: bool = True
  # strength_tables(schedule, num_steps, strength): the tables for img2img at strength < 1 where the sampler's
  # scheduler defines them itself (LCM: all num_steps steps, over the first `strength` of its distillation
  # timesteps); None: the full tables less their first num_steps - int(num_steps * strength) steps.
  strength_tables: Callable[[Schedule, int, float], dict[str, np.ndarray]] | None = None
  # The schedule options (keys of SCHEDULE_OPTIONS) this sampler implements when they are set on the schedule.
  schedule_options: tuple[str, ...] = ()
  # Whether `denoising_start` / `denoising_end` (the SDXL base + refiner "ensemble of expert denoisers") apply: the
  # step tables are diffusers' scheduler timesteps one to one (its order-1 schedulers). Samplers with their own
  # img2img tables (`strength_tables`) or none (`img2img=False`) never split.
  denoising_split: bool = True


SAMPLERS: dict[str, Sampler] = {}


def register(name: str, sampler: Sampler) -> None:
  """Add `sampler` to the registry as `name`; its schedule_options must be known options."""
  unknown = sorted(set(sampler.schedule_options) - set(OPTION_IS_SET))
  if unknown:
    raise ValueError(f"sampler {name!r}: unknown schedule option(s) {unknown}; known: {list(OPTION_IS_SET)}")
  SAMPLERS[name] = sampler


def get(name: str) -> Sampler:
  if name not in SAMPLERS:
    raise ValueError(f"unknown sampler {name!r}; available: {sorted(SAMPLERS)}")
  return SAMPLERS[name]


# Schedule options, each with the test for it being away from its default. A sampler lists those it implements in
# its `schedule_options`; any other sampler refuses such a schedule rather than silently sampling without the option.
OPTION_IS_SET: dict[str, Callable[[Schedule], bool]] = {
    "use_karras_sigmas": lambda s: s.use_karras_sigmas,
    "use_exponential_sigmas": lambda s: s.use_exponential_sigmas,
    "use_beta_sigmas": lambda s: s.use_beta_sigmas,
    "use_lu_lambdas": lambda s: s.use_lu_lambdas,
    "thresholding": lambda s: s.thresholding,
    "final_sigmas_type": lambda s: s.final_sigmas_type != "zero",
    "lower_order_final": lambda s: not s.lower_order_final,
    "euler_at_final": lambda s: s.euler_at_final,
    # EDM schedules (Karras et al. 2022): sigma-space preconditioned sampling, sdjax.samplers.edm
    "edm": lambda s: s.edm,
    "disable_corrector": lambda s: bool(s.disable_corrector),
    "clip_sample": lambda s: s.clip_sample,
    # Custom step lists (sdjax.samplers.discretisation): the samplers whose diffusers class' set_timesteps takes them
    # (EulerAncestral, DDIM, LMS, PNDM, ... do not; UniPC takes sigmas only for flow matching).
    "custom_timesteps": lambda s: bool(s.custom_timesteps),
    "custom_sigmas": lambda s: bool(s.custom_sigmas),
}


def samplers_with(option: str) -> tuple[str, ...]:
  """The registered samplers that implement schedule option `option`, in registration order."""
  return tuple(name for name, s in SAMPLERS.items() if option in s.schedule_options)


class _ScheduleOptions(Mapping):
  """option -> (is_set(schedule), the samplers implementing it), read from the registry when asked."""

  def __getitem__(self, option: str) -> tuple[Callable[[Schedule], bool], tuple[str, ...]]:
    return OPTION_IS_SET[option], samplers_with(option)

  def __iter__(self):
    return iter(OPTION_IS_SET)

  def __len__(self) -> int:
    return len(OPTION_IS_SET)


SCHEDULE_OPTIONS: Mapping[str, tuple[Callable[[Schedule], bool], tuple[str, ...]]] = _ScheduleOptions()


def check_schedule(schedule: Schedule, sampler: str) -> None:
  """Refuse a schedule option (away from its default) that `sampler` does not implement, naming it."""
  implemented = SAMPLERS[sampler].schedule_options if sampler in SAMPLERS else ()
  for option, is_set in OPTION_IS_SET.items():
    if is_set(schedule) and option not in implemented:
      names = samplers_with(option)
      raise ValueError(f"sampler {sampler!r} does not implement the schedule option {option}="
                       f"{getattr(schedule, option)!r}; samplers that do: {', '.join(names)}")


def with_custom_steps(schedule: Schedule, num_steps: int | None, timesteps: Sequence[float] | None = None,
                      sigmas: Sequence[float] | None = None) -> tuple[Schedule, int]:
  """(schedule, num_steps) for custom `timesteps` [n] or `sigmas` [n + 1] (as diffusers pipelines take them):
  the schedule's custom_timesteps / custom_sigmas set, num_steps n (a num_steps given must agree)."""
  if timesteps is not None and sigmas is not None:
    raise ValueError("only one of timesteps and sigmas can be given")
  if timesteps is not None:
    values = tuple(float(t) for t in timesteps)
    schedule, n = schedule.replace(custom_timesteps=values, custom_sigmas=()), len(values)
  elif sigmas is not None:
    values = tuple(float(v) for v in sigmas)
    schedule, n = schedule.replace(custom_sigmas=values, custom_timesteps=()), len(values) - 1
  else:
    if num_steps is None:
      raise ValueError("num_steps is needed unless timesteps or sigmas are given")
    return schedule, num_steps
  if n < 1:
    raise ValueError(f"custom {'timesteps' if timesteps is not None else 'sigmas'} give no steps: {list(values)}")
  if num_steps is not None and num_steps != n:
    raise ValueError(f"num_steps={num_steps} conflicts with the {n} steps of the custom "
                     f"{'timesteps' if timesteps is not None else 'sigmas'}; pass one or the other")
  return schedule, n


def timestep_cutoff(schedule: Schedule, fraction: float) -> int:
  """diffusers' `discrete_timestep_cutoff` for a `denoising_start` / `denoising_end` fraction of the schedule:
  int(round(T - fraction * T)), T = num_train_timesteps."""
  T = schedule.num_train_timesteps
  return int(round(T - fraction * T))


def check_fraction(name: str, value: float | None) -> None:
  """A `denoising_start` / `denoising_end` is None or a number strictly between 0 and 1."""
  if value is None:
    return
  if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0.0 < float(value) < 1.0:
    raise ValueError(f"{name} must be a fraction in (0, 1), got {value!r}")


def step_tables(schedule: Schedule, sampler: str, num_steps: int, strength: float = 1.0, *,
                denoising_start: float | None = None, denoising_end: float | None = None
                ) -> tuple[dict[str, np.ndarray], int]:
  """(tables, length): the step tables `sample` runs from (their row 0 is its first step) and how many steps it
  runs, for a schedule already carrying any custom steps (`with_custom_steps`).

  strength < 1 (img2img): the first num_steps - int(num_steps * strength) steps are dropped (or the sampler's own
  `strength_tables`). denoising_start (diffusers' SDXL img2img `get_timesteps`): strength is ignored and the steps
  run are those with timestep < cutoff; denoising_end (diffusers' SDXL pipelines, step 9.1): the run stops before
  the first step with timestep < cutoff; cutoff = `timestep_cutoff(schedule, fraction)`. A run cut by
  denoising_end keeps the full tables, so a sampler that treats its last step differently (lower-order final
  steps, LCM) sees the step it stops at as diffusers' scheduler does: not the last.
  """
  s = get(sampler)
  check_fraction("denoising_start", denoising_start)
  check_fraction("denoising_end", denoising_end)
  split = denoising_start is not None or denoising_end is not None
  if split and not (s.denoising_split and s.img2img and s.strength_tables is None):
    able = [n for n, v in SAMPLERS.items() if v.denoising_split and v.img2img and v.strength_tables is None]
    raise ValueError(f"sampler {sampler!r} does not support denoising_start / denoising_end (its diffusers "
                     f"scheduler does not step one timestep at a time); samplers that do: {', '.join(able)}")
  if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
    raise ValueError(f"denoising_start={denoising_start} must be below denoising_end={denoising_end}")
  if not 0.0 < strength <= 1.0:
    raise ValueError(f"strength must be in (0, 1], got {strength}")
  if strength < 1.0 and denoising_start is None:
    if not s.img2img:
      raise ValueError(f"sampler {sampler!r} does not support strength < 1")
    if s.strength_tables is not None:
      tables = s.strength_tables(schedule, num_steps, strength)
    else:
      tables = s.tables(schedule, num_steps)
      start = num_steps - min(int(num_steps * strength), num_steps)
      if start >= num_steps:
        raise ValueError(f"strength={strength} leaves no steps out of {num_steps}")
      tables = {k: v[start:] for k, v in tables.items()}
  else:
    tables = s.tables(schedule, num_steps)
  timesteps = np.asarray(tables["timesteps"])
  start, stop = 0, len(timesteps)
  if denoising_start is not None:
    start = stop - int(np.sum(timesteps < timestep_cutoff(schedule, denoising_start)))
  if denoising_end is not None:
    stop = int(np.sum(timesteps >= timestep_cutoff(schedule, denoising_end)))
  if start >= stop:
    raise ValueError(f"denoising_start={denoising_start} / denoising_end={denoising_end} leave no steps of the "
                     f"{len(timesteps)} timesteps {timesteps.tolist()}")
  if start:
    tables = {k: v[start:] for k, v in tables.items()}
  return tables, stop - start


def scan_length(schedule: Schedule, sampler: str, num_steps: int | None = None, strength: float = 1.0, *,
                timesteps: Sequence[float] | None = None, sigmas: Sequence[float] | None = None,
                denoising_start: float | None = None, denoising_end: float | None = None) -> int:
  """How many steps `sample(...)` runs (the leading axis of its `step_noise`) for these arguments."""
  schedule, num_steps = with_custom_steps(schedule, num_steps, timesteps, sigmas)
  return step_tables(schedule, sampler, num_steps, strength, denoising_start=denoising_start,
                     denoising_end=denoising_end)[1]


def sample(model_fn: ModelFn, noise: jax.Array, *, schedule: Schedule, sampler: str, num_steps: int | None = None,
           timesteps: Sequence[float] | None = None, sigmas: Sequence[float] | None = None,
           rng: jax.Array | None = None, step_noise: jax.Array | None = None, init_image: jax.Array | None = None,
           strength: float = 1.0, inpaint_mask: jax.Array | None = None,
           step_hook: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
           denoising_start: float | None = None, denoising_end: float | None = None, **options: Any) -> jax.Array:
  """Run `sampler` for `num_steps` steps from standard-normal `noise` [B, ...].

  `model_fn(x, t)` gets t as float32 [B] in training-timestep units and returns the model output for
  `schedule.prediction_type`. Stochastic samplers draw each step's noise from `rng`, or take it from
  `step_noise` [steps run, B, ...] when given. Works under `jax.jit`.

  img2img: with `init_image` (data space, same shape as noise) and `strength` < 1, the first
  num_steps - int(num_steps * strength) steps are skipped and sampling starts from `init_image` noised
  to the first remaining step, as diffusers' img2img pipelines do (a sampler's own `strength_tables` replace
  the skipping: lcm runs all num_steps steps, as LatentConsistencyModelImg2ImgPipeline).
  Inpainting: with `init_image` and `inpaint_mask` (1 = generate, 0 = keep; broadcastable to noise),
  after every step the kept region is replaced by `init_image` noised (with `noise`) to the next
  step's level, and by `init_image` itself after the last step (diffusers' inpaint pipeline for
  ordinary U-Nets). `step_hook(x, i) -> x` runs after every step for anything else.

  Custom steps, as diffusers pipelines take them: `timesteps` [n] or `sigmas` [n + 1] (the last the final sigma)
  replace the schedule's spacing for the samplers whose diffusers class takes them (`SCHEDULE_OPTIONS`
  "custom_timesteps" / "custom_sigmas"); num_steps is then n, and may be left out.

  The ensemble of expert denoisers (diffusers' SDXL `denoising_end` / `denoising_start`, fractions in (0, 1); see
  `step_tables`): with `denoising_end` the run stops early and returns the sampler's x as it is then (noisy, in the
  sampler's own parameterisation: sigma-space for euler, VP for ddim), which is what diffusers' pipelines hand
  over as `output_type="latent"`; with `denoising_start`, `init_image` is such an x and sampling continues from it
  over the remaining steps, with no noise added and `strength` ignored (the sampler's history starts empty, as a
  second pipeline's fresh scheduler). Not with inpaint_mask.
  """
  schedule, num_steps = with_custom_steps(schedule, num_steps, timesteps, sigmas)
  s = get(sampler)
  check_schedule(schedule, sampler)
  unknown = sorted(set(options) - set(s.options))
  if unknown:
    raise ValueError(f"sampler {sampler!r} does not take option(s) {unknown}; it takes {list(s.options)}")
  if rng is None:
    rng = jax.random.key(0)
  if (strength != 1.0 or inpaint_mask is not None or denoising_start is not None) and init_image is None:
    raise ValueError("strength < 1, inpaint_mask and denoising_start need init_image")
  if init_image is not None and init_image.shape != noise.shape:
    raise ValueError(f"init_image {init_image.shape} and noise {noise.shape} must have the same shape")
  if inpaint_mask is not None and (denoising_start is not None or denoising_end is not None):
    raise ValueError("denoising_start / denoising_end do not apply to inpainting (inpaint_mask)")
  # scan steps; a sampler may evaluate the model more than once per step
  tables, length = step_tables(schedule, sampler, num_steps, strength, denoising_start=denoising_start,
                               denoising_end=denoising_end)
  carry = s.init(schedule, noise, tables)
  if denoising_start is not None:
    carry["x"] = jnp.asarray(init_image, noise.dtype)  # the previous expert's x, as it is
  elif strength < 1.0:
    carry["x"] = s.noised(schedule, init_image, noise, tables, 0)
  batch = noise.shape[0]
  if inpaint_mask is not None:
    user_hook = step_hook

    def step_hook(x, i):
      known = s.noised(schedule, init_image, noise, tables, jnp.minimum(i + 1, length - 1))
      known = jnp.where(i < length - 1, known, init_image)
      x = (1 - inpaint_mask) * known + inpaint_mask * x
      return x if user_hook is None else user_hook(x, i)

  def call_model(x, t):
    return model_fn(x, jnp.full((batch,), t, jnp.float32))

  if step_noise is not None and step_noise.shape != (length,) + noise.shape:
    raise ValueError(f"step_noise must have shape {(length,) + noise.shape}, got {step_noise.shape}")

  def body(carry, inputs):
    i, key, z = inputs
    if s.stochastic and z is None:
      z = jax.random.normal(key, noise.shape, noise.dtype)
    carry = s.step(schedule, call_model, carry, i, z if s.stochastic else None, tables, options)
    if step_hook is not None:
      carry = {**carry, "x": step_hook(carry["x"], i)}
    return carry, None

  keys = jax.random.split(rng, length)
  carry, _ = jax.lax.scan(body, carry, (jnp.arange(length), keys, step_noise))
  return carry["x"]


def at(tables: dict[str, np.ndarray], name: str, i: jax.Array) -> jax.Array:
  """tables[name][i] for a traced step index i."""
  return jnp.asarray(tables[name])[i]


def noised_vp(schedule: Schedule, x0, noise, tables, i):
  """sqrt(abar_t) x0 + sqrt(1 - abar_t) noise at t = timesteps[i] (discrete VP samplers)."""
  abar = schedule.alphas_cumprod[at(tables, "timesteps", i).astype(jnp.int32)]
  return jnp.sqrt(abar) * x0 + jnp.sqrt(1 - abar) * noise


def noised_sigma(schedule: Schedule, x0, noise, tables, i):
  """x0 + sigma_i noise (samplers that integrate in sigma space: euler, euler_a, heun, lms)."""
  return x0 + at(tables, "sigmas", i) * noise


def noised_vp_sigma(schedule: Schedule, x0, noise, tables, i):
  """alpha x0 + sigma alpha noise with alpha = 1 / sqrt(sigma_i^2 + 1) (dpmpp_2m, unipc)."""
  sigma = at(tables, "sigmas", i)
  alpha = 1.0 / jnp.sqrt(sigma**2 + 1)
  return alpha * x0 + sigma * alpha * noise


from sdjax.samplers import ddim as _ddim  # noqa: E402,F401  (registers ddim, ddpm)
from sdjax.samplers import euler as _euler  # noqa: E402,F401  (registers euler)
from sdjax.samplers import heun as _heun  # noqa: E402,F401  (registers heun)
from sdjax.samplers import dpmpp as _dpmpp  # noqa: E402,F401  (registers dpmpp_{1,2,3}m, dpmpp_{1,2,3}m_sde)
from sdjax.samplers import lms as _lms  # noqa: E402,F401  (registers lms)
from sdjax.samplers import pndm as _pndm  # noqa: E402,F401  (registers pndm, pndm_prk)
from sdjax.samplers import unipc as _unipc  # noqa: E402,F401  (registers unipc, unipc_1, unipc_3 and _bh1 / _eps forms)
from sdjax.samplers import steps as _steps  # noqa: E402,F401  (registers ipndm, ipndm_v, *_ays, *_ays_xl, ipndm*_karras)
from sdjax.samplers import kdpm2 as _kdpm2  # noqa: E402,F401  (registers kdpm2, kdpm2_a)
from sdjax.samplers import deis as _deis  # noqa: E402,F401  (registers deis_1, deis, deis_3)
from sdjax.samplers import lcm as _lcm  # noqa: E402,F401  (registers lcm, tcd)
from sdjax.samplers import dpm_singlestep as _dpm_singlestep  # noqa: E402,F401  (registers dpmpp_2s, dpmpp_3s)
from sdjax.samplers import edm as _edm  # noqa: E402,F401  (registers edm_euler, edm_dpmpp_{1,2,3}m, _{1,2}m_sde)
