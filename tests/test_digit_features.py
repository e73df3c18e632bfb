"""The shipped digit classifier behind "FID (MNIST classifier features)" (sdjax.eval.digits): its package data
loads, it classifies the real bundled test digits, its FID separates real digits from noise, and the shipped
reference statistics are what the shipped weights compute. Retraining (tools/train_digit_features.py) is not run."""
import importlib.resources

import numpy as np
import pytest

from sdjax.data import load_bundled
from sdjax.eval import digits, fid


@pytest.fixture(scope="module")
def test_split():
  return load_bundled("test")


def test_the_shipped_files_are_package_data():
  for name in (digits.WEIGHTS_FILE, digits.TEST_STATS_FILE):
    resource = importlib.resources.files("sdjax.eval").joinpath(name)
    assert resource.is_file(), name
    assert len(resource.read_bytes()) < 1_000_000, name
  params = digits.load_params()
  assert sum(v.size for leaves in params.values() for v in leaves.values()) == 155_786
  mu, sigma = digits.reference_stats()
  assert mu.dtype == sigma.dtype == np.float64 and mu.shape == (128,) and sigma.shape == (128, 128)


def test_the_shipped_weights_classify_the_real_test_digits(test_split):
  images, labels = test_split
  images, labels = images[:500], labels[:500]
  assert digits.digit_accuracy(images, labels) >= 0.97
  # floats in [0, 1] and [N, 28, 28] arrays mean the same images as uint8 [N, 28, 28, 1]
  np.testing.assert_array_equal(digits.predict(images[..., 0].astype(np.float32) / 255.0), digits.predict(images))
  with pytest.raises(ValueError, match="28, 28, 1"):
    digits.features(digits.load_params(), np.zeros((2, 32, 32, 1), np.uint8))
  with pytest.raises(ValueError, match="as many labels"):
    digits.digit_accuracy(images[:3], labels[:2])


def test_the_shipped_reference_stats_are_those_of_the_test_split(test_split):
  images, _ = test_split
  stats = digits.feature_stats(images)
  mu, sigma = digits.reference_stats()
  assert stats.count == len(images) == 500
  scale = np.abs(sigma).max()
  np.testing.assert_allclose(stats.mu, mu, rtol=1e-5, atol=1e-5 * np.abs(mu).max())
  np.testing.assert_allclose(stats.sigma, sigma, rtol=1e-5, atol=1e-5 * scale)
  np.testing.assert_allclose(stats.sigma, np.cov(digits.features(digits.load_params(), images), rowvar=False),
                             rtol=1e-5, atol=1e-6 * scale)


def test_digit_fid_is_small_for_real_digits_and_large_for_noise(test_split):
  images, labels = test_split
  rng = np.random.default_rng(0)
  real = digits.digit_fid(images)  # the reference set itself
  train, train_labels = load_bundled("train")
  other_real = digits.digit_fid(train[np.concatenate([np.flatnonzero(train_labels == k)[:50] for k in range(10)])])
  noise = digits.digit_fid(rng.integers(0, 256, images.shape, dtype=np.uint8))
  perm = rng.permutation(28 * 28)
  shuffled = digits.digit_fid(images.reshape(len(images), -1)[:, perm].reshape(images.shape))
  assert abs(real) < 1e-3, real
  assert other_real < 0.1 * min(noise, shuffled), (other_real, noise, shuffled)
  assert min(noise, shuffled) > 50, (noise, shuffled)
  # the same number as fid.frechet_distance on explicitly computed statistics
  stats = fid.FeatureStats.of(digits.features(digits.load_params(), images[:250]))
  np.testing.assert_allclose(digits.digit_fid(images[:250]),
                             fid.frechet_distance(stats.mu, stats.sigma, *digits.reference_stats()), rtol=1e-6)
