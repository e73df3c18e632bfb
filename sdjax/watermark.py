"""The invisible watermark of diffusers' SDXL pipelines, in numpy: no torch, OpenCV or PyWavelets at run time.

diffusers' `StableDiffusionXLWatermarker` embeds a fixed 48-bit message (`MESSAGE`, Stability AI's) with
invisible-watermark's `WatermarkEncoder(...).encode(bgr, "dwtDct")` (imwatermark's `EmbedMaxDct`):

1. BGR -> YUV (OpenCV's float conversion: Y = .299 R + .587 G + .114 B, U = .492 (B - Y) + 0.5,
   V = .877 (R - Y) + 0.5; the 0.5 is OpenCV's float offset although the pixels are 0..255).
2. Of the U channel only (scales [0, 36, 36] and a loop over channels 0 and 1), cropped to a multiple of 4,
   a one-level Haar DWT; its LL band is cut into 4x4 blocks in row-major order and block n carries bit n % 48:
   the block's largest-magnitude coefficient other than its top-left one, v, becomes
   sign(v) (floor(|v| / 36) + 0.25 + 0.5 bit) 36. (No DCT, despite the method's name.)
3. The inverse DWT, with the horizontal and vertical detail bands swapped (as imwatermark passes them back),
   and YUV -> BGR.

diffusers skips a batch whose width is under 256 px; imwatermark refuses an image of under 256 x 256 pixels
in all (`applies`), so such images are left as they are.

Reading back: `imwatermark_bits` is `WatermarkDecoder("bits", 48).decode(cv2.imread(png), "dwtDct")` bit for
bit, which reads this watermark badly (OpenCV's 8-bit U channel is offset by 128, not 0.5, which inverts the
bits of negative coefficients); `decode` reads the blocks in the encoder's float U channel with soft votes, and
`detect` compares its bits with the message.

Every step is reproduced in float32 as the reference computes it: OpenCV's float colour conversions use fused
multiply-adds (emulated exactly, `_fma32`) in one order in their 8-lane SIMD loop and in another for the last
W % 8 pixels of a row; PyWavelets' float32 Haar filters round each product; torch's and numpy's float32
arithmetic around them is repeated op for op. `apply` and `apply_float` are bit-identical to diffusers on the
fixtures of tests/test_watermark.py (tools/make_watermark_fixtures.py: diffusers 0.42.1, invisible-watermark
0.2.0, opencv-python 5.0 on x86-64 with AVX2 and FMA). An OpenCV build with other SIMD (no FMA, 16 lanes)
rounds its float32 conversion differently itself, by about one ulp, before the result is quantised.

The watermark is not invisible everywhere: it moves 15-35% of the channel values of an image, by a few levels
in smooth regions but by up to the full range in pixel-level noise (imwatermark's detail-band swap).

This is a host-side post-process on uint8 images: the jitted pipelines stay pure and unwatermarked; sdjax.jobs
and sdjax.sampling apply it (`mark`) to every image they write unless it is turned off (sample.py
--no_watermark, `jobs.Job(watermark=False)`, `sampling.sample_run(watermark=False)`), and record `LABEL` or
"none" in the image's metadata. Training runs' sample grids are not watermarked: they are previews of a run
in progress, kept in its workdir, not images handed out. The watermark tells those who look that an image
was generated; resizing, cropping, rotation or lossy re-encoding removes it, and it proves nothing about an
image's origin (anyone can apply it to any image).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

# Stability AI's message, as diffusers' WATERMARK_MESSAGE and WATERMARK_BITS.
MESSAGE = 0b101100111110110010010000011110111011000110011110
BITS = np.array([int(b) for b in bin(MESSAGE)[2:]], np.uint8)  # [48], most significant bit first
LABEL = "sdxl-dwtDct-48bit"  # what PNG metadata and index.jsonl record for a watermarked image ("none" otherwise)
NONE = "none"
MIN_WIDTH = 256  # diffusers' rule
MIN_PIXELS = 256 * 256  # imwatermark's rule
SCALE = 36  # EmbedMaxDct's scale of the U channel
BLOCK = 4
MAX_ERRORS = 8  # detect's tolerance (48 random bits are within 8 of the message with probability 1.7e-6)

_f32, _f64 = np.float32, np.float64
_S = _f32(0.7071067811865476)  # the Haar filters' taps, as PyWavelets' float32 filters hold them
_TO_Y = (_f32(0.299), _f32(0.587), _f32(0.114))  # OpenCV's R2YF, G2YF, B2YF
_B2U, _R2V = _f32(0.492), _f32(0.877)
_U2B, _U2G, _V2G, _V2R = _f32(2.032), _f32(-0.395), _f32(-0.581), _f32(1.140)
_HALF = _f32(0.5)  # OpenCV's chroma offset of float images
_LANES = 8  # float32 lanes of OpenCV's colour conversion loop (its AVX2 code)


def applies(height: int, width: int) -> bool:
  """Whether an image of this size gets the watermark: diffusers skips widths under 256, imwatermark refuses
  fewer than 256 x 256 pixels."""
  return width >= MIN_WIDTH and height * width >= MIN_PIXELS


def label(height: int, width: int, enabled: bool = True) -> str:
  """The metadata value of an image of this size: `LABEL` when it is watermarked, else "none"."""
  return LABEL if enabled and applies(height, width) else NONE


# --- exact float32 arithmetic of the reference --------------------------------------------------------------

def _fma32(a, b, c) -> np.ndarray:
  """float32 fused multiply-add a * b + c, rounded once. The float64 product of two float32s is exact; the
  float64 sum is rounded, and rounding that again to float32 is wrong only where the float64 sum is exactly
  a float32 rounding tie; there the sum's exact error (TwoSum) decides the direction."""
  p = np.asarray(a, _f64) * _f64(b)
  c = np.asarray(c, _f64)
  s = p + c
  bits = s.view(np.int64)
  tie = (bits & 0x1FFFFFFF) == 0x10000000  # the 29 bits float32 drops are exactly one half
  if np.any(tie):
    bb = s - p
    err = (p - (s - bb)) + (c - bb)  # TwoSum: the exact sum is s + err
    step = np.where(err == 0, 0, np.where((err > 0) == (s > 0), 1, -1))  # towards the exact sum
    s = np.where(tie, (bits + step).view(_f64), s)
  return s.astype(_f32)


