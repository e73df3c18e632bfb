"""Classifier-free guidance (Ho & Salimans 2022) as a `model_fn` wrapper, with guidance rescale
(Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", eq. 15-16)."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def classifier_free_guidance(model: Callable[[jax.Array, jax.Array, Any], jax.Array], cond: Any, uncond: Any,
                             scale: float | jax.Array, rescale: float | jax.Array = 0.0
                             ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Return `model_fn(x, t)` = uncond + scale * (cond - uncond), both branches in one batched call.

  model(x, t, c) is the conditional model; `cond` and `uncond` are pytrees with leading batch axis B.
  With `rescale` in (0, 1], the guided output's std is pulled towards the conditional output's.
  `scale` and `rescale` may be arrays broadcastable to x (per-example values, e.g. [B, 1, 1, 1]); a
  Python 0 for `rescale` leaves the rescale out of the graph.
  """

  def model_fn(x, t):
    both = jax.tree.map(lambda c, u: jnp.concatenate([u, c], axis=0), cond, uncond)
    out = model(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), both)
    out_uncond, out_cond = jnp.split(out, 2, axis=0)
    guided = out_uncond + scale * (out_cond - out_uncond)
    if not (isinstance(rescale, (int, float)) and rescale == 0):
      axes = tuple(range(1, x.ndim))
      std_cond = jnp.std(out_cond, axis=axes, keepdims=True)
      std_guided = jnp.std(guided, axis=axes, keepdims=True)
      guided = rescale * guided * (std_cond / std_guided) + (1.0 - rescale) * guided
    return guided

  return model_fn
