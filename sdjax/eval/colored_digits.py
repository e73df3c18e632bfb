"""A judge for generated coloured digits (sdjax.data.colored_digits) and their Classification Accuracy Score.

`judge(images)` reads each uint8 [N, 32, 32, 3] image (or floats in [0, 1]) back into (digit, foreground,
background) from pixel statistics alone, without assuming the palette is painted exactly:
  background  the per-channel median of the 2-pixel border (240 pixels, empty in every real example), named by the
              nearest colour of BACKGROUNDS (Euclidean RGB).
  ink         each pixel's RGB distance from the background, less a noise floor (the 90th percentile of the border
              pixels' distances: 0 for a painted image), divided by the image's largest such distance (at least
              MIN_CONTRAST = 32 RGB units, so a near-blank image gives faint ink, not amplified noise), in [0, 1].
  digit       the shipped grayscale classifier (sdjax.eval.digits.predict) on `decolour(images)`: ink * 255, rounded,
              centre 28x28 crop, uint8 [N, 28, 28, 1], ink bright on black (MNIST's convention).
  foreground  the colour at full ink, background + sum(ink * (x - background)) / sum(ink^2) (the least-squares fit
              of the painting model x = background + ink * (foreground - background)), named by the nearest colour
              of FOREGROUNDS; -1 / "none" for an image without ink.
`score(images, attributes)` gives the fraction judged right per attribute and for all three at once.

Measured on the real painted digits (ColoredDigitsSource(split).arrays(); painting is exact up to uint8 rounding):
  test (500):     digit 0.984 (as the classifier on the original grayscale digits: 0.984), foreground 1.0,
                  background 1.0, all three 0.984.
  train (4,500):  digit 0.991 (grayscale: 0.991), foreground 1.0, background 1.0, all three 0.991.
`decolour` of a painted real digit is the original within 2 grey levels (measured on both splits: at most 2, and
2.3% of the pixels differ at all: uint8 rounding of the paint, and a digit whose brightest pixel is 254, not 255,
comes back stretched by 255/254).

Classification Accuracy Score (Ravuri & Vinyals 2019, "Classification Accuracy Score for Conditional Generative
Models"): train a classifier on generated images only, labelled with the class they were conditioned on, and report
its accuracy on real held-out data. Here: `decolour` the generated images, train a fresh DigitNet with the recipe of
the shipped weights (sdjax.eval.digits.train_classifier) and score it on the 500 real digits of the bundled `test`
split (grayscale, as sdjax.data.bundled gives them). The recipe is per epoch, so the steps scale with the number of
images: epochs * (N // batch_size) steps of batch 100, a cosine decay from 3e-3 to 0 over all of them (4,500 images,
20 epochs: 900 steps, the shipped classifier's schedule; 45,000 images: 9,000 steps), augmentation and dropout as
for the shipped weights. Real data for scale: the 4,500 painted `train` digits, decoloured, score 0.980 (490/500; the
shipped classifier, trained the same way on the grayscale originals: 0.984), in about 2.5 minutes on two shared CPU
cores.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np

from sdjax.data.colored_digits import BACKGROUNDS, FOREGROUNDS, PAD, SIZE
from sdjax.eval import digits

FOREGROUND_NAMES = tuple(FOREGROUNDS)
BACKGROUND_NAMES = tuple(BACKGROUNDS)
NO_INK = -1  # `judge`'s foreground index (name "none") for an image without ink
NOISE_PERCENTILE = 90.0
MIN_CONTRAST = 32.0  # RGB distance units (0..255 per channel)

_FG_RGB = np.array([FOREGROUNDS[n] for n in FOREGROUND_NAMES], np.float64)  # [4, 3]
_BG_RGB = np.array([BACKGROUNDS[n] for n in BACKGROUND_NAMES], np.float64)  # [2, 3]
_BORDER = np.ones((SIZE, SIZE), bool)
_BORDER[PAD:SIZE - PAD, PAD:SIZE - PAD] = False  # [32, 32]: the 240 pixels outside the padded 28x28 digit


def _rgb(images) -> np.ndarray:
  """float64 [N, 32, 32, 3] in [0, 255] from uint8 pixels or floats in [0, 1]."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[1:] != (SIZE, SIZE, 3):
    raise ValueError(f"coloured digit images must be [N, {SIZE}, {SIZE}, 3], got shape {images.shape}")
  x = images.astype(np.float64)
  return x if images.dtype == np.uint8 else np.clip(x, 0.0, 1.0) * 255.0


