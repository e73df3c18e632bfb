"""Attention implementations side by side: time per call (forward, forward+backward), compile-only memory of
forward+backward, and agreement, at Stable Diffusion's sequence lengths.

  python bench/attention.py                           # on whatever backend JAX finds (CPU here; GPU adds cuDNN)
  python bench/attention.py --lengths 256 512 1024 2048 4096 --runs 3   # where "chunked" overtakes "xla"
  python bench/attention.py --memory-only --lengths 1024 4096 16384      # compile-only, no timing
  python bench/attention.py --lengths 4096 --heads 8 --head-dim 40 --only chunked --blocks 1024x2048 4096x4096
                                                      # tune the chunked block sizes (default 512x1024)

Self-attention over [B, L, H, D], by default 8 heads of 64 (SD 2.x / SDXL head width; L = 4096 is the
first U-Net level at 512 px, 16384 at 1024 px). Rows: "xla" (materialises [B, H, L, L] logits), "chunked"
(sdjax's FlashAttention-2 with a custom VJP) and "chunked-scan" (the previous chunked implementation, kept
here for comparison: the same blocked forward, differentiated by JAX through its scans, which saves a
running accumulator per key block and so grows as L^2 / key_chunk). Memory: XLA's temp allocation of the
compiled forward+backward (`memory_analysis().temp_size_in_bytes`), i.e. besides inputs and outputs.
Error: max |out - xla_float32| / max |xla_float32|.
"""
from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from models import median_time  # bench/models.py: median of timed calls after a warm-up

from sdjax.models import attention


def chunked_scan(q, k, v, query_chunk=1024, key_chunk=2048):
  """sdjax's chunked attention before the custom VJP (no mask, not causal): reverse-mode AD through a
  checkpointed key scan inside a map over query blocks."""
  b, lq, h, d = q.shape
  lk = k.shape[1]
  qc, kc = min(query_chunk, lq), min(key_chunk, lk)
  nq, nk = -(-lq // qc), -(-lk // kc)
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
  q = pad(q, nq * qc).reshape(b, nq, qc, h, d)
  k = pad(k, nk * kc).reshape(b, nk, kc, h, d)
  v = pad(v, nk * kc).reshape(b, nk, kc, h, d)
  scale = 1.0 / math.sqrt(d)

  def query_block(i):
    qi = q[:, i].astype(jnp.float32) * scale

    def key_block(carry, j):
      acc, row_max, row_sum = carry
      kj, vj = k[:, j].astype(jnp.float32), v[:, j].astype(jnp.float32)
      logits = jnp.einsum("bqhd,bkhd->bhqk", qi, kj)
      logits = jnp.where((j * kc + jnp.arange(kc) < lk)[None, None, None, :], logits, -jnp.inf)
      new_max = jnp.maximum(row_max, logits.max(-1))
      safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
      p = jnp.exp(logits - safe_max[..., None])
      correction = jnp.exp(jnp.where(jnp.isfinite(row_max), row_max, -jnp.inf) - safe_max)
      row_sum = row_sum * correction + p.sum(-1)
      acc = acc * jnp.swapaxes(correction, 1, 2)[..., None] + jnp.einsum("bhqk,bkhd->bqhd", p, vj)
      return (acc, new_max, row_sum), None

    init = (jnp.zeros((b, qc, h, d), jnp.float32), jnp.full((b, h, qc), -jnp.inf, jnp.float32),
            jnp.zeros((b, h, qc), jnp.float32))
    (acc, _, row_sum), _ = lax.scan(jax.checkpoint(key_block), init, jnp.arange(nk))
    return acc / jnp.swapaxes(row_sum, 1, 2)[..., None]

  out = lax.map(query_block, jnp.arange(nq))
  return jnp.moveaxis(out, 0, 1).reshape(b, nq * qc, h, d)[:, :lq].astype(q.dtype)


def implementations(dtype, blocks=(), only=None) -> dict:
  impls = {name: (lambda q, k, v, name=name: attention.dot_product_attention(q, k, v, implementation=name))
           for name in ("xla", "chunked")}
  impls["chunked-scan"] = chunked_scan
  for block in blocks:  # "QxK": the chunked implementation with other block sizes than the default
    qc, kc = (int(x) for x in block.split("x"))
    impls[f"chunked {qc}x{kc}"] = lambda q, k, v, qc=qc, kc=kc: attention.dot_product_attention(
        q, k, v, implementation="chunked", query_chunk=qc, key_chunk=kc)
  if only:  # "xla" stays: it is the reference of the error column
    impls = {name: fn for name, fn in impls.items() if name == "xla" or name in only or name.split(" ")[0] in only}
  if attention.cudnn_available() and dtype != jnp.float32:
    impls["cudnn"] = lambda q, k, v: attention.dot_product_attention(q, k, v, implementation="cudnn")
  return impls


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--memory-only", action="store_true", help="compile-only memory, no timing")
  parser.add_argument("--blocks", nargs="+", default=[], help="extra chunked rows with these QxK block sizes")
  parser.add_argument("--only", nargs="+", help="implementations to run (e.g. xla chunked)")
  args = parser.parse_args()
  dtype = jnp.dtype(args.dtype)
  impls = implementations(dtype, args.blocks, args.only)
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()[0].device_kind}, "
        f"dtype {dtype}, heads {args.heads}x{args.head_dim}, batch {args.batch}")
  print("| L | implementation | fwd ms | fwd+bwd ms | fwd+bwd temp MiB | rel. error vs XLA float32 |")
  print("|---|---|---|---|---|---|")
  for n in args.lengths:
    shape = (args.batch, n, args.heads, args.head_dim)
    abstract = jax.ShapeDtypeStruct(shape, dtype)
    if not args.memory_only:
      keys = jax.random.split(jax.random.key(n), 4)
      q, k, v, ct = (jax.random.normal(key, shape) for key in keys)
      ref = np.asarray(jax.jit(impls["xla"])(q, k, v))
      q, k, v = (a.astype(dtype) for a in (q, k, v))
    for name, fn in impls.items():
      loss = lambda q, k, v, ct, fn=fn: jnp.vdot(fn(q, k, v).astype(jnp.float32), ct)
      grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
      ct_abstract = jax.ShapeDtypeStruct(shape, jnp.float32)
      temp = grad.lower(abstract, abstract, abstract, ct_abstract).compile().memory_analysis().temp_size_in_bytes
      temp /= 2**20
      if args.memory_only:
        print(f"| {n} | {name} | - | - | {temp:.1f} | - |", flush=True)
        continue
      fwd = jax.jit(fn)
      out = np.asarray(fwd(q, k, v), np.float32)
      err = float(np.abs(out - ref).max() / np.abs(ref).max())
      t_fwd, _ = median_time(lambda: jax.block_until_ready(fwd(q, k, v)), args.runs)
      t_bwd, _ = median_time(lambda: jax.block_until_ready(grad(q, k, v, ct)), args.runs)
      print(f"| {n} | {name} | {1e3 * t_fwd:.1f} | {1e3 * t_bwd:.1f} | {temp:.1f} | {err:.1e} |", flush=True)


if __name__ == "__main__":
  main()