def _bgr_to_yuv(bgr: np.ndarray) -> np.ndarray:
  """cv2.cvtColor(float32 bgr [H, W, 3], COLOR_BGR2YUV), bit for bit: its SIMD loop (8 lanes, AVX2) sums Y's
  products in one FMA order, the scalar code for the last W % 8 pixels of each row in another."""
  b, g, r = bgr[..., 0], bgr[..., 1], bgr[..., 2]
  y = _fma32(b, _TO_Y[2], _fma32(g, _TO_Y[1], r * _TO_Y[0]))
  tail = bgr.shape[1] // _LANES * _LANES
  if tail < bgr.shape[1]:
    b_, g_, r_ = b[:, tail:], g[:, tail:], r[:, tail:]
    y[:, tail:] = _fma32(r_, _TO_Y[0], _fma32(b_, _TO_Y[2], g_ * _TO_Y[1]))
  return np.stack([y, _fma32(b - y, _B2U, _HALF), _fma32(r - y, _R2V, _HALF)], axis=-1)


def _yuv_to_bgr(yuv: np.ndarray) -> np.ndarray:
  """cv2.cvtColor(float32 yuv, COLOR_YUV2BGR), bit for bit."""
  y, u, v = yuv[..., 0], yuv[..., 1] - _HALF, yuv[..., 2] - _HALF
  return np.stack([_fma32(u, _U2B, y), _fma32(v, _V2G, _fma32(u, _U2G, y)), _fma32(v, _V2R, y)], axis=-1)


