"""The training state: one pytree holding everything a step reads and writes."""
from __future__ import annotations

from typing import Any

import jax
import optax
from flax import struct


@struct.dataclass
class TrainState:
  step: jax.Array          # int32 []
  params: Any              # float32 model parameters
  opt_state: optax.OptState
  ema_params: Any          # exponential moving average of params
  rng: jax.Array           # uint32 [2] raw key data; the step's key is fold_in(rng, step)


def create(params: Any, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
  import jax.numpy as jnp
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                    ema_params=jax.tree.map(lambda p: p.copy(), params),
                    rng=jax.random.key_data(jax.random.key(seed)))
