"""FID (MNIST classifier features): a small digit classifier shipped with sdjax, for runs without Inception weights.

This is *not* Inception FID and its numbers are not comparable with Inception FID, pytorch-fid or the literature:
it is the same Fréchet distance (sdjax.eval.fid.frechet_distance, float64) computed on the 128-d penultimate
features of `DigitNet`, a 3-convolution CNN trained on sdjax's bundled MNIST digits. Its scale is its own: real
digits score near 0, unrecognisable images score hundreds (see tests/test_digit_features.py). Report it as
"FID (MNIST classifier features)". For scale, against the shipped `test` statistics: 500 real `train` digits
(50 per class) 10.3, all 4,500 `train` digits 6.3, the 500 `test` digits rolled right by 3 pixels 40, 500 digits
that are all "1"s 764, the test digits with their pixels shuffled 648, uniform noise 1236. 63 of the 128 features
are active on real digits (65 are zero on all 500 test digits), so the distance is in effect over 63 dimensions.

Network: [B, 28, 28, 1] -> conv 3x3x16, ReLU, 2x2 max pool -> conv 3x3x32, ReLU, 2x2 max pool -> conv 3x3x64,
ReLU, 2x2 max pool (SAME padding: 28 -> 14 -> 7 -> 4) -> flatten 1024 -> dense 128, ReLU (= `features`) -> dropout
0.5 in training -> dense 10 (= `logits`). 155,786 float32 parameters.

Inputs, as sdjax.eval.inception takes them: uint8 pixels [0, 255] (what sample.py / sdjax.sampling write to
samples.npz: uint8 [N, 28, 28, 1], via sdjax.io.to_uint8), or floats in [0, 1]; [N, 28, 28] is accepted too. The
network sees them mapped to [-1, 1] (2x - 1), the default job's data range. A model's raw [-1, 1] output must go
through sdjax.io.to_uint8 (or (x + 1) / 2) first.

Shipped files (package data, next to this module):
  digits_features.npz    the weights, flat keys "<module>/<param>" (e.g. "Dense_0/kernel"), float32.
  digits_test_stats.npz  mu [128] / sigma [128, 128] float64 of the features of the bundled `test` split (all 500
                         real digits), in pytorch-fid's stats format (sdjax.eval.fid.load_stats reads it).

How they were produced (reproducible; rerun to regenerate both files):
  python tools/train_digit_features.py            # defaults: --seed 0 --epochs 20 --batch-size 100 --lr 3e-3
runs `train_classifier` (below) on the bundled `train` split only (sdjax.data.load_bundled("train"): 4,500 digits, 450
per class): optax.adam with a cosine decay from 3e-3 to 0 over 900 steps (20 epochs of batch 100), dropout 0.5, every
training image randomly rotated (+-12 degrees), scaled (0.9-1.1) and shifted (+-2 pixels); parameters from
jax.random.PRNGKey(0), dropout keys from jax.random.fold_in(jax.random.PRNGKey(1), step), batch order and augmentation
from np.random.default_rng(0). Produced on CPU with jax 0.10.2, flax 0.12.8, optax 0.2.8, scipy 1.17.1 in about 2
minutes (two shared cores); a second run wrote byte-identical files (sha256 2d73d77770a8b2ec... weights,
99037b30cfa5e09c... stats). Accuracy on the bundled `test` split (500 digits never used in training): 0.984 (492/500;
train split 0.991). The script prints it and refuses to write weights below 0.98. The test split is the reference set
of `digit_fid`, so the features were never fitted to it.
"""
from __future__ import annotations

import functools
import importlib.resources
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdjax.eval import fid

IMAGE_SHAPE = (28, 28, 1)
FEATURE_DIM = 128
NUM_CLASSES = 10
WEIGHTS_FILE = "digits_features.npz"
TEST_STATS_FILE = "digits_test_stats.npz"
BATCH_SIZE = 500  # one compile: every call of the helpers below runs in batches of this size (padded)


class DigitNet(nn.Module):
  """The digit classifier; __call__ returns (features [B, 128] after ReLU, logits [B, 10]) for [B, 28, 28, 1]
  inputs already in [-1, 1]. Dropout (on the features, before the last layer) acts only with train=True, which
  needs a "dropout" rng; features are always the undropped ones."""
  widths: tuple[int, ...] = (16, 32, 64)
  dropout_rate: float = 0.5

  @nn.compact
  def __call__(self, x, train: bool = False):
    for width in self.widths:
      x = nn.relu(nn.Conv(width, (3, 3), padding="SAME")(x))
      x = nn.max_pool(x, (2, 2), (2, 2), padding="SAME")
    x = x.reshape(x.shape[0], -1)  # [B, 4 * 4 * 64]
    feats = nn.relu(nn.Dense(FEATURE_DIM)(x))
    return feats, nn.Dense(NUM_CLASSES)(nn.Dropout(self.dropout_rate, deterministic=not train)(feats))


