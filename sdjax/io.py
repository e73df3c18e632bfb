"""Image grids and PNGs with generation metadata."""
from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np
from PIL import Image, PngImagePlugin


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8 [0, 255] (rounded, clipped)."""
  images = np.asarray(images, np.float32)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, nrow: int, pad: int = 2) -> np.ndarray:
  """Tile [N, H, W, C] uint8 images into rows of `nrow` with `pad` pixels of black between them."""
  n, h, w, c = images.shape
  ncol = nrow
  rows = -(-n // ncol)
  grid = np.zeros((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, ncol)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = img
  return grid


def save_png(path: str | os.PathLike, image: np.ndarray, metadata: Mapping[str, Any] | None = None) -> None:
  """Write a uint8 [H, W, C] image (C in {1, 3, 4}) as PNG, with `metadata` as tEXt chunks."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"save_png expects uint8 pixels, got {image.dtype}")
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  info = PngImagePlugin.PngInfo()
  for key, value in (metadata or {}).items():
    info.add_text(str(key), str(value))
  tmp = f"{path}.tmp"
  Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)
  os.replace(tmp, path)  # never leave a half-written PNG behind
