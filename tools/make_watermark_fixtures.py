"""Write tests/fixtures/watermark/sdxl.npz: diffusers' SDXL invisible watermark on a few uint8 images.

Needs torch, diffusers and invisible-watermark (with OpenCV and PyWavelets), none of them sdjax dependencies:
  pip install torch diffusers invisible-watermark
  python tools/make_watermark_fixtures.py

For each case, uint8 RGB images [B, H, W, 3] go through what a diffusers SDXL pipeline does with a decoded
image equal to them: VaeImageProcessor's pil_to_numpy / numpy_to_pt / normalize, then
`StableDiffusionXLWatermarker.apply_watermark`, then `VaeImageProcessor.postprocess(..., output_type="pil")`.
Stored per case: the input (`{case}_in`: the PNG bytes of the batch stacked vertically), the output as its
difference to the input (`{case}_delta`, int16: it compresses), the sha256 of the watermarker's float32 input
and output (channels last, for sdjax.watermark.apply_float), and the 48 bits that
`WatermarkDecoder("bits", 48).decode(bgr, "dwtDct")` reads from the input and from the output (as uint8 BGR,
what cv2.imread gives). Cases under diffusers' and imwatermark's size limits record what diffusers does with them (unchanged, or imwatermark's RuntimeError).
"""
import hashlib
import io
import os
from importlib import metadata

import numpy as np
import PIL.Image
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion_xl.watermark import WATERMARK_BITS, StableDiffusionXLWatermarker
from imwatermark import WatermarkDecoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERSIONED = ("diffusers", "invisible-watermark", "opencv-python", "PyWavelets", "torch", "numpy")
OUT = os.path.join(ROOT, "tests", "fixtures", "watermark", "sdxl.npz")


def smooth(rng, h, w, noise=0.0):
  """A photo-like uint8 image: low-frequency colour fields, an edge, saturated corners, optional noise (which
  does not compress: the fixtures stay under 1 MB)."""
  yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
  img = np.zeros((h, w, 3))
  for c in range(3):
    for _ in range(4):
      fy, fx, ph = rng.uniform(0.5, 6, 2).tolist() + [rng.uniform(0, 6.3)]
      img[..., c] += rng.uniform(20, 60) * np.sin(2 * np.pi * (fy * yy + fx * xx) + ph)
    img[..., c] += rng.uniform(60, 200)
  img[: h // 3, w // 2:] += 60  # a hard edge
  img[-16:, :16] = 0
  img[:16, -16:] = 255
  img += rng.normal(0, noise, img.shape)
  return np.clip(np.round(img), 0, 255).astype(np.uint8)


def png_bytes(images):
  """uint8 [B, H, W, 3] -> the PNG of the images stacked vertically, as a uint8 array (PNG's filters compress
  smooth images far better than npz's zlib)."""
  buf = io.BytesIO()
  PIL.Image.fromarray(np.concatenate(list(images), axis=0)).save(buf, format="PNG", optimize=True)
  return np.frombuffer(buf.getvalue(), np.uint8)


def sha(a):
  return hashlib.sha256(np.ascontiguousarray(a, np.float32).tobytes()).hexdigest()


def decode(rgb):
  return np.asarray(WatermarkDecoder("bits", 48).decode(np.ascontiguousarray(rgb[..., ::-1]), "dwtDct"), np.uint8)


def diffusers_watermark(u):
  """uint8 [B, H, W, 3] -> (watermarker's float input NHWC, its float output NHWC, the pipeline's uint8)."""
  proc = VaeImageProcessor()
  x = proc.normalize(proc.numpy_to_pt(proc.pil_to_numpy([PIL.Image.fromarray(im) for im in u])))
  y = StableDiffusionXLWatermarker().apply_watermark(x)
  out = np.stack([np.asarray(im) for im in proc.postprocess(y, output_type="pil")])
  return x.permute(0, 2, 3, 1).numpy(), y.permute(0, 2, 3, 1).numpy(), out


def main():
  rng = np.random.default_rng(20260521)
  cases = {
      "noise": rng.integers(0, 256, (1, 256, 256, 3), dtype=np.uint8),  # every pixel independent
      "smooth": np.stack([smooth(rng, 256, 256, noise=1.0), smooth(rng, 256, 256)]),  # a batch of two
      # Not a multiple of 4 (imwatermark crops), 8 (whole LL blocks, OpenCV's SIMD loop) nor 16.
      "odd": smooth(rng, 261, 298, noise=0.5)[None],
  }
  data = {"message_bits": np.asarray(WATERMARK_BITS, np.uint8)}
  for name, u in cases.items():
    x, y, out = diffusers_watermark(u)
    delta = out.astype(np.int16) - u
    data[f"{name}_in"] = png_bytes(u)
    data[f"{name}_delta"] = delta
    data[f"{name}_float_in_sha256"] = np.asarray(sha(x))
    data[f"{name}_float_out_sha256"] = np.asarray(sha(y))
    data[f"{name}_bits_in"] = np.stack([decode(im) for im in u])
    data[f"{name}_bits_out"] = np.stack([decode(im) for im in out])
    print(f"{name} {u.shape}: |delta| max {np.abs(delta).max()}, {np.mean(delta != 0):.1%} of values changed; "
          f"bits read back wrong: {(data[f'{name}_bits_out'] != data['message_bits']).sum(-1).tolist()}, "
          f"unmarked input: {(data[f'{name}_bits_in'] != data['message_bits']).sum(-1).tolist()}")
  # Under the size limits: width < 256 is skipped; fewer than 256 x 256 pixels makes imwatermark raise.
  narrow = smooth(rng, 256, 200)[None]
  data["narrow_unchanged"] = np.asarray(np.array_equal(diffusers_watermark(narrow)[2], narrow))
  try:
    diffusers_watermark(smooth(rng, 128, 320)[None])
    data["small_raises"] = np.asarray(False)
  except RuntimeError:
    data["small_raises"] = np.asarray(True)
  data["versions"] = np.asarray(", ".join(f"{p} {metadata.version(p)}" for p in VERSIONED))
  os.makedirs(os.path.dirname(OUT), exist_ok=True)
  np.savez_compressed(OUT, **data)
  print(f"wrote {OUT} ({os.path.getsize(OUT) / 1e3:.0f} kB); narrow unchanged {data['narrow_unchanged']}, "
        f"small raises {data['small_raises']}; {data['versions']}")


if __name__ == "__main__":
  main()
