"""Captioned, coloured MNIST digits ("a red 7 on a black background"), made from the bundled 5,000 digits.

Example i of a split is digit i of the bundled split (`train`: 4,500, `test`: 500; sdjax.data.bundled), padded
from 28x28 to 32x32 and painted: the digit's ink is the alpha between a background and a foreground colour,
`image = background * (1 - a) + foreground * a`, a = pixel / 255, rounded to uint8 [32, 32, 3]. Its colours are
drawn from (split seed, i) alone, so the dataset needs no files and is the same on every machine.

4 foreground colours x 2 backgrounds x 10 digits = 80 captions. For compositional generalisation, five
(digit, foreground) pairs never occur in `train` (`HELD_OUT`: each even digit with one colour, both
backgrounds: 10 of the 80 captions); a train example drawn with a held-out pair takes the next foreground
colour instead. `test` draws every combination uniformly. `label` is the digit; `attributes(i)` gives
(digit, foreground, background) for judging generated images (sdjax.eval.colored_digits).
"""
from __future__ import annotations

import functools

import numpy as np

FOREGROUNDS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40)}
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255)}
DIGITS = tuple(range(10))
# (digit, foreground) pairs left out of `train`: every even digit with one colour.
HELD_OUT = frozenset((d, list(FOREGROUNDS)[(d // 2) % len(FOREGROUNDS)]) for d in DIGITS if d % 2 == 0)
SEEDS = {"train": 0, "test": 1}
SIZE = 32
PAD = (SIZE - 28) // 2


def caption(digit: int, foreground: str, background: str) -> str:
  return f"a {foreground} {digit} on a {background} background"


def combinations(held_out: bool | None = None) -> list[tuple[int, str, str]]:
  """Every (digit, foreground, background), in digit, foreground, background order; held_out True / False:
  only those whose (digit, foreground) is / is not in HELD_OUT; None: all 80."""
  return [(d, f, b) for d in DIGITS for f in FOREGROUNDS for b in BACKGROUNDS
          if held_out is None or ((d, f) in HELD_OUT) == held_out]


def paint(digits: np.ndarray, foreground, background) -> np.ndarray:
  """uint8 [..., 32, 32, 3]: grayscale digits uint8 [..., 28, 28(, 1)] padded to 32x32 and painted with RGB
  colours (names of FOREGROUNDS / BACKGROUNDS, or 3-tuples; per image: arrays [..., 3])."""
  digits = np.asarray(digits)
  if digits.shape[-1:] == (1,):
    digits = digits[..., 0]
  if digits.shape[-2:] != (28, 28):
    raise ValueError(f"digits must be [..., 28, 28(, 1)] uint8, got shape {digits.shape}")
  fg = np.asarray(FOREGROUNDS[foreground] if isinstance(foreground, str) else foreground, np.float64)
  bg = np.asarray(BACKGROUNDS[background] if isinstance(background, str) else background, np.float64)
  pad = [(0, 0)] * (digits.ndim - 2) + [(PAD, PAD), (PAD, PAD)]
  a = np.pad(digits, pad).astype(np.float64)[..., None] / 255.0
  fg, bg = fg[..., None, None, :], bg[..., None, None, :]
  return np.rint(bg * (1.0 - a) + fg * a).astype(np.uint8)


@functools.cache
def _digits(split: str) -> tuple[np.ndarray, np.ndarray]:
  from sdjax.data import bundled
  images, labels = bundled.read_raw()
  idx = bundled.split_indices(labels, split)
  return images[idx], labels[idx]


class ColoredDigitsSource:
  """Random-access source (grain protocol) of the coloured digits' `split` ("train": 4,500, "test": 500)."""

  def __init__(self, split: str = "train"):
    if split not in SEEDS:
      raise ValueError(f"unknown split {split!r} for the coloured digits; expected one of {sorted(SEEDS)}")
    self.split = split
    self.seed = SEEDS[split]
    self.digits, self.labels = _digits(split)

  def __len__(self) -> int:
    return len(self.labels)

  def attributes(self, i: int) -> tuple[int, str, str]:
    """(digit, foreground, background) of example i."""
    if not 0 <= i < len(self):
      raise IndexError(f"colored_digits[{self.split}] has {len(self)} examples, asked for {i}")
    rng = np.random.default_rng([self.seed, i])
    f, b = int(rng.integers(len(FOREGROUNDS))), int(rng.integers(len(BACKGROUNDS)))
    digit = int(self.labels[i])
    names = list(FOREGROUNDS)
    if self.split == "train" and (digit, names[f]) in HELD_OUT:
      f = (f + 1) % len(names)
    return digit, names[f], list(BACKGROUNDS)[b]

  def __getitem__(self, i: int) -> dict:
    digit, fg, bg = self.attributes(i)
    return {"image": paint(self.digits[i], fg, bg), "caption": caption(digit, fg, bg), "label": digit,
            "path": f"colored_digits:{self.split}/{i}"}

  def arrays(self) -> tuple[np.ndarray, list[tuple[int, str, str]]]:
    """(images uint8 [N, 32, 32, 3], attributes of every example) of the whole split."""
    attrs = [self.attributes(i) for i in range(len(self))]
    return np.stack([self[i]["image"] for i in range(len(self))]), attrs