def preprocess(images) -> jax.Array:
  """uint8 [B, 28, 28(, 1)] in [0, 255] or floats in [0, 1] -> float32 [B, 28, 28, 1] in [-1, 1]."""
  images = jnp.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.shape[1:] != IMAGE_SHAPE:
    raise ValueError(f"digit images must be [B, 28, 28, 1] (or [B, 28, 28]), got shape {images.shape}")
  x = images.astype(jnp.float32)
  if images.dtype == jnp.uint8:
    x = x / 255.0
  return 2.0 * x - 1.0


@jax.jit
def apply(params: Mapping[str, Any], images) -> tuple[jax.Array, jax.Array]:
  """Pure and jitted: (features [B, 128], logits [B, 10]) float32 for digit images (see `preprocess`)."""
  return DigitNet().apply({"params": params}, preprocess(images))


def features(params: Mapping[str, Any], images) -> jax.Array:
  """The 128-d penultimate (post-ReLU) features [B, 128] float32 of digit images."""
  return apply(params, images)[0]


def logits(params: Mapping[str, Any], images) -> jax.Array:
  """The class logits [B, 10] float32 of digit images."""
  return apply(params, images)[1]


def init_params(seed: int = 0) -> dict[str, Any]:
  """Freshly initialised parameters (jax.random.PRNGKey(seed)), as the training script starts from."""
  return DigitNet().init(jax.random.PRNGKey(seed), jnp.zeros((1, *IMAGE_SHAPE)))["params"]


# --- the shipped weights and statistics ---

def _resource(name: str):
  return importlib.resources.files("sdjax.eval").joinpath(name)


def flatten_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """{"Conv_0/kernel": float32 array, ...}: the layout of digits_features.npz."""
  return {f"{module}/{name}": np.asarray(value, np.float32)
          for module, leaves in params.items() for name, value in leaves.items()}


def unflatten_params(flat: Mapping[str, np.ndarray], what: str = "digit weights") -> dict[str, Any]:
  """The inverse of `flatten_params`, checked against DigitNet's parameter shapes."""
  expected = {f"{module}/{name}": spec.shape
              for module, leaves in jax.eval_shape(init_params).items() for name, spec in leaves.items()}
  if sorted(flat) != sorted(expected):
    raise ValueError(f"{what}: keys {sorted(flat)} do not match DigitNet's {sorted(expected)}")
  params: dict[str, dict[str, np.ndarray]] = {}
  for key, shape in expected.items():
    value = np.asarray(flat[key])
    if value.shape != shape:
      raise ValueError(f"{what}: {key} has shape {value.shape}, DigitNet expects {shape}")
    module, name = key.split("/")
    params.setdefault(module, {})[name] = value.astype(np.float32)
  return params


@functools.cache
def load_params() -> dict[str, Any]:
  """The shipped weights (digits_features.npz, package data); read once per process."""
  with _resource(WEIGHTS_FILE).open("rb") as f, np.load(f, allow_pickle=False) as z:
    return unflatten_params({k: z[k] for k in z.files}, WEIGHTS_FILE)


@functools.cache
def reference_stats() -> tuple[np.ndarray, np.ndarray]:
  """(mu [128], sigma [128, 128]) float64 of the features of the bundled `test` split (digits_test_stats.npz)."""
  with importlib.resources.as_file(_resource(TEST_STATS_FILE)) as path:
    return fid.load_stats(str(path))


def _batches(params, images, batch_size: int = BATCH_SIZE):
  """(features, logits) as float numpy per batch of `batch_size` (the last one padded, then trimmed)."""
  images = np.asarray(images)
  for i in range(0, len(images), batch_size):
    chunk = images[i:i + batch_size]
    n = len(chunk)
    if n < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]), chunk.dtype)])
    f, lg = jax.device_get(apply(params, chunk))
    yield f[:n], lg[:n]


def feature_stats(images, params: Mapping[str, Any] | None = None) -> fid.FeatureStats:
  """Streaming float64 statistics (sdjax.eval.fid.FeatureStats) of the features of `images` [N, 28, 28(, 1)];
  the shipped weights unless `params`."""
  params = load_params() if params is None else params
  stats = fid.FeatureStats.empty(FEATURE_DIM)
  for f, _ in _batches(params, images):
    stats = stats.update(f)
  return stats


def digit_fid(images, reference: tuple[np.ndarray, np.ndarray] | None = None) -> float:
  """FID (MNIST classifier features) of `images` [N >= 2, 28, 28(, 1)] (uint8, or floats in [0, 1]) against
  `reference` (mu, sigma), by default the shipped statistics of the real bundled `test` split. Not Inception FID.

  Like any FID it is biased upwards for small N: compare numbers computed from the same N (e.g. 1,000 samples).
  """
  stats = feature_stats(images)
  mu, sigma = reference_stats() if reference is None else reference
  return fid.frechet_distance(stats.mu, stats.sigma, mu, sigma)


def predict(images) -> np.ndarray:
  """The shipped classifier's predicted class int32 [N] of digit images."""
  params = load_params()
  preds = [np.argmax(lg, axis=-1) for _, lg in _batches(params, images)]
  return np.concatenate(preds).astype(np.int32) if preds else np.zeros(0, np.int32)


