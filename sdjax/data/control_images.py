"""Control images derived from training images, for ControlNet training and evaluation (config.control).

A ControlNet learns to follow a conditioning image that is a function of the target image. Here that function is
computed on the data side, per example, from the image alone (numpy; grain's reader threads run it):

  ink         the per-pixel ink in [0, 1]: the distance from the background colour (Euclidean over the C channels
              in [0, 1], divided by sqrt(C); the background is the per-channel median of a `border`-pixel frame),
              less a noise floor (the 90th percentile of the frame's distances), divided by the largest such
              distance (at least MIN_CONTRAST, so a blank image gives faint ink, not amplified noise). On a painted
              coloured digit (sdjax.data.colored_digits) it is the digit's alpha up to uint8 rounding, the rule of
              sdjax.eval.colored_digits' judge.
  kinds (config.control.kind), each [H, W, 3] float32 in [0, 1] (the three channels equal), as diffusers feeds
  ControlNets (`do_normalize=False`):
    silhouette  1 where ink >= threshold, else 0: the shape's filled mask.
    edges       the silhouette's inner contour: silhouette pixels with a 4-neighbour outside it (1 pixel wide).
    sobel       a soft, canny-like edge map: the Sobel gradient magnitude of the ink (3x3, edge-replicated),
                divided by its maximum (0 for a blank image); no thinning or hysteresis.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

KINDS = ("silhouette", "edges", "sobel")
MIN_CONTRAST = 32.0 / 255.0
NOISE_PERCENTILE = 90.0


@dataclasses.dataclass(frozen=True)
class ControlConfig:
  """config.control: how each example's control image is made (see the module docstring)."""
  kind: str = "silhouette"    # silhouette | edges | sobel
  threshold: float = 0.5      # ink level of the silhouette (and of the edges' silhouette), in (0, 1]
  border: int = 2             # width of the frame whose median is the background colour

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"config.control.kind: unknown control kind {self.kind!r}; expected one of {KINDS}")
    if not 0.0 < float(self.threshold) <= 1.0:
      raise ValueError(f"config.control.threshold must be in (0, 1], got {self.threshold}")
    if not isinstance(self.border, int) or self.border < 1:
      raise ValueError(f"config.control.border must be a positive int, got {self.border!r}")


def control_config(section: Mapping[str, Any] | None) -> ControlConfig:
  """config.control (missing fields: ControlConfig's defaults), checked; errors name the key."""
  section = dict(section or {})
  known = {f.name for f in dataclasses.fields(ControlConfig)}
  unknown = sorted(set(section) - known)
  if unknown:
    raise ValueError(f"config.control: unknown field(s) {unknown}; known fields are {sorted(known)}")
  try:
    return ControlConfig(kind=str(section.get("kind", "silhouette")), threshold=float(section.get("threshold", 0.5)),
                         border=int(section.get("border", 2)))
  except (TypeError, ValueError) as e:
    raise ValueError(str(e) if str(e).startswith("config.control") else f"config.control: {e}") from e


def ink(images: np.ndarray, border: int = 2) -> np.ndarray:
  """float32 [N, H, W] in [0, 1]: the ink of images [N, H, W, C] in [0, 1] (module docstring)."""
  x = np.asarray(images, np.float32)
  n, h, w, _ = x.shape
  if min(h, w) <= 2 * border:
    raise ValueError(f"images of {h}x{w} have no interior inside a {border}-pixel border")
  frame = np.ones((h, w), bool)
  frame[border:h - border, border:w - border] = False
  background = np.median(x[:, frame], axis=1)  # [N, C]
  dist = np.linalg.norm(x - background[:, None, None], axis=-1) / np.sqrt(x.shape[-1])  # [N, H, W] in [0, 1]
  floor = np.percentile(dist[:, frame], NOISE_PERCENTILE, axis=1)  # [N]
  contrast = np.maximum(dist.max(axis=(1, 2)) - floor, 0.0)
  return np.clip((dist - floor[:, None, None]) / np.maximum(contrast, MIN_CONTRAST)[:, None, None], 0.0,
                 1.0).astype(np.float32)


def _erode(mask: np.ndarray) -> np.ndarray:
  """4-neighbour binary erosion of [N, H, W] bool (outside the image counts as outside the mask)."""
  p = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
  return mask & p[:, :-2, 1:-1] & p[:, 2:, 1:-1] & p[:, 1:-1, :-2] & p[:, 1:-1, 2:]


def _sobel(a: np.ndarray) -> np.ndarray:
  """Sobel gradient magnitude of [N, H, W] (edge-replicated), divided by each map's maximum (0 if flat)."""
  p = np.pad(a, ((0, 0), (1, 1), (1, 1)), mode="edge")
  s = lambda dy, dx: p[:, 1 + dy:p.shape[1] - 1 + dy, 1 + dx:p.shape[2] - 1 + dx]
  gx = (s(-1, 1) + 2 * s(0, 1) + s(1, 1)) - (s(-1, -1) + 2 * s(0, -1) + s(1, -1))
  gy = (s(1, -1) + 2 * s(1, 0) + s(1, 1)) - (s(-1, -1) + 2 * s(-1, 0) + s(-1, 1))
  mag = np.sqrt(gx ** 2 + gy ** 2)
  peak = mag.max(axis=(1, 2), keepdims=True)
  return np.where(peak > 0, mag / np.where(peak > 0, peak, 1.0), 0.0)


def control_images(images: np.ndarray, cfg: ControlConfig) -> np.ndarray:
  """float32 [N, H, W, 3] in [0, 1]: the control images of `cfg.kind` for images [N, H, W, C] (uint8, or floats
  in [0, 1])."""
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
  x = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)
  a = ink(x, cfg.border)
  if cfg.kind == "sobel":
    c = _sobel(a)
  else:
    mask = a >= cfg.threshold
    c = mask & ~_erode(mask) if cfg.kind == "edges" else mask
  return np.repeat(c.astype(np.float32)[..., None], 3, axis=-1)


class WithControl:
  """A data transform: `base(example, rng)` (whose "image" is float [H, W, C] in [-1, 1]) plus "control", the
  image's control image [H, W, 3] float32 in [0, 1]."""

  def __init__(self, base: Callable[[Mapping[str, Any], np.random.Generator], dict], cfg: ControlConfig):
    self.base, self.cfg = base, cfg

  def __call__(self, ex: Mapping[str, Any], rng: np.random.Generator) -> dict:
    out = self.base(ex, rng)
    if "image" not in out:
      raise ValueError("config.control: the examples have no image to derive a control image from (cached latents "
                       "cannot be used: set config.data.source to an image source)")
    image = (np.asarray(out["image"], np.float32) + 1.0) / 2.0
    out["control"] = control_images(image[None], self.cfg)[0]
    return out