def _bgr_to_yuv_u8(bgr: np.ndarray) -> np.ndarray:
  """cv2.cvtColor(uint8 bgr, COLOR_BGR2YUV): OpenCV's 14-bit fixed point (R2Y 4899, G2Y 9617, B2Y 1868,
  B2U 8061, R2V 14369, chroma offset 128), as int32."""
  b, g, r = (bgr[..., i].astype(np.int32) for i in range(3))
  y = (r * 4899 + g * 9617 + b * 1868 + (1 << 13)) >> 14
  u = ((b - y) * 8061 + (128 << 14) + (1 << 13)) >> 14
  v = ((r - y) * 14369 + (128 << 14) + (1 << 13)) >> 14
  return np.stack([y, np.clip(u, 0, 255), np.clip(v, 0, 255)], axis=-1)


def _haar_rows(x: np.ndarray, s) -> tuple[np.ndarray, np.ndarray]:
  """PyWavelets' one-level Haar analysis along axis 0 (its convolution: f[0] x[2k+1] + f[1] x[2k])."""
  x0, x1 = x[0::2], x[1::2]
  return s * x1 + s * x0, -s * x1 + s * x0


def _ihaar_rows(a: np.ndarray, d: np.ndarray, s) -> np.ndarray:
  """PyWavelets' one-level Haar synthesis along axis 0: x[2k] = s a + s d, x[2k+1] = s a - s d."""
  out = np.empty((2 * a.shape[0],) + a.shape[1:], a.dtype)
  out[0::2] = s * a + s * d
  out[1::2] = s * a + -s * d
  return out


def _dwt2(x: np.ndarray, s) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """pywt.dwt2(x, "haar") of an even-sized [H, W]: (cA, (cH, cV, cD)), rows first, then columns."""
  lo, hi = _haar_rows(x, s)
  aa, ad = (t.T for t in _haar_rows(lo.T, s))
  da, dd = (t.T for t in _haar_rows(hi.T, s))
  return aa, (da, ad, dd)


def _idwt2(ca: np.ndarray, details: tuple[np.ndarray, np.ndarray, np.ndarray], s) -> np.ndarray:
  """pywt.idwt2((cA, (cH, cV, cD)), "haar"): columns first, then rows."""
  ch, cv, cd = details
  lo = _ihaar_rows(ca.T, cv.T, s).T
  hi = _ihaar_rows(ch.T, cd.T, s).T
  return _ihaar_rows(lo, hi, s)


def _blocks(ll: np.ndarray) -> np.ndarray:
  """The whole 4x4 blocks of [h, w] in row-major order -> [n, 16] (a copy)."""
  nr, nc = ll.shape[0] // BLOCK, ll.shape[1] // BLOCK
  return ll[:nr * BLOCK, :nc * BLOCK].reshape(nr, BLOCK, nc, BLOCK).transpose(0, 2, 1, 3).reshape(-1, BLOCK * BLOCK)


def _largest(blocks: np.ndarray) -> np.ndarray:
  """Each block's index of its largest-magnitude coefficient other than the first (the first such on ties)."""
  return np.argmax(np.abs(blocks[:, 1:]), axis=1) + 1


def _embed(ll: np.ndarray, bits: np.ndarray) -> np.ndarray:
  """EmbedMaxDct.encode_frame on the LL band (float32), returned as a new array."""
  blocks = _blocks(ll)
  n = blocks.shape[0]
  if n == 0:
    return ll
  pos = _largest(blocks)
  val = blocks[np.arange(n), pos]
  bit = bits[np.arange(n) % len(bits)].astype(_f32) * _f32(0.5)
  mag = (np.floor_divide(np.abs(val), _f32(SCALE)) + _f32(0.25) + bit) * _f32(SCALE)
  blocks[np.arange(n), pos] = np.where(val >= 0, mag, -mag)
  nr, nc = ll.shape[0] // BLOCK, ll.shape[1] // BLOCK
  out = ll.copy()
  out[:nr * BLOCK, :nc * BLOCK] = blocks.reshape(nr, nc, BLOCK, BLOCK).transpose(0, 2, 1, 3).reshape(
      nr * BLOCK, nc * BLOCK)
  return out


