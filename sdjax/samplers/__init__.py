"""Samplers: one registry, one `sample()` driver, each sampler a step function run by `lax.scan`.

A sampler is a `Sampler(tables, init, step)`:
  tables(schedule, num_steps) -> dict of static numpy arrays, with "timesteps" [num_steps] being
    exactly the timesteps handed to `model_fn` (others: sigmas, previous timesteps, ...);
  init(schedule, noise, tables) -> carry, a dict with "x" (the sampler's own scaling of the
    standard-normal noise) and whatever history a multistep method keeps;
  step(schedule, model_fn, carry, i, z, tables, options) -> carry, for step index i (traced); z is
    this step's standard-normal noise (x's shape) for a `stochastic` sampler, else None.
The loop over i is one `lax.scan`, so `model_fn` is traced once per compile.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

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
  options: tuple[str, ...] = ()
  stochastic: bool = False


SAMPLERS: dict[str, Sampler] = {}


def register(name: str, sampler: Sampler) -> None:
  SAMPLERS[name] = sampler


def get(name: str) -> Sampler:
  if name not in SAMPLERS:
    raise ValueError(f"unknown sampler {name!r}; available: {sorted(SAMPLERS)}")
  return SAMPLERS[name]


def sample(model_fn: ModelFn, noise: jax.Array, *, schedule: Schedule, sampler: str, num_steps: int,
           rng: jax.Array | None = None, step_noise: jax.Array | None = None, **options: Any) -> jax.Array:
  """Run `sampler` for `num_steps` steps from standard-normal `noise` [B, ...].

  `model_fn(x, t)` gets t as float32 [B] in training-timestep units and returns the model output for
  `schedule.prediction_type`. Stochastic samplers draw each step's noise from `rng`, or take it from
  `step_noise` [num_steps, B, ...] when given. Works under `jax.jit`.
  """
  s = get(sampler)
  unknown = sorted(set(options) - set(s.options))
  if unknown:
    raise ValueError(f"sampler {sampler!r} does not take option(s) {unknown}; it takes {list(s.options)}")
  tables = s.tables(schedule, num_steps)
  if rng is None:
    rng = jax.random.key(0)
  carry = s.init(schedule, noise, tables)
  batch = noise.shape[0]

  def call_model(x, t):
    return model_fn(x, jnp.full((batch,), t, jnp.float32))

  if step_noise is not None and step_noise.shape != (num_steps,) + noise.shape:
    raise ValueError(f"step_noise must have shape {(num_steps,) + noise.shape}, got {step_noise.shape}")

  def body(carry, inputs):
    i, key, z = inputs
    if s.stochastic and z is None:
      z = jax.random.normal(key, noise.shape, noise.dtype)
    return s.step(schedule, call_model, carry, i, z if s.stochastic else None, tables, options), None

  length = len(tables["timesteps"])  # scan steps; a sampler may evaluate the model more than once per step
  keys = jax.random.split(rng, length)
  carry, _ = jax.lax.scan(body, carry, (jnp.arange(length), keys, step_noise))
  return carry["x"]


def at(tables: dict[str, np.ndarray], name: str, i: jax.Array) -> jax.Array:
  """tables[name][i] for a traced step index i."""
  return jnp.asarray(tables[name])[i]


from sdjax.samplers import ddim as _ddim  # noqa: E402,F401  (registers ddim, ddpm)
from sdjax.samplers import euler as _euler  # noqa: E402,F401  (registers euler)
from sdjax.samplers import heun as _heun  # noqa: E402,F401  (registers heun)
from sdjax.samplers import dpmpp as _dpmpp  # noqa: E402,F401  (registers dpmpp_2m, dpmpp_2m_sde)
from sdjax.samplers import lms as _lms  # noqa: E402,F401  (registers lms)
from sdjax.samplers import pndm as _pndm  # noqa: E402,F401  (registers pndm)
from sdjax.samplers import unipc as _unipc  # noqa: E402,F401  (registers unipc)
