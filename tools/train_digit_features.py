"""Train the digit classifier behind "FID (MNIST classifier features)" and write its shipped files.

  python tools/train_digit_features.py [--outdir sdjax/eval] [--epochs 20] [--seed 0]

Trains sdjax.eval.digits.DigitNet on the bundled `train` split (4,500 real MNIST digits) on CPU, reports its
accuracy on the bundled `test` split (500 digits), and writes into --outdir:
  digits_features.npz    the weights (float32, flat "<module>/<param>" keys)
  digits_test_stats.npz  mu / sigma (float64) of the features of the whole `test` split, pytorch-fid's format
It refuses to write weights whose test accuracy is below --min-accuracy (0.98).

Training (sdjax.eval.digits.train_classifier): optax.adam with a cosine decay from --lr 3e-3 to 0 over all steps,
batch 100, dropout 0.5 on the features; every training image is randomly rotated (+-12 degrees), scaled (0.9-1.1)
and shifted (+-2 pixels) by scipy.ndimage (bilinear, zero fill; scipy comes with the [test] extra). Everything random is seeded: parameters from
jax.random.PRNGKey(seed), dropout from jax.random.fold_in(jax.random.PRNGKey(seed + 1), step), batch order and
augmentation from np.random.default_rng(seed), so a rerun with the same jax/flax/optax/scipy versions on CPU writes
the same weights.
"""
import argparse
import hashlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from sdjax.data import load_bundled  # noqa: E402
from sdjax.eval import digits, fid  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--outdir", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                  "sdjax", "eval"))
  p.add_argument("--epochs", type=int, default=20)
  p.add_argument("--batch-size", type=int, default=100)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--min-accuracy", type=float, default=0.98)
  args = p.parse_args()

  t0 = time.perf_counter()
  x_train, y_train = load_bundled("train")
  x_test, y_test = load_bundled("test")
  test_acc = 0.0

  def report(epoch, params, loss):
    nonlocal test_acc
    test_acc = float(np.mean(np.argmax(digits.logits(params, x_test), -1) == y_test))
    print(f"epoch {epoch + 1}/{args.epochs}: train loss {loss:.4f}, test accuracy {test_acc:.4f}", flush=True)

  params = digits.train_classifier(x_train, y_train, seed=args.seed, epochs=args.epochs, batch_size=args.batch_size,
                                   lr=args.lr, on_epoch=report)
  train_acc = float(np.mean(np.argmax(digits.logits(params, x_train), -1) == y_train))
  print(f"final: train accuracy {train_acc:.4f}, test accuracy {test_acc:.4f} "
        f"({int(round(test_acc * len(y_test)))}/{len(y_test)}), {time.perf_counter() - t0:.1f} s")
  if test_acc < args.min_accuracy:
    sys.exit(f"test accuracy {test_acc:.4f} is below --min-accuracy {args.min_accuracy}; nothing written")

  os.makedirs(args.outdir, exist_ok=True)
  weights_path = os.path.join(args.outdir, digits.WEIGHTS_FILE)
  with open(weights_path, "wb") as f:  # zip entries carry a fixed date: same weights, same bytes
    np.savez_compressed(f, **digits.flatten_params(params))
  stats = digits.feature_stats(x_test, params)
  stats_path = os.path.join(args.outdir, digits.TEST_STATS_FILE)
  fid.save_stats(stats_path, stats.mu, stats.sigma)
  for path in (weights_path, stats_path):
    with open(path, "rb") as f:
      data = f.read()
    print(f"wrote {path}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}")


if __name__ == "__main__":
  main()
