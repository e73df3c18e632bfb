"""Fréchet Inception Distance and Kernel Inception Distance on feature statistics, float64 numpy on the host.

Features come off the devices batch by batch (sdjax.eval.inception.features) and are folded into
`FeatureStats`, a streaming (count, mean, scatter) summary in float64: memory is O(D^2) whatever the number of
images, and two summaries (other batches, other hosts) merge exactly with Chan et al.'s pairwise update,
which is the numerically stable form of "running sum and sum of outer products". `mu`/`sigma` equal
`np.mean(x, 0)` / `np.cov(x, rowvar=False)` of all features (what pytorch-fid computes) and are saved as `.npz`
with pytorch-fid's `mu`/`sigma` keys, so stats files are interchangeable with pytorch-fid's.

`frechet_distance` is pytorch-fid's `calculate_frechet_distance` without scipy: the trace of sqrt(S1 S2) is the sum
of the square roots of the eigenvalues of sqrt(S1) S2 sqrt(S1), a symmetric PSD matrix (same eigenvalues as S1 S2),
so it is computed with two symmetric eigendecompositions, which is also stable when S1 S2 is singular (fewer
images than feature dimensions), where pytorch-fid falls back to adding eps to the diagonals.

`kid` is torch-fidelity's KID: the unbiased MMD^2 with the polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged
over `num_subsets` random subsets of `subset_size` features from each side, drawn as torch-fidelity draws them
(np.random.RandomState(seed).choice without replacement, side 1 then side 2, per subset); defaults 100 subsets of
1000, seed 2020, as torch_fidelity.defaults.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np


@dataclasses.dataclass(frozen=True)
class FeatureStats:
  """count, mean [D] and scatter sum_i (x_i - mean)(x_i - mean)^T [D, D], all float64."""
  count: int
  mean: np.ndarray
  scatter: np.ndarray

  @classmethod
  def empty(cls, dim: int) -> "FeatureStats":
    return cls(0, np.zeros(dim), np.zeros((dim, dim)))

  @classmethod
  def of(cls, features) -> "FeatureStats":
    """The summary of one [N, D] batch of features."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2:
      raise ValueError(f"features must be [N, D], got shape {x.shape}")
    mean = x.mean(axis=0) if len(x) else np.zeros(x.shape[1])
    d = x - mean
    return cls(len(x), mean, d.T @ d)

  def merge(self, other: "FeatureStats") -> "FeatureStats":
    """The summary of both sets of features (exact up to float64 rounding; order does not matter)."""
    if self.mean.shape != other.mean.shape:
      raise ValueError(f"cannot merge statistics of dimension {self.mean.shape} and {other.mean.shape}")
    n = self.count + other.count
    if not other.count or not self.count:
      return other if not self.count else self
    delta = other.mean - self.mean
    mean = self.mean + delta * (other.count / n)
    scatter = self.scatter + other.scatter + np.outer(delta, delta) * (self.count * other.count / n)
    return FeatureStats(n, mean, scatter)

  def update(self, features) -> "FeatureStats":
    return self.merge(FeatureStats.of(features))

  @property
  def mu(self) -> np.ndarray:
    return self.mean

  @property
  def sigma(self) -> np.ndarray:
    """The unbiased covariance (ddof=1), as np.cov(features, rowvar=False)."""
    if self.count < 2:
      raise ValueError(f"a covariance needs at least 2 features, have {self.count}")
    return self.scatter / (self.count - 1)


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
  """Write pytorch-fid's stats file format: an .npz with float64 `mu` [D] and `sigma` [D, D]."""
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  _check_stats(mu, sigma, path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:  # a file object: np.savez would otherwise append ".npz" to other names
    np.savez(f, mu=mu, sigma=sigma)


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) float64 from a pytorch-fid-style .npz (no pickles); a clear error for anything else."""
  try:
    with np.load(path, allow_pickle=False) as z:
      missing = [k for k in ("mu", "sigma") if k not in z.files]
      if missing:
        raise ValueError(f"{path}: FID statistics need keys 'mu' and 'sigma'; missing {missing[0]!r} "
                         f"(has {sorted(z.files)})")
      mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
  except (OSError, EOFError) as e:
    raise ValueError(f"{path}: not a readable .npz of FID statistics ({e})") from None
  _check_stats(mu, sigma, path)
  return mu, sigma


def _check_stats(mu, sigma, what):
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"{what}: FID statistics need mu [D] and sigma [D, D]; got {mu.shape} and {sigma.shape}")
  if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
    raise ValueError(f"{what}: FID statistics are not finite")


def _psd_eigenvalues_sqrt(w: np.ndarray) -> np.ndarray:
  # eigenvalues below the float64 noise floor of the largest one are rank deficiency, not signal: 0, not sqrt(noise)
  floor = np.abs(w).max(initial=0) * len(w) * np.finfo(np.float64).eps
  return np.sqrt(np.where(w > floor, w, 0))


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((a + a.T) / 2)
  return (v * _psd_eigenvalues_sqrt(w)) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)) in float64 (pytorch-fid's calculate_frechet_distance)."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
    raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
  root1 = _sqrt_psd(s1)
  m = root1 @ s2 @ root1
  tr_covmean = _psd_eigenvalues_sqrt(np.linalg.eigvalsh((m + m.T) / 2)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def _mmd2_unbiased_poly(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> float:
  m = len(x)
  k_xx = (x @ x.T * gamma + coef0) ** degree
  k_yy = (y @ y.T * gamma + coef0) ** degree
  k_xy = (x @ y.T * gamma + coef0) ** degree
  off_xx = k_xx.sum() - np.trace(k_xx)
  off_yy = k_yy.sum() - np.trace(k_yy)
  return float((off_xx + off_yy) / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


def kid(features_1, features_2, *, num_subsets: int = 100, subset_size: int = 1000, degree: int = 3,
        gamma: float | None = None, coef0: float = 1.0, seed: int = 2020) -> tuple[float, float]:
  """(mean, std) of torch-fidelity's Kernel Inception Distance between [N1, D] and [N2, D] features.

  Computed in float64 (torch-fidelity computes in its features' dtype, float32 from its extractor; given float64
  features it computes exactly this). gamma defaults to 1 / D; both sets need at least `subset_size` rows.
  """
  f1, f2 = np.asarray(features_1, np.float64), np.asarray(features_2, np.float64)
  if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
    raise ValueError(f"KID needs [N1, D] and [N2, D] features, got {f1.shape} and {f2.shape}")
  if min(len(f1), len(f2)) < subset_size:
    raise ValueError(f"KID subset size {subset_size} is larger than the number of features ({len(f1)}, {len(f2)})")
  gamma = 1.0 / f1.shape[1] if gamma is None else gamma
  rng = np.random.RandomState(seed)
  mmds = np.zeros(num_subsets)
  for i in range(num_subsets):
    a = f1[rng.choice(len(f1), subset_size, replace=False)]
    b = f2[rng.choice(len(f2), subset_size, replace=False)]
    mmds[i] = _mmd2_unbiased_poly(a, b, degree, gamma, coef0)
  return float(np.mean(mmds)), float(np.std(mmds))