def digit_accuracy(images, labels) -> float:
  """Fraction of `images` that the shipped classifier assigns to `labels` [N] (for samples: the class each was
  conditioned on)."""
  labels = np.asarray(labels)
  if len(labels) != len(images) or not len(labels):
    raise ValueError(f"digit_accuracy needs as many labels as images (and at least one): {len(labels)} labels, "
                     f"{len(images)} images")
  return float(np.mean(predict(images) == labels))


# --- training (tools/train_digit_features.py; sdjax.eval.colored_digits.classification_accuracy_score) ---

MAX_DEGREES, SCALE_RANGE, MAX_SHIFT = 12.0, (0.9, 1.1), 2.0


def augment_batch(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Each uint8 [B, 28, 28, 1] image rotated by a random angle in +-12 degrees and scaled by a random factor in
  [0.9, 1.1] about its centre, then shifted by a random (dy, dx) in [-2, 2]^2 (scipy.ndimage: bilinear, zero fill,
  rounded). Draws 4 numbers per image from `rng`, in image order."""
  from scipy import ndimage
  out = np.empty_like(images)
  centre = np.array([13.5, 13.5])
  for i, image in enumerate(images):
    angle = np.deg2rad(rng.uniform(-MAX_DEGREES, MAX_DEGREES))
    scale = rng.uniform(*SCALE_RANGE)
    shift = rng.uniform(-MAX_SHIFT, MAX_SHIFT, 2)
    m = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) / scale  # output -> input
    warped = ndimage.affine_transform(image[:, :, 0].astype(np.float32), m, centre - m @ centre - shift, order=1)
    out[i, :, :, 0] = np.clip(np.round(warped), 0, 255)
  return out


def train_classifier(images, labels, *, seed: int = 0, epochs: int = 20, batch_size: int = 100, lr: float = 3e-3,
                     augment: bool = True,
                     on_epoch: Callable[[int, dict[str, Any], float], None] | None = None) -> dict[str, Any]:
  """A freshly trained DigitNet's parameters (host numpy) for digit `images` [N, 28, 28(, 1)] (uint8, or floats in
  [0, 1], rounded to uint8) and int `labels` [N] in 0..9: the recipe of the shipped weights.

  optax.adam with a cosine decay from `lr` to 0 over all epochs * (N // batch_size) steps (each epoch a fresh
  permutation; the last N % batch_size images of it are left out; N >= batch_size), softmax cross-entropy, dropout
  0.5 on the features, each batch `augment_batch`ed unless augment=False. Seeded: parameters from
  jax.random.PRNGKey(seed), dropout from jax.random.fold_in(jax.random.PRNGKey(seed + 1), step), batch order and
  augmentation from np.random.default_rng(seed), so a rerun on the same software and backend gives the same weights.
  `on_epoch(epoch, params, mean train loss)` (epoch from 0, host params) is called after every epoch. About 0.13 s a
  step on two CPU cores (plus one compile per call).
  """
  import optax
  images, labels = np.asarray(images), np.asarray(labels)
  if images.ndim == 3:
    images = images[..., None]
  if images.shape[1:] != IMAGE_SHAPE or labels.shape != images.shape[:1]:
    raise ValueError(f"train_classifier needs images [N, 28, 28(, 1)] and labels [N], got {images.shape} and "
                     f"{labels.shape}")
  if images.dtype != np.uint8:
    images = np.clip(np.rint(images.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
  if not np.all((labels >= 0) & (labels < NUM_CLASSES)):
    raise ValueError(f"labels must be in 0..{NUM_CLASSES - 1}, got {np.unique(labels)}")
  steps_per_epoch = len(images) // batch_size
  if steps_per_epoch < 1 or epochs < 1:
    raise ValueError(f"train_classifier needs epochs >= 1 and at least batch_size={batch_size} images, got "
                     f"epochs={epochs} and {len(images)} images")
  params = init_params(seed)
  opt = optax.adam(optax.cosine_decay_schedule(lr, epochs * steps_per_epoch))
  opt_state = opt.init(params)
  dropout_key = jax.random.PRNGKey(seed + 1)
  net = DigitNet()

  @jax.jit
  def step(params, opt_state, x, y, step_index):
    def loss_fn(p):
      rngs = {"dropout": jax.random.fold_in(dropout_key, step_index)}
      logits = net.apply({"params": p}, preprocess(x), train=True, rngs=rngs)[1]
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  for epoch in range(epochs):
    order = rng.permutation(len(images))
    losses = []
    for i in range(steps_per_epoch):
      idx = order[i * batch_size:(i + 1) * batch_size]
      x = augment_batch(images[idx], rng) if augment else images[idx]
      params, opt_state, loss = step(params, opt_state, jnp.asarray(x), jnp.asarray(labels[idx]),
                                     np.int32(epoch * steps_per_epoch + i))
      losses.append(loss)
    if on_epoch is not None:
      on_epoch(epoch, jax.device_get(params), float(np.mean(losses)))
  return jax.device_get(params)
