"""Attention implementations side by side: agreement and time per call at Stable Diffusion's sequence lengths.

  python bench/attention.py                 # on whatever backend JAX finds (CPU here; GPU adds cuDNN)
  python bench/attention.py --lengths 1024 4096 --dtype bfloat16

Self-attention over [B, L, H, D], by default 8 heads of 64 (SD 2.x / SDXL head width; L = 4096 is the
first U-Net level at 512 px, 16384 at 1024 px). Error is max |out - xla_float32| / max |xla_float32|.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from models import median_time  # bench/models.py: median of timed calls after a warm-up

from sdjax.models import attention


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--runs", type=int, default=5)
  args = parser.parse_args()
  dtype = jnp.dtype(args.dtype)
  impls = ["xla", "chunked"] + (["cudnn"] if attention.cudnn_available() and dtype != jnp.float32 else [])
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()[0].device_kind}, "
        f"dtype {dtype}, heads {args.heads}x{args.head_dim}, batch {args.batch}")
  print("| L | implementation | ms / call | rel. error vs XLA float32 |")
  print("|---|---|---|---|")
  for n in args.lengths:
    keys = jax.random.split(jax.random.key(n), 3)
    q, k, v = (jax.random.normal(key, (args.batch, n, args.heads, args.head_dim)) for key in keys)
    ref = np.asarray(jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, implementation="xla"))(q, k, v))
    for impl in impls:
      fn = jax.jit(lambda q, k, v, impl=impl: attention.dot_product_attention(q, k, v, implementation=impl))
      args_ = tuple(a.astype(dtype) for a in (q, k, v))
      out = np.asarray(fn(*args_), np.float32)
      err = float(np.abs(out - ref).max() / np.abs(ref).max())
      seconds, _ = median_time(lambda: jax.block_until_ready(fn(*args_)), args.runs)
      print(f"| {n} | {impl} | {1e3 * seconds:.2f} | {err:.1e} |")


if __name__ == "__main__":
  main()
