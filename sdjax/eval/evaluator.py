"""Evaluation inside training runs: `config.eval` parsed once (`EvalConfig`), and the `Evaluator` that turns
rendered images (and their class labels or prompts) into metrics.

The trainer (sdjax.train.trainer) renders `num_samples` images from the EMA params every `every_steps` steps
with the task's sampling code, batch by batch, split over the mesh's batch devices, and hands each batch to
`Evaluator.evaluate` while it is still on the devices: pixels become uint8 there, the feature network runs there,
and only the features [B, D] come back, folded into a float64 `sdjax.eval.fid.FeatureStats`, so FID holds
O(D^2) memory whatever `num_samples` is. kid / precision / recall compare individual features and keep the
generated ones ([num_samples, D] float32; the real side's are computed once, when the Evaluator is built).
The math is sdjax.eval's (fid.frechet_distance, fid.kid, precision_recall, clip_score); nothing is redone here.

Metric names (`config.eval.metrics`) and the keys `evaluate` returns (the trainer logs them as `eval/<key>`):
  fid             `fid` with Inception features; `digit_fid` with the shipped digit classifier's (sdjax.eval.digits:
                  "FID (MNIST classifier features)", not comparable with Inception FID), against reference_stats
  kid             `kid`, `kid_std` (torch-fidelity's KID; subsets of min(1000, both sides' counts))
  precision       `precision`, `recall`: improved precision/recall (k = 3) against reference_images
  recall
  clip_score      `clip_score` of each image against its prompt (text-to-image tasks; needs clip_model)
  digit_accuracy  `digit_accuracy`: the digit classifier's accuracy against the conditioning class (28x28x1
                  class-conditional digit runs)

Every path is checked when the config is parsed, before the trainer builds anything (errors name the full key,
e.g. `config.eval.inception_weights: ...`); weights and reference statistics are read when the Evaluator is built,
still before the first train step. This module imports nothing from sdjax.train.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from sdjax import parallel, samplers
from sdjax.eval import fid, run

METRICS = ("fid", "kid", "precision", "recall", "clip_score", "digit_accuracy")
FEATURES = ("digits", "inception")
KEY = "config.eval"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """config.eval, parsed and checked once; `every_steps` 0 turns evaluation off (then no path is checked)."""
  every_steps: int = 0
  num_samples: int = 100
  batch_size: int = 100
  sampler: str = "ddpm"
  steps: int = 50
  guidance: float = 2.0
  metrics: tuple[str, ...] = ("fid",)
  features: str = "digits"
  inception_weights: str = ""
  reference_stats: str = ""
  reference_images: str = ""
  clip_model: str = ""
  clip_tokenizer: str = ""
  prompts: str = ""
  seed: int = 0

  @property
  def enabled(self) -> bool:
    return self.every_steps > 0

  @property
  def keeps_features(self) -> bool:
    """kid / precision / recall compare individual features: both sides' are kept."""
    return any(m in self.metrics for m in ("kid", "precision", "recall"))

  @property
  def real_images(self) -> str:
    """The real images of kid / precision / recall: reference_images, for digits by default the bundled test split."""
    return self.reference_images or ("bundled:test" if self.features == "digits" else "")

  @classmethod
  def from_config(cls, section: Mapping[str, Any] | None, key: str = KEY) -> "EvalConfig":
    """The parsed section (None or missing: evaluation off); a ValueError / FileNotFoundError naming the key."""
    section = dict(section or {})
    unknown = sorted(set(section) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f"{key}.{unknown[0]}: unknown key; expected one of {[f.name for f in dataclasses.fields(cls)]}")
    get = lambda name: section.get(name, getattr(cls, name))
    metrics = get("metrics")
    metrics = tuple(m.strip() for m in metrics.split(",") if m.strip()) if isinstance(metrics, str) else tuple(metrics)
    values = {}
    for f in dataclasses.fields(cls):
      if f.name == "metrics":
        continue
      convert = {"int": int, "float": float, "str": str}[f.type]
      try:
        values[f.name] = convert(get(f.name) if get(f.name) is not None else getattr(cls, f.name))
      except (TypeError, ValueError) as e:
        raise ValueError(f"{key}.{f.name}: {e}") from None
    c = cls(metrics=metrics, **values)
    c._check(key)
    return c

  def _check(self, key: str) -> None:
    for field in ("every_steps", "seed"):
      if getattr(self, field) < 0:
        raise ValueError(f"{key}.{field} must be >= 0, got {getattr(self, field)}")
    for field in ("batch_size", "steps"):
      if getattr(self, field) < 1:
        raise ValueError(f"{key}.{field} must be >= 1, got {getattr(self, field)}")
    if self.num_samples < 2:
      raise ValueError(f"{key}.num_samples must be >= 2 (a covariance needs two images), got {self.num_samples}")
    if not np.isfinite(self.guidance) or self.guidance < 0:
      raise ValueError(f"{key}.guidance must be a finite number >= 0, got {self.guidance}")
    if not self.metrics:
      raise ValueError(f"{key}.metrics is empty; give some of {', '.join(METRICS)}")
    for m in self.metrics:
      if m not in METRICS:
        raise ValueError(f"{key}.metrics: unknown metric {m!r}; available: {', '.join(METRICS)}")
    if self.features not in FEATURES:
      raise ValueError(f"{key}.features: unknown feature network {self.features!r}; available: {', '.join(FEATURES)}")
    if ("precision" in self.metrics or "recall" in self.metrics) and self.num_samples < 4:
      raise ValueError(f"{key}.num_samples must be >= 4 for precision/recall (k = 3 nearest neighbours), got "
                       f"{self.num_samples}")
    try:
      samplers.get(self.sampler)
    except ValueError as e:
      raise ValueError(f"{key}.sampler: {e}") from None
    if self.features == "digits" and self.inception_weights:
      raise ValueError(f"{key}.inception_weights applies to {key}.features='inception' only")
    if not self.enabled:
      return
    # Paths: checked now, so that a wrong one stops the run before anything is built or trained.
    if self.features == "inception":
      if not self.inception_weights:
        raise ValueError(f"{key}.inception_weights is empty: {key}.features='inception' needs pytorch-fid's "
                         "pt_inception-2015-12-05-6726825d.pth (no Inception weights ship with sdjax)")
      _check_path(self.inception_weights, f"{key}.inception_weights", "file")
      if "fid" in self.metrics and not (self.reference_stats or self.reference_images):
        raise ValueError(f"{key}.reference_stats is empty: Inception FID needs the real images' statistics "
                         "(an .npz with mu/sigma: python eval.py --real FOLDER --save_real_stats FILE)")
    if self.reference_stats:
      _check_path(self.reference_stats, f"{key}.reference_stats", "file")
    if self.keeps_features:
      if not self.real_images:
        raise ValueError(f"{key}.reference_images is empty: {key}.metrics kid / precision / recall compare "
                         "individual features and need real images (a folder), not statistics")
      if self.real_images.startswith("bundled:"):
        if self.real_images.partition(":")[2] not in run.BUNDLED_SPLITS:
          raise ValueError(f"{key}.reference_images: unknown bundled split {self.real_images!r}; use bundled:train "
                           "or bundled:test")
      else:
        _check_path(self.real_images, f"{key}.reference_images", "folder")
    if "clip_score" in self.metrics:
      if not self.clip_model:
        raise ValueError(f"{key}.clip_model is empty: clip_score needs a transformers CLIPModel folder "
                         "(e.g. openai/clip-vit-large-patch14)")
      _check_path(self.clip_model, f"{key}.clip_model", "folder")
      if self.clip_tokenizer:
        _check_path(self.clip_tokenizer, f"{key}.clip_tokenizer", "folder")
    elif self.clip_model or self.clip_tokenizer:
      raise ValueError(f"{key}.clip_model / clip_tokenizer are set but {key}.metrics has no clip_score")
    if self.prompts:
      _check_path(self.prompts, f"{key}.prompts", "file")

  def check_images(self, image_shape: Sequence[int], *, labels: bool, prompts: bool, what: str, key: str = KEY
                   ) -> None:
    """That the images `what` renders ([H, W, C]; with class labels / prompts or not) can be judged as asked."""
    h, w, ch = image_shape
    if ch not in (1, 3, 4):
      raise ValueError(f"{key}: {what} renders {ch}-channel images; the feature networks take 1 or 3 channels")
    if self.features == "digits" and (h, w, ch) != (28, 28, 1):
      raise ValueError(f"{key}.features='digits' needs 28x28x1 images; {what} renders {h}x{w}x{ch} "
                       "(use features='inception')")
    if "digit_accuracy" in self.metrics and ((h, w, ch) != (28, 28, 1) or not labels):
      raise ValueError(f"{key}.metrics: digit_accuracy needs class-conditional 28x28x1 digits; {what} renders "
                       f"{h}x{w}x{ch} images{' without class labels' if not labels else ''}")
    if "clip_score" in self.metrics and not prompts:
      raise ValueError(f"{key}.metrics: clip_score needs prompts; {what} renders images without any")