def _encode_bgr(bgr: np.ndarray, bits: np.ndarray) -> np.ndarray:
  """WatermarkEncoder.encode(bgr, "dwtDct") of one float32 [H, W, 3] 0..255 BGR image (H x W >= 256 x 256)."""
  h, w = bgr.shape[0] // 4 * 4, bgr.shape[1] // 4 * 4
  yuv = _bgr_to_yuv(bgr)
  ca, (ch, cv, cd) = _dwt2(yuv[:h, :w, 1], _S)
  yuv[:h, :w, 1] = _idwt2(_embed(ca, bits), (cv, ch, cd), _S)  # imwatermark passes (v, h, d) back
  return _yuv_to_bgr(yuv)


# --- the public API ------------------------------------------------------------------------------------------

def _as_batch(images: np.ndarray, what: str) -> tuple[np.ndarray, bool]:
  images = np.asarray(images)
  single = images.ndim == 3
  if single:
    images = images[None]
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"{what} expects RGB images [B, H, W, 3] or [H, W, 3], got shape {images.shape}")
  return images, single


def apply_float(images: np.ndarray, bits: np.ndarray = BITS) -> np.ndarray:
  """diffusers' `StableDiffusionXLWatermarker.apply_watermark` on channels-last images: float [B, H, W, 3]
  (or [H, W, 3]) RGB in [-1, 1] -> float32 of the same shape, clamped to [-1, 1]. Images whose size fails
  `applies` come back unchanged (as float32)."""
  x, single = _as_batch(images, "apply_float")
  x = x.astype(_f32)
  if not applies(x.shape[1], x.shape[2]):
    return x[0] if single else x
  x = _f32(255) * (x / _f32(2) + _HALF)  # torch: 255 * (images / 2 + 0.5)
  out = np.stack([_encode_bgr(np.ascontiguousarray(im[..., ::-1]), np.asarray(bits, np.uint8))[..., ::-1]
                  for im in x])
  out = np.clip(_f32(2) * (out / _f32(255) - _HALF), -1, 1)  # torch.clamp(2 * (images / 255 - 0.5), -1, 1)
  return out[0] if single else out


def apply(images: np.ndarray, bits: np.ndarray = BITS) -> np.ndarray:
  """Watermark uint8 RGB images [B, H, W, 3] (or [H, W, 3]) -> uint8 of the same shape: what a diffusers SDXL
  pipeline returns for a decoded image equal to these pixels (VaeImageProcessor's 2 (u / 255) - 1, the
  watermarker, its postprocess `round(255 clamp(x / 2 + 0.5, 0, 1))`). Images whose size fails `applies` are
  returned as they are. A host-side numpy post-process: ~17 ms per 512 px image and ~0.1 s per 1024 px image
  on one CPU core (docs/benchmarks.md)."""
  u, single = _as_batch(images, "apply")
  if u.dtype != np.uint8:
    raise ValueError(f"apply expects uint8 pixels, got {u.dtype} (apply_float takes [-1, 1] floats)")
  if not applies(u.shape[1], u.shape[2]):
    return images
  x = _f32(2.0) * (u.astype(_f32) / _f32(255.0)) - _f32(1.0)  # VaeImageProcessor: pil_to_numpy, normalize
  y = apply_float(x, bits)
  y = np.clip(y * _HALF + _HALF, 0, 1)  # denormalize
  out = np.round(y * _f32(255)).astype(np.uint8)  # numpy_to_pil
  return out[0] if single else out


def mark(images: np.ndarray, enabled: bool = True) -> tuple[np.ndarray, str]:
  """(`apply`(images), `LABEL`) for uint8 RGB images [B, H, W, 3] or [H, W, 3] of a size that `applies`, when
  `enabled`; else (the images unchanged, "none"): watermarking off, a small image, or not RGB (grayscale and
  RGBA images are left alone)."""
  images = np.asarray(images)
  if not enabled or images.ndim not in (3, 4) or images.shape[-1] != 3 or not applies(*images.shape[-3:-1]):
    return images, NONE
  return apply(images), LABEL


