"""The one attention function every sdjax model calls."""
from __future__ import annotations

import jax


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Softmax attention over [B, L, H, D] inputs, returning [B, Lq, H, D].

  Dispatches to `jax.nn.dot_product_attention` (XLA's implementation on CPU/TPU;
  on GPU XLA may pick cuDNN's fused kernel). Scale is 1/sqrt(D), as in diffusers.
  """
  if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"attention expects q [B, Lq, H, D] and k, v [B, Lk, H, D]; "
                     f"got {q.shape}, {k.shape}, {v.shape}")
  return jax.nn.dot_product_attention(q, k, v)
