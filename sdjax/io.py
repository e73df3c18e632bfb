"""Image grids, PNGs with generation metadata, and the folders they are written to."""
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


def unwritable_dir(path: str) -> str | None:
  """Why `path` cannot be used as an output folder (it is a file, lies under a file, or the folder where it
  is or would be created is not writable), or None; nothing is created."""
  full = os.path.abspath(path)
  if os.path.exists(full) and not os.path.isdir(full):
    return f"{path} exists and is not a directory"
  parent = full
  while not os.path.exists(parent):  # the nearest existing folder above it is where it will be created
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    return f"cannot create {path}: {parent} is not a directory"
  if not os.access(parent, os.W_OK | os.X_OK):
    return f"{parent} is not writable" + ("" if parent == full else f" (creating {path})")
  return None
