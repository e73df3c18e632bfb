"""The one attention function every sdjax model calls.

Three implementations, numerically the same softmax attention (tests pin them to a float64 reference):
- "xla": `jax.nn.dot_product_attention`'s XLA path; logits and softmax in float32 whatever the input dtype
  (so diffusers' `upcast_attention` / `upcast_softmax` always hold).
- "cudnn": the same call with cuDNN's fused flash-attention kernel (GPU, bf16/fp16 inputs).
- "chunked": memory-efficient attention (Rabe & Staats, 2021): queries in blocks, keys in blocks with a
  running max and sum, so memory grows with the block sizes, not with Lq * Lk. For long sequences on
  CPU/TPU (e.g. SD at 1024 px: 16,384 tokens in the first U-Net level).

`implementation=None` picks: cuDNN when JAX can use it for these inputs (GPU), else chunked when the
logits of one head would exceed CHUNK_THRESHOLD elements, else XLA.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

IMPLEMENTATIONS = ("xla", "cudnn", "chunked")
CHUNK_THRESHOLD = 4096 * 4096  # logits per (batch, head) above which the default switches to "chunked"


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                          is_causal: bool = False, implementation: str | None = None,
                          query_chunk: int = 1024, key_chunk: int = 2048) -> jax.Array:
  """Softmax attention over [B, L, H, D] inputs, returning [B, Lq, H, D] in q's dtype.

  Scale 1/sqrt(D), as in diffusers and transformers. mask: boolean, broadcastable to [B, H, Lq, Lk],
  True = attend. is_causal: query i attends to keys <= i (Lq == Lk).
  """
  if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"attention expects q [B, Lq, H, D] and k, v [B, Lk, H, D]; "
                     f"got {q.shape}, {k.shape}, {v.shape}")
  if implementation not in (None,) + IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {implementation!r}; expected one of {IMPLEMENTATIONS}")
  if is_causal and q.shape[1] != k.shape[1]:
    raise ValueError(f"causal attention needs Lq == Lk, got {q.shape[1]} and {k.shape[1]}")
  if mask is not None:
    mask = jnp.asarray(mask, bool)
    if mask.ndim != 4:
      raise ValueError(f"attention mask must have 4 dims broadcastable to [B, H, Lq, Lk], got {mask.shape}")
  if implementation is None:
    implementation = _default_implementation(q, k, mask)
  if implementation == "chunked":
    return _chunked(q, k, v, mask, is_causal, query_chunk, key_chunk)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                      implementation=implementation)


def _default_implementation(q, k, mask) -> str:
  if cudnn_available() and q.dtype in (jnp.bfloat16, jnp.float16) and mask is None \
      and q.shape[-1] <= 128 and q.shape[-1] % 8 == 0:
    return "cudnn"
  if q.shape[1] * k.shape[1] > CHUNK_THRESHOLD:
    return "chunked"
  return "xla"


def _chunked(q, k, v, mask, is_causal, query_chunk, key_chunk):
  b, lq, h, d = q.shape
  lk = k.shape[1]
  qc, kc = min(query_chunk, lq), min(key_chunk, lk)
  nq, nk = -(-lq // qc), -(-lk // kc)
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
  q = pad(q, nq * qc).reshape(b, nq, qc, h, d)
  k = pad(k, nk * kc).reshape(b, nk, kc, h, d)
  v = pad(v, nk * kc).reshape(b, nk, kc, h, d)
  if mask is not None:  # pad and block the (Lq, Lk) dims that are not broadcast
    mq = nq * qc if mask.shape[2] != 1 else 1
    mk = nk * kc if mask.shape[3] != 1 else 1
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, mq - mask.shape[2]), (0, mk - mask.shape[3])))
  scale = 1.0 / math.sqrt(d)

  def query_block(i):
    qi = q[:, i].astype(jnp.float32) * scale  # [B, qc, H, D]
    q_pos = i * qc + jnp.arange(qc)

    def key_block(carry, j):
      acc, row_max, row_sum = carry  # [B, qc, H, D], [B, H, qc], [B, H, qc]
      kj, vj = k[:, j].astype(jnp.float32), v[:, j].astype(jnp.float32)
      logits = jnp.einsum("bqhd,bkhd->bhqk", qi, kj)  # [B, H, qc, kc]
      k_pos = j * kc + jnp.arange(kc)
      allowed = (k_pos < lk)[None, None, None, :]
      if is_causal:
        allowed = allowed & (k_pos[None, :] <= q_pos[:, None])[None, None]
      if mask is not None:
        mi = mask if mask.shape[2] == 1 else lax.dynamic_slice_in_dim(mask, i * qc, qc, axis=2)
        mi = mi if mask.shape[3] == 1 else lax.dynamic_slice_in_dim(mi, j * kc, kc, axis=3)
        allowed = allowed & mi
      logits = jnp.where(allowed, logits, -jnp.inf)
      new_max = jnp.maximum(row_max, logits.max(-1))
      safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)  # rows with no allowed key yet
      p = jnp.exp(logits - safe_max[..., None])
      correction = jnp.exp(jnp.where(jnp.isfinite(row_max), row_max, -jnp.inf) - safe_max)
      row_sum = row_sum * correction + p.sum(-1)
      acc = acc * jnp.swapaxes(correction, 1, 2)[..., None] + jnp.einsum("bhqk,bkhd->bqhd", p, vj)
      return (acc, new_max, row_sum), None

    init = (jnp.zeros((b, qc, h, d), jnp.float32), jnp.full((b, h, qc), -jnp.inf, jnp.float32),
            jnp.zeros((b, h, qc), jnp.float32))
    (acc, _, row_sum), _ = lax.scan(jax.checkpoint(key_block), init, jnp.arange(nk))
    return acc / jnp.swapaxes(row_sum, 1, 2)[..., None]

  out = lax.map(query_block, jnp.arange(nq))  # [nq, B, qc, H, D]
  out = jnp.moveaxis(out, 0, 1).reshape(b, nq * qc, h, d)[:, :lq]
  return out.astype(q.dtype)


@functools.cache
def cudnn_available() -> bool:
  """Whether JAX runs cuDNN's fused attention here (a GPU with a cuDNN that supports it)."""
  if jax.default_backend() != "gpu":
    return False
  try:
    x = jnp.zeros((1, 128, 1, 64), jnp.bfloat16)
    jax.block_until_ready(jax.nn.dot_product_attention(x, x, x, implementation="cudnn"))
    return True
  except Exception:  # noqa: BLE001 - any failure means: not available
    return False
