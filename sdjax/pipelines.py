"""Sampling pipelines composed from a model, a guidance wrapper and a sampler."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sdjax import samplers
from sdjax.guidance import classifier_free_guidance
from sdjax.models import UNet
from sdjax.schedules import Schedule


def class_conditional(model: UNet, params: Any, labels: jax.Array, noise: jax.Array, rng: jax.Array, *,
                      schedule: Schedule, sampler: str, num_steps: int, guidance_scale: float,
                      **options: Any) -> jax.Array:
  """Images [B, H, W, C] in [-1, 1] for class `labels` [B] from standard-normal `noise` [B, H, W, C].

  Classifier-free guidance: the null class (for the unconditional branch) is the model's last class
  embedding. A guidance scale of 1 runs the conditional model alone (one model call per step).
  `rng` drives stochastic samplers only. An unconditional model (no `num_class_embeds`) ignores `labels`.
  """
  if labels.shape[0] != noise.shape[0]:
    raise ValueError(f"labels {labels.shape} and noise {noise.shape} disagree on the batch size")

  def conditional(x, t, c):
    return model.apply({"params": params}, x, t, class_labels=c)

  if model.config.num_class_embeds is None:  # an unconditional model: labels and guidance do not apply
    model_fn = lambda x, t: model.apply({"params": params}, x, t)
  elif guidance_scale == 1.0:
    model_fn = lambda x, t: conditional(x, t, labels)
  else:
    null = jnp.full_like(labels, model.config.num_class_embeds - 1)
    model_fn = classifier_free_guidance(conditional, labels, null, guidance_scale)
  x = samplers.sample(model_fn, noise, schedule=schedule, sampler=sampler, num_steps=num_steps,
                      rng=rng, **options)
  return jnp.clip(x, -1.0, 1.0)
