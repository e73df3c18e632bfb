"""The one attention function every sdjax model calls, with one implementation per backend.

Five implementations of the same softmax attention (tests pin each to a float64 reference, values and gradients):
- "xla": `jax.nn.dot_product_attention`'s XLA path; logits and softmax in float32 whatever the input dtype
  (so diffusers' `upcast_attention` / `upcast_softmax` always hold). Materialises [B, H, Lq, Lk] logits.
- "cudnn": the same call with cuDNN's fused flash-attention kernel (GPU, bf16/fp16 inputs, no mask).
- "chunked": FlashAttention-2 in plain JAX (Dao, 2023): queries and keys in blocks with a running max and sum;
  a custom VJP saves only the output and each row's logsumexp and recomputes every block's probabilities in the
  backward, so forward and gradient memory grow with L, not L^2. Any backend; the CPU choice for long sequences.
- "pallas_tpu": jax's Pallas TPU flash-attention kernel (sdjax.models.attention_kernels).
- "pallas_gpu": jax's Pallas (Triton) GPU flash-attention kernel, for what cuDNN does not serve (float32,
  head dims cuDNN refuses, masks).

`implementation=None` picks per backend (`default_implementation`): TPU -> pallas_tpu; GPU -> cudnn where it
trains (bf16/fp16, no mask, D <= 128, even lengths), else xla for short keys or D > 128, else pallas_gpu;
elsewhere chunked when one head's logits exceed CHUNK_THRESHOLD elements, else xla.
The Pallas kernels take no mask but a key-padding one ([B or 1, 1, 1, Lk]); with another mask the automatic
choice falls back to chunked / xla, and asking for a Pallas kernel by name raises.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from sdjax.models import attention_kernels, flops  # attention_kernels imports jax's Pallas ops only when used
from sdjax.models.attention_kernels import is_key_padding_mask

IMPLEMENTATIONS = ("xla", "cudnn", "chunked", "pallas_tpu", "pallas_gpu")
# Logits per (batch, head) above which the CPU default switches from "xla" to "chunked". Measured with
# bench/attention.py on the 2-core CPU (8 heads of 64, float32, fwd and fwd+bwd): chunked is faster from
# 1,024 x 1,024 on, and its gradient memory is O(L) where XLA's is O(L^2).
CHUNK_THRESHOLD = 512 * 1024


def validate_implementation(name: str | None, where: str = "attention implementation") -> None:
  """Raise a ValueError naming the valid choices unless `name` is None (automatic) or one of IMPLEMENTATIONS."""
  if name is not None and name not in IMPLEMENTATIONS:
    raise ValueError(f"unknown {where} {name!r}; expected one of {IMPLEMENTATIONS} or None (automatic)")


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                          is_causal: bool = False, implementation: str | None = None,
                          query_chunk: int = 512, key_chunk: int = 1024) -> jax.Array:
  """Softmax attention over [B, L, H, D] inputs, returning [B, Lq, H, D] in q's dtype.

  Scale 1/sqrt(D), as in diffusers and transformers. mask: boolean, broadcastable to [B, H, Lq, Lk],
  True = attend. is_causal: query i attends to keys <= i (Lq == Lk). Logits, softmax and accumulation are
  float32 for every implementation. query_chunk / key_chunk: the "chunked" block sizes.
  A row with no key to attend to gives 0 ("chunked"); the other implementations leave it unspecified.
  """
  if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"attention expects q [B, Lq, H, D] and k, v [B, Lk, H, D]; "
                     f"got {q.shape}, {k.shape}, {v.shape}")
  validate_implementation(implementation)
  if is_causal and q.shape[1] != k.shape[1]:
    raise ValueError(f"causal attention needs Lq == Lk, got {q.shape[1]} and {k.shape[1]}")
  if mask is not None:
    mask = jnp.asarray(mask, bool)
    if mask.ndim != 4:
      raise ValueError(f"attention mask must have 4 dims broadcastable to [B, H, Lq, Lk], got {mask.shape}")
    jnp.broadcast_shapes(mask.shape, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
  if implementation is None:
    implementation = default_implementation(q, k, mask)
  if flops.active():  # FLOP counting: the same attention as plain XLA ops (sdjax.models.flops)
    implementation = "xla"
  if implementation == "chunked":
    return chunked_attention(q, k, v, mask, is_causal, query_chunk, key_chunk)
  if implementation in ("pallas_tpu", "pallas_gpu"):
    return attention_kernels.pallas_attention(q, k, v, mask, is_causal, implementation)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=implementation)


def default_implementation(q, k, mask=None, backend: str | None = None) -> str:
  """The automatic choice for these inputs on `backend` (default: jax's default backend)."""
  backend = backend or jax.default_backend()
  if backend == "tpu" and is_key_padding_mask(mask):
    return "pallas_tpu"
  if backend == "gpu":
    lq, lk, d = q.shape[1], k.shape[1], q.shape[-1]
    # cuDNN's backward needs even lengths (CLIP's 77 keys are not: "Unsupported sequence length Q 4096, KV 77"
    # at the first train step, seen on an H200); the Pallas kernel's blocks hold D <= 128 (a VAE's one head of
    # 512 overflows shared memory); short keys are fastest as plain XLA (4096 x 77, bf16, H200: fwd+bwd 0.35 ms
    # xla, 0.40 pallas_gpu, 0.67 chunked).
    if mask is None and q.dtype in (jnp.bfloat16, jnp.float16) and d <= 128 and d % 8 == 0 \
        and lq % 2 == 0 and lk % 2 == 0 and cudnn_available():
      return "cudnn"
    if lq * lk <= CHUNK_THRESHOLD or d > 128 or (mask is not None and not is_key_padding_mask(mask)):
      return "xla"
    return "pallas_gpu"
  if q.shape[1] * k.shape[1] > CHUNK_THRESHOLD:
    return "chunked"
  return "xla"


_default_implementation = default_implementation  # the name older tests use


def chunked_attention(q, k, v, mask=None, is_causal=False, query_chunk=512, key_chunk=1024):
  """FlashAttention-2 over [B, L, H, D] in plain JAX; see the module docstring. Lengths that the blocks do not
  divide are zero-padded (padded keys get no weight, padded query rows are dropped)."""
  b, lq, h, d = q.shape
  lk = k.shape[1]
  qc, kc = min(query_chunk, lq), min(key_chunk, lk)
  nq, nk = -(-lq // qc), -(-lk // kc)

  def blocks(x, c, n):  # [B, L, H, D] -> [n, B, H, c, D]
    x = jnp.pad(x, ((0, 0), (0, n * c - x.shape[1]), (0, 0), (0, 0)))
    return x.reshape(b, n, c, h, d).transpose(1, 0, 3, 2, 4)

  if mask is not None:  # pad the (Lq, Lk) dims that are not broadcast: padded queries attend, padded keys do not
    if mask.shape[2] != 1:
      mask = jnp.pad(mask, ((0, 0), (0, 0), (0, nq * qc - lq), (0, 0)), constant_values=True)
    if mask.shape[3] != 1:
      mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, nk * kc - lk)), constant_values=False)
  out = _flash(blocks(q, qc, nq), blocks(k, kc, nk), blocks(v, kc, nk), mask, is_causal, lk)
  return out.transpose(1, 0, 3, 2, 4).reshape(b, nq * qc, h, d)[:, :lq]


