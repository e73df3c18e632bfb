"""Evaluator throughput on this machine: feature extraction for FID / precision-recall, and the statistics.

  python bench/eval.py                      # Inception at 299 px (float32, bfloat16), the digit network, FID math
  python bench/eval.py --batch 64 --runs 5

Rows (each `jax.jit`-compiled once, timed as the median of --runs calls after one warm-up, `block_until_ready`):
- InceptionV3 pool features (`sdjax.eval.inception.features`) of a batch of --batch uint8 images at 299 x 299
  (pytorch-fid's resize is then the identity, its normalisation still runs), float32 and bfloat16 convolutions.
  Random weights (`inception.random_state_dict`): the cost does not depend on the values.
- The shipped MNIST classifier's features (`sdjax.eval.digits.features`, the "FID (MNIST classifier features)"
  network of the default job), 28 x 28 x 1 images, same batch.
- The statistics: `FeatureStats.update` of one batch of 2,048-d features (float64 streaming sums), and
  `frechet_distance` of two 2,048-d Gaussians (float64 eigendecompositions, no scipy), the fixed cost per FID.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import median_time  # noqa: E402  bench/models.py: median of timed calls after a warm-up

from sdjax.eval import digits, fid, inception  # noqa: E402


def timed(fn, runs: int) -> tuple[float, float]:
  """(compile + first call seconds, median seconds of `runs` calls)."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  median, _ = median_time(lambda: jax.block_until_ready(fn()), runs)
  return first, median


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--runs", type=int, default=5)
  args = p.parse_args()
  rng = np.random.default_rng(0)
  b = args.batch
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPU cores, batch {b}, "
        f"load average {os.getloadavg()[0]:.2f}\n")
  print("| what | input | first call s (compile) | s/batch | images/s |\n|---|---|---|---|---|")

  params = jax.device_put(inception.params_from_state_dict(inception.random_state_dict(0)))
  images = jnp.asarray(rng.integers(0, 256, (b, 299, 299, 3), np.uint8))
  for dtype in (jnp.float32, jnp.bfloat16):
    first, s = timed(lambda: inception.features(params, images, dtype=dtype)["pool"], args.runs)
    print(f"| InceptionV3 pool features, {jnp.dtype(dtype).name} | {b} x 299 x 299 x 3 uint8 | {first:.1f} | "
          f"{s:.3f} | {b / s:.1f} |", flush=True)

  dparams = digits.load_params()
  digit_images = jnp.asarray(rng.uniform(-1, 1, (b, 28, 28, 1)), jnp.float32)
  dfeatures = jax.jit(digits.features)
  first, s = timed(lambda: dfeatures(dparams, digit_images), args.runs)
  print(f"| digit classifier features | {b} x 28 x 28 x 1 | {first:.1f} | {s:.4f} | {b / s:.0f} |", flush=True)

  feats = rng.standard_normal((b, 2048)).astype(np.float32)
  stats = fid.FeatureStats.empty(2048)
  t0 = time.perf_counter()
  for _ in range(args.runs):
    stats = stats.update(feats)
  s = (time.perf_counter() - t0) / args.runs
  print(f"| FeatureStats.update (float64 sums) | {b} x 2048 features | — | {s:.4f} | {b / s:.0f} |")
  a = rng.standard_normal((4096, 2048))
  mu1, sigma1 = a.mean(0), np.cov(a, rowvar=False)
  mu2, sigma2 = mu1 + 0.1, sigma1 * 1.1
  t0 = time.perf_counter()
  fid.frechet_distance(mu1, sigma1, mu2, sigma2)
  print(f"| frechet_distance (2048-d, float64 eigh) | two Gaussians | — | {time.perf_counter() - t0:.2f} | — |")


if __name__ == "__main__":
  main()