def _check_path(path: str, field: str, kind: str) -> None:
  """`path` is a regular file (kind "file": a FIFO, device or folder is not) or a folder."""
  p = os.path.expanduser(path)
  if not os.path.exists(p):
    raise FileNotFoundError(f"{field}: {path} does not exist")
  if kind == "file" and not os.path.isfile(p):
    raise ValueError(f"{field}: {path} is not a regular file")
  if kind == "folder" and not os.path.isdir(p):
    raise ValueError(f"{field}: {path} is not a folder")


def read_prompts(path: str, key: str = KEY) -> list[str]:
  """The non-empty lines of a prompts file (UTF-8), stripped; an error naming `<key>.prompts` for none."""
  with open(os.path.expanduser(path), encoding="utf-8") as f:
    prompts = [line.strip() for line in f if line.strip()]
  if not prompts:
    raise ValueError(f"{key}.prompts: {path} holds no prompts (one per line)")
  return prompts


class Batch(NamedTuple):
  """One rendered batch: `images` [B, H, W, C] in [-1, 1] (on the devices; rows from `count` on are padding),
  the conditioning class of the first `count` rows (or None) and their prompts (or None)."""
  images: jax.Array
  count: int
  labels: np.ndarray | None = None
  prompts: Sequence[str] | None = None