def _analyse(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(background [N, 3], ink [N, 32, 32] in [0, 1], contrast [N]) of float RGB images [N, 32, 32, 3] in [0, 255];
  contrast is the largest distance from the background above the noise floor (0 for a blank image)."""
  background = np.median(x[:, _BORDER], axis=1)  # [N, 3]
  dist = np.linalg.norm(x - background[:, None, None], axis=-1)  # [N, 32, 32]
  floor = np.percentile(dist[:, _BORDER], NOISE_PERCENTILE, axis=1)  # [N]
  contrast = np.maximum(dist.max(axis=(1, 2)) - floor, 0.0)
  ink = np.clip((dist - floor[:, None, None]) / np.maximum(contrast, MIN_CONTRAST)[:, None, None], 0.0, 1.0)
  return background, ink, contrast


def decolour(images) -> np.ndarray:
  """uint8 [N, 28, 28, 1] grayscale digits, ink bright on black (MNIST's convention), of coloured digit images
  uint8 [N, 32, 32, 3] (or floats in [0, 1]): the ink (see the module docstring) * 255, rounded, centre 28x28 crop.
  A painted real digit comes back within 2 grey levels of the original; a blank image comes back all 0."""
  _, ink, _ = _analyse(_rgb(images))
  crop = ink[:, PAD:SIZE - PAD, PAD:SIZE - PAD, None]
  return np.rint(crop * 255.0).astype(np.uint8)


def _nearest(colours: np.ndarray, palette: np.ndarray) -> np.ndarray:
  return np.argmin(np.linalg.norm(colours[:, None] - palette[None], axis=-1), axis=1).astype(np.int32)


def judge(images) -> dict[str, np.ndarray]:
  """What coloured digit images [N, 32, 32, 3] show (module docstring), as numpy arrays [N]:
    digit            int32, the shipped classifier's class of `decolour(images)`
    foreground       int32 index into FOREGROUND_NAMES, NO_INK (-1) for an image without ink
    background       int32 index into BACKGROUND_NAMES
    foreground_name, background_name   str ("none" for NO_INK)
    foreground_rgb, background_rgb     float32 [N, 3] estimated colours in [0, 255] (foreground: the background's
                                       where there is no ink)
    contrast         float32, RGB distance of the strongest ink from the background above the noise floor
  """
  x = _rgb(images)
  background, ink, contrast = _analyse(x)
  weight = np.sum(ink ** 2, axis=(1, 2))  # [N]
  has_ink = weight > 0
  fit = np.einsum("nhw,nhwc->nc", ink, x - background[:, None, None]) / np.where(has_ink, weight, 1.0)[:, None]
  foreground = np.clip(background + fit, 0.0, 255.0)  # [N, 3]; = background where there is no ink (fit = 0)
  fg = np.where(has_ink, _nearest(foreground, _FG_RGB), NO_INK).astype(np.int32)
  bg = _nearest(background, _BG_RGB)
  crop = ink[:, PAD:SIZE - PAD, PAD:SIZE - PAD, None]
  return {
      "digit": digits.predict(np.rint(crop * 255.0).astype(np.uint8)),
      "foreground": fg,
      "background": bg,
      "foreground_name": np.array([FOREGROUND_NAMES[i] if i >= 0 else "none" for i in fg], dtype=str),
      "background_name": np.array([BACKGROUND_NAMES[i] for i in bg], dtype=str),
      "foreground_rgb": foreground.astype(np.float32),
      "background_rgb": background.astype(np.float32),
      "contrast": contrast.astype(np.float32),
  }


def _index(value: Any, names: Sequence[str], what: str) -> int:
  if isinstance(value, str):
    if value not in names:
      raise ValueError(f"unknown {what} colour {value!r}; expected one of {list(names)}")
    return names.index(value)
  if not 0 <= int(value) < len(names):
    raise ValueError(f"{what} index {value} out of range for {list(names)}")
  return int(value)


def score(images, attributes: Sequence[tuple[Any, Any, Any]]) -> dict[str, float]:
  """Fractions of `images` [N, 32, 32, 3] whose `judge`ment matches the target `attributes` [(digit, foreground,
  background)] * N (colours as names or indices, as ColoredDigitsSource.attributes gives them): keys "digit",
  "foreground", "background" and "all" (all three right)."""
  if len(attributes) != len(images) or not len(attributes):
    raise ValueError(f"score needs one (digit, foreground, background) per image (and at least one image): "
                     f"{len(attributes)} attributes, {len(images)} images")
  target = np.array([(int(d), _index(f, FOREGROUND_NAMES, "foreground"), _index(b, BACKGROUND_NAMES, "background"))
                     for d, f, b in attributes], np.int32)  # [N, 3]
  j = judge(images)
  right = np.stack([j["digit"] == target[:, 0], j["foreground"] == target[:, 1], j["background"] == target[:, 2]])
  return {"digit": float(right[0].mean()), "foreground": float(right[1].mean()),
          "background": float(right[2].mean()), "all": float(right.all(axis=0).mean())}


@functools.cache
def _real_test() -> tuple[np.ndarray, np.ndarray]:
  """The bundled `test` split, uint8 [500, 28, 28, 1] and int32 [500], in file order (= load_bundled("test"),
  read from the CSV without TFDS)."""
  from sdjax.data import bundled
  images, labels = bundled.read_raw()
  idx = bundled.split_indices(labels, "test")
  return images[idx], labels[idx]


def classification_accuracy_score(images, labels, *, seed: int = 0, epochs: int = 20, batch_size: int = 100,
                                  lr: float = 3e-3, augment: bool = True) -> float:
  """Classification Accuracy Score of generated coloured digits [N, 32, 32, 3] (uint8, or floats in [0, 1]) conditioned
  on digit `labels` [N]: the accuracy, on the 500 real digits of the bundled `test` split, of a DigitNet trained on
  `decolour(images)` only (sdjax.eval.digits.train_classifier with these arguments; epochs * (N // batch_size) steps,
  so N >= batch_size). Deterministic for a seed on one backend."""
  params = digits.train_classifier(decolour(images), labels, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr,
                                   augment=augment)
  x_test, y_test = _real_test()
  return float(np.mean(np.argmax(np.asarray(digits.logits(params, x_test)), axis=-1) == y_test))
