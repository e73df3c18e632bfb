"""A procedural captioned dataset: one coloured shape on a light background, captioned "a red circle".

Example i of a split is drawn from (split seed, i) alone, so the dataset needs no files and is the same on
every machine. 4 colours x 3 shapes = 12 captions; `label` = colour * 3 + shape. Small enough to train a
text-conditioned latent diffusion model on a laptop CPU and check that it follows its captions.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
SPLITS = {"train": (4096, 0), "test": (512, 1)}  # size, seed
SIZE = 32


def caption(color: str, shape: str) -> str:
  return f"a {color} {shape}"


def captions() -> list[str]:
  """Every caption, in label order."""
  return [caption(c, s) for c in COLORS for s in SHAPES]


def render(color: str, shape: str, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
  """uint8 [size, size, 3]: the shape (side 40-70% of the image, anywhere inside it) on a light gray."""
  bg = int(rng.integers(225, 256))
  img = Image.new("RGB", (size, size), (bg, bg, bg))
  side = int(rng.integers(int(0.4 * size), int(0.7 * size) + 1))
  x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
  box = (x0, y0, x0 + side - 1, y0 + side - 1)
  fill = COLORS[color]
  draw = ImageDraw.Draw(img)
  if shape == "circle":
    draw.ellipse(box, fill=fill)
  elif shape == "square":
    draw.rectangle(box, fill=fill)
  else:
    draw.polygon([(x0 + side / 2, y0), (x0, y0 + side - 1), (x0 + side - 1, y0 + side - 1)], fill=fill)
  return np.asarray(img, np.uint8)


class ShapesSource:
  """Random-access source (grain protocol) of the shapes dataset's `split` ("train": 4,096, "test": 512)."""

  def __init__(self, split: str = "train"):
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r} for the shapes dataset; expected one of {sorted(SPLITS)}")
    self.split = split
    self.size, self.seed = SPLITS[split]

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, i: int) -> dict:
    if not 0 <= i < self.size:
      raise IndexError(f"shapes[{self.split}] has {self.size} examples, asked for {i}")
    rng = np.random.default_rng([self.seed, i])
    label = int(rng.integers(len(COLORS) * len(SHAPES)))
    color, shape = list(COLORS)[label // len(SHAPES)], SHAPES[label % len(SHAPES)]
    return {"image": render(color, shape, rng), "caption": caption(color, shape), "label": label,
            "path": f"shapes:{self.split}/{i}"}