@jax.jit
def _to_uint8(images: jax.Array) -> jax.Array:
  """[-1, 1] floats -> uint8 [0, 255], on the devices, exactly as sdjax.io.to_uint8 (round half to even, clip)."""
  return jnp.clip(jnp.round((images.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def _rgb(images: jax.Array) -> jax.Array:
  return jnp.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images[..., :3]


def _gather(x: jax.Array) -> np.ndarray:
  """A (possibly sharded, possibly multi-host) array as host numpy, identical on every process."""
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class Evaluator:
  """The feature network (replicated on `mesh`), the reference side and, if asked, a CLIP scorer; built once
  at start-up. Errors name `config.eval.<field>`."""

  def __init__(self, config: EvalConfig, mesh: jax.sharding.Mesh, key: str = KEY):
    self.config, self.mesh, self.key = config, mesh, key
    try:
      self.extractor = run.make_extractor(config.features, mesh=mesh,
                                          inception_weights=os.path.expanduser(config.inception_weights) or None)
    except run.EvalError as e:
      raise ValueError(f"{key}.inception_weights: {e}".replace("--inception_weights: ", "")) from None
    self.label = self.extractor.label
    self.fid_key = "digit_fid" if config.features == "digits" else "fid"
    self._digit_params = None
    if "digit_accuracy" in config.metrics:
      from sdjax.eval import digits
      self._digit_params = jax.device_put(digits.load_params(), parallel.replicated(mesh))
    self.real_features = None
    real_stats = None
    if config.keeps_features or (config.reference_images and not config.reference_stats):
      try:
        real = run.open_real(os.path.expanduser(config.real_images), f"{key}.reference_images")
        if not isinstance(real, run.ImageSet):
          raise run.EvalError(f"{key}.reference_images: {config.real_images} is a file; give real images (a folder "
                              "or bundled:test), statistics go in reference_stats")
        p = run.feature_pass(real, self.extractor, config.batch_size, keep=config.keeps_features, progress=False)
      except run.EvalError as e:
        raise ValueError(str(e)) from None
      self.real_features, real_stats = p.features, (p.stats.mu, p.stats.sigma)
    if "fid" in config.metrics:
      self.reference = self._reference_stats() if config.reference_stats or real_stats is None else real_stats
    self.clip = None
    if "clip_score" in config.metrics:
      try:
        self.clip = run.make_clip_scorer(os.path.expanduser(config.clip_model),
                                         os.path.expanduser(config.clip_tokenizer) or None)
      except run.EvalError as e:
        raise ValueError(f"{key}.clip_model / clip_tokenizer: {e}".replace("--clip_model: ", "")) from None

  def _reference_stats(self) -> tuple[np.ndarray, np.ndarray]:
    c, field = self.config, f"{self.key}.reference_stats"
    if c.reference_stats:
      try:
        mu, sigma = fid.load_stats(os.path.expanduser(c.reference_stats))
      except ValueError as e:
        raise ValueError(f"{field}: {e}") from None
    else:  # digits: the shipped statistics of the bundled test split
      from sdjax.eval import digits
      mu, sigma = digits.reference_stats()
    if mu.shape != (self.extractor.dim,):
      raise ValueError(f"{field}: the statistics have {mu.shape[0]}-d features; {self.key}.features="
                       f"{c.features!r} gives {self.extractor.dim}-d ones (statistics of another feature network?)")
    return mu, sigma

  def evaluate(self, batches: Iterable[Batch]) -> dict[str, float]:
    """The metrics of all the batches' images, as {key: float} (the keys in the module docstring)."""
    c, ex = self.config, self.extractor
    stats, kept = fid.FeatureStats.empty(ex.dim), []
    clip_sum, correct, count = 0.0, 0, 0
    for batch in batches:
      n = batch.count
      pixels = _to_uint8(batch.images)
      x = pixels if pixels.shape[-1] == ex.channels else _rgb(pixels)
      feats = _gather(ex.fn(x))[:n].astype(np.float32)
      stats = stats.update(feats)
      if c.keeps_features:
        kept.append(feats)
      if self._digit_params is not None:
        from sdjax.eval import digits
        predicted = np.argmax(_gather(digits.logits(self._digit_params, pixels))[:n], axis=-1)
        correct += int(np.sum(predicted == np.asarray(batch.labels)[:n]))
      if self.clip is not None:
        prompts = list(batch.prompts)[:n] + [""] * (len(pixels) - n)
        clip_sum += float(np.sum(self.clip.scores(_rgb(pixels) if pixels.shape[-1] != 3 else pixels,
                                                  prompts)[:n], dtype=np.float64))
      count += n
    if count < 2:
      raise ValueError(f"{self.key}: {count} images were rendered; the metrics need at least 2")
    out: dict[str, float] = {}
    if "fid" in c.metrics:
      out[self.fid_key] = fid.frechet_distance(stats.mu, stats.sigma, *self.reference)
    fake = np.concatenate(kept) if kept else None
    if "kid" in c.metrics:
      size = min(run.KID_SUBSET_SIZE, len(self.real_features), len(fake))
      out["kid"], out["kid_std"] = fid.kid(self.real_features, fake, num_subsets=run.KID_SUBSETS, subset_size=size)
    if "precision" in c.metrics or "recall" in c.metrics:
      from sdjax.eval import precision_recall
      p, r = precision_recall.precision_recall(self.real_features, fake)
      out.update({k: v for k, v in (("precision", p), ("recall", r)) if k in c.metrics})
    if self.clip is not None:
      from sdjax.eval import clip_score
      out["clip_score"] = clip_score.from_sums(clip_sum, count)
    if self._digit_params is not None:
      out["digit_accuracy"] = correct / count
    return out