def _block_logits(qs, kj, i, j, mask, is_causal, lk):
  """Scaled logits of query block i against key block j, -inf where not allowed. qs: [B, H, qc, D] float32,
  already scaled; kj: [B, H, kc, D] float32. Returns [B, H, qc, kc]."""
  qc, kc = qs.shape[2], kj.shape[2]
  s = jnp.einsum("bhqd,bhkd->bhqk", qs, kj)
  allowed = None
  k_pos = j * kc + jnp.arange(kc)
  if lk % kc:  # padded keys exist (in the last block)
    allowed = (k_pos < lk)[None, None, None, :]
  if is_causal:
    causal = (k_pos[None, :] <= (i * qc + jnp.arange(qc))[:, None])[None, None]
    allowed = causal if allowed is None else allowed & causal
  if mask is not None:
    mi = mask if mask.shape[2] == 1 else lax.dynamic_slice_in_dim(mask, i * qc, qc, axis=2)
    mi = mi if mask.shape[3] == 1 else lax.dynamic_slice_in_dim(mi, j * kc, kc, axis=3)
    allowed = mi if allowed is None else allowed & mi
  return s if allowed is None else jnp.where(allowed, s, -jnp.inf)


def _flash_forward(q, k, v, mask, is_causal, lk):
  """q: [nq, B, H, qc, D]; k, v: [nk, B, H, kc, D]. Returns out (q's dtype, q's shape) and the float32 row
  logsumexp [nq, B, H, qc] (+inf for rows with no allowed key, so their recomputed probabilities are 0)."""
  scale = 1.0 / math.sqrt(q.shape[-1])
  nq, nk = q.shape[0], k.shape[0]

  def query_block(xs):
    qi, i = xs
    qs = qi.astype(jnp.float32) * scale

    def key_block(carry, xs):
      acc, row_max, row_sum = carry  # [B, H, qc, D], [B, H, qc], [B, H, qc]
      kj, vj, j = xs
      s = _block_logits(qs, kj.astype(jnp.float32), i, j, mask, is_causal, lk)
      new_max = jnp.maximum(row_max, s.max(-1))
      safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)  # rows with no allowed key yet
      p = jnp.exp(s - safe_max[..., None])
      correction = jnp.exp(row_max - safe_max)  # exp(-inf) = 0 on the first allowed block
      row_sum = row_sum * correction + p.sum(-1)
      acc = acc * correction[..., None] + jnp.einsum("bhqk,bhkd->bhqd", p, vj.astype(jnp.float32))
      return (acc, new_max, row_sum), None

    shape = qi.shape[:-1]
    init = (jnp.zeros(qi.shape, jnp.float32), jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32))
    (acc, row_max, row_sum), _ = lax.scan(key_block, init, (k, v, jnp.arange(nk)))
    has_keys = row_sum > 0
    out = acc / jnp.where(has_keys, row_sum, 1.0)[..., None]
    lse = jnp.where(has_keys, row_max + jnp.log(jnp.where(has_keys, row_sum, 1.0)), jnp.inf)
    return out.astype(q.dtype), lse

  return lax.map(query_block, (q, jnp.arange(nq)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, mask, is_causal, lk):
  return _flash_forward(q, k, v, mask, is_causal, lk)[0]


def _flash_fwd(q, k, v, mask, is_causal, lk):
  out, lse = _flash_forward(q, k, v, mask, is_causal, lk)
  return out, (q, k, v, mask, out, lse)


def _flash_bwd(is_causal, lk, residuals, g):
  """FlashAttention-2's backward: per key block, a pass over the query blocks recomputes P = exp(S - lse) and
  accumulates dV = P^T dO, dK = dS^T Q*scale, dQ += dS K*scale with dS = P * (dO V^T - rowsum(dO * O))."""
  q, k, v, mask, out, lse = residuals
  scale = 1.0 / math.sqrt(q.shape[-1])
  g32 = g.astype(jnp.float32)
  qs_all = q.astype(jnp.float32) * scale
  delta = jnp.sum(g32 * out.astype(jnp.float32), axis=-1)  # [nq, B, H, qc]

  def key_block(dq, xs):
    kj, vj, j = xs
    kj, vj = kj.astype(jnp.float32), vj.astype(jnp.float32)

    def query_block(carry, xs):
      dk, dv = carry
      qs, gi, lse_i, delta_i, i = xs
      p = jnp.exp(_block_logits(qs, kj, i, j, mask, is_causal, lk) - lse_i[..., None])  # [B, H, qc, kc]
      dv = dv + jnp.einsum("bhqk,bhqd->bhkd", p, gi)
      ds = p * (jnp.einsum("bhqd,bhkd->bhqk", gi, vj) - delta_i[..., None])
      dk = dk + jnp.einsum("bhqk,bhqd->bhkd", ds, qs)
      return (dk, dv), jnp.einsum("bhqk,bhkd->bhqd", ds, kj) * scale

    zeros = jnp.zeros(kj.shape, jnp.float32)
    (dk, dv), dq_j = lax.scan(query_block, (zeros, zeros), (qs_all, g32, lse, delta, jnp.arange(q.shape[0])))
    return dq + dq_j, (dk, dv)

  dq, (dk, dv) = lax.scan(key_block, jnp.zeros(q.shape, jnp.float32), (k, v, jnp.arange(k.shape[0])))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)


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
