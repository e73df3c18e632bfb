"""Samplers: one registry, one `sample()` driver, each sampler a step function run by `lax.scan`.

A sampler is a `Sampler(timesteps, init, step)`:
  timesteps(schedule, num_steps) -> numpy [num_steps] of the timesteps handed to `model_fn`;
  init(schedule, noise) -> initial x (the sampler's own scaling of standard-normal noise);
  step(schedule, model_fn, x, i, rng, timesteps, options) -> next x, for step index i.
`timesteps` is static (numpy); the loop over i is one `lax.scan`, so `model_fn` is traced once.
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
  timesteps: Callable[[Schedule, int], np.ndarray]
  init: Callable[[Schedule, jax.Array], jax.Array]
  step: Callable[..., jax.Array]
  options: tuple[str, ...] = ()


SAMPLERS: dict[str, Sampler] = {}


def register(name: str, sampler: Sampler) -> None:
  SAMPLERS[name] = sampler


def get(name: str) -> Sampler:
  if name not in SAMPLERS:
    raise ValueError(f"unknown sampler {name!r}; available: {sorted(SAMPLERS)}")
  return SAMPLERS[name]


def sample(model_fn: ModelFn, noise: jax.Array, *, schedule: Schedule, sampler: str, num_steps: int,
           rng: jax.Array | None = None, **options: Any) -> jax.Array:
  """Run `sampler` for `num_steps` model evaluations from standard-normal `noise` [B, ...].

  `model_fn(x, t)` gets t as float32 [B] in training-timestep units and returns the model output for
  `schedule.prediction_type`. Stochastic samplers need `rng`. Works under `jax.jit`.
  """
  s = get(sampler)
  unknown = sorted(set(options) - set(s.options))
  if unknown:
    raise ValueError(f"sampler {sampler!r} does not take option(s) {unknown}; it takes {list(s.options)}")
  timesteps = s.timesteps(schedule, num_steps)
  if rng is None:
    rng = jax.random.key(0)
  x = s.init(schedule, noise)
  batch = noise.shape[0]

  def call_model(x, t):
    return model_fn(x, jnp.full((batch,), t, jnp.float32))

  def body(x, inputs):
    i, key = inputs
    return s.step(schedule, call_model, x, i, key, timesteps, options), None

  keys = jax.random.split(rng, num_steps)
  x, _ = jax.lax.scan(body, x, (jnp.arange(num_steps), keys))
  return x


from sdjax.samplers import ddim as _ddim  # noqa: E402,F401  (registers ddim, ddpm)