def _check_readable(image: np.ndarray, what: str) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"{what} expects a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}")
  if image.shape[0] * image.shape[1] < MIN_PIXELS:
    raise ValueError(f"an image of {image.shape[0]} x {image.shape[1]} px is too small to carry the watermark "
                     "(under 256 x 256 pixels)")
  return image


def _block_values(u: np.ndarray) -> np.ndarray:
  """|largest coefficient| of each 4x4 block of the float64 Haar LL band of a U channel (cropped to 4)."""
  h, w = u.shape[0] // 4 * 4, u.shape[1] // 4 * 4
  ca, _ = _dwt2(u[:h, :w].astype(_f64), _f64(0.7071067811865476))
  blocks = _blocks(ca)
  return np.abs(blocks[np.arange(blocks.shape[0]), _largest(blocks)])


def _per_bit_mean(scores: np.ndarray, num_bits: int) -> np.ndarray:
  index = np.arange(len(scores)) % num_bits
  with np.errstate(invalid="ignore", divide="ignore"):  # a bit without blocks: NaN, read as 0 (as imwatermark)
    return np.bincount(index, weights=scores, minlength=num_bits) / np.bincount(index, minlength=num_bits)


def imwatermark_bits(image: np.ndarray, num_bits: int = len(BITS)) -> np.ndarray:
  """The bits (uint8 0/1) that `WatermarkDecoder("bits", num_bits).decode(cv2.imread(png), "dwtDct")` reads from
  a uint8 RGB image [H, W, 3], bit for bit. A poor reader of the SDXL watermark (12-21 of 48 bits wrong on
  watermarked 512-1024 px images, docs/benchmarks.md): it takes the U channel in OpenCV's 8-bit form, offset by
  128 where the encoder's float form is offset by 0.5, so each negative coefficient reads inverted; `decode`
  reads it as written. Raises ValueError for an image of under 256 x 256 pixels (imwatermark refuses them)."""
  image = _check_readable(image, "imwatermark_bits")
  val = _block_values(_bgr_to_yuv_u8(image[..., ::-1])[..., 1])
  return (_per_bit_mean((np.mod(val, SCALE) > 0.5 * SCALE).astype(_f64), num_bits) * 255 > 127).astype(np.uint8)


def decode(image: np.ndarray, num_bits: int = len(BITS)) -> np.ndarray:
  """The watermark's bits (uint8 0/1) read from a uint8 RGB image [H, W, 3] in the encoder's own U channel
  (OpenCV's float conversion, offset 0.5): block n's coefficient magnitude v votes for bit n % num_bits with
  -sin(2 pi v / 36) (+1 at 27 mod 36, written for a 1; -1 at 9, written for a 0), and a bit is 1 where its
  votes sum above 0. Raises ValueError for an image of under 256 x 256 pixels."""
  image = _check_readable(image, "decode")
  rgb = image.astype(_f64)
  y = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
  val = _block_values(0.492 * (rgb[..., 2] - y) + 0.5)
  return (_per_bit_mean(-np.sin(2 * np.pi * np.mod(val, SCALE) / SCALE), num_bits) > 0).astype(np.uint8)


class Detection(NamedTuple):
  bits: np.ndarray  # uint8 [48], the bits `decode` read
  errors: int  # how many of them differ from the SDXL message
  match: bool  # errors <= the tolerance


def detect(image: np.ndarray, max_errors: int = MAX_ERRORS) -> Detection:
  """Look for the SDXL watermark in a uint8 RGB image [H, W, 3] as written (a lossless PNG): the bits `decode`
  reads, how many differ from `BITS`, and whether that is at most `max_errors`. Watermarked 256-320 px images
  read 0-6 bits wrong, 512 px 0-2, 1024 px none; unmarked images 16-33 (of 48; 8 or fewer by chance: 1.7e-6).
  An image too small to carry it raises ValueError."""
  bits = decode(image)
  errors = int(np.sum(bits != BITS))
  return Detection(bits, errors, errors <= max_errors)
