"""Cost of the invisible watermark (sdjax.watermark) per image, on this CPU, single-threaded numpy.

  python bench/watermark.py                       # 512 and 1024 px, sdjax rows
  python bench/watermark.py --reference           # + diffusers' StableDiffusionXLWatermarker (needs torch,
                                                  #   diffusers and invisible-watermark installed)
  python bench/watermark.py --sizes 256 --reps 3  # a quick check

Per size: --batch photo-like RGB images (smooth colour waves, an edge, a little noise), then the median over
--reps runs of the wall time per image of
  apply      `watermark.apply` on uint8 [B, H, W, 3] (what jobs and sample.py run before writing PNGs)
  detect     `watermark.detect` on one uint8 image (reading the bits back)
  reference  diffusers' uint8 -> [-1, 1] tensor -> `StableDiffusionXLWatermarker.apply_watermark` -> uint8
and whether `apply` equals the reference there, bit for bit. Then how `detect` fares on the watermarked
images after common edits: bits wrong (of 48, per image) and how many still match.
"""
import argparse
import io
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sdjax import watermark  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import median_time  # noqa: E402  bench/models.py: median of timed calls after a warm-up


def photo(rng, n, size):
  yy, xx = np.mgrid[0:size, 0:size] / size
  out = np.empty((n, size, size, 3), np.uint8)
  for i in range(n):
    img = np.full((size, size, 3), 128.0)
    for c in range(3):
      for k in range(4):
        fy, fx = rng.uniform(0.5, 8, 2)
        img[..., c] += rng.uniform(15, 40) * np.sin(2 * np.pi * (fy * yy + fx * xx) + k)
    img[: size // 3, size // 2:] += 40
    img += rng.normal(0, 1.5, img.shape)
    out[i] = np.clip(np.round(img), 0, 255)
  return out


def reference_fn():
  """diffusers' pipeline tail on uint8 images, or None when torch / diffusers / invisible-watermark are absent."""
  try:
    import PIL.Image
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.pipelines.stable_diffusion_xl.watermark import StableDiffusionXLWatermarker
  except ImportError as e:
    print(f"no reference: {e}", file=sys.stderr)
    return None
  proc, marker = VaeImageProcessor(), StableDiffusionXLWatermarker()

  def fn(u):
    x = proc.normalize(proc.numpy_to_pt(proc.pil_to_numpy([PIL.Image.fromarray(i) for i in u])))
    return np.stack([np.asarray(i) for i in proc.postprocess(marker.apply_watermark(x), output_type="pil")])
  return fn


def jpeg(img, quality):
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="JPEG", quality=quality)
  return np.asarray(Image.open(buf).convert("RGB"))


def resized(img, scale):
  h, w = img.shape[:2]
  small = Image.fromarray(img).resize((int(w * scale), int(h * scale)), Image.BICUBIC)
  return np.asarray(small.resize((w, h), Image.BICUBIC))


EDITS = {
    "none (PNG as written)": lambda im: im,
    "JPEG quality 95": lambda im: jpeg(im, 95),
    "JPEG quality 75": lambda im: jpeg(im, 75),
    "resize to 90% and back (bicubic)": lambda im: resized(im, 0.9),
    "resize to 50% and back (bicubic)": lambda im: resized(im, 0.5),
    "crop 4 px off the left": lambda im: im[:, 4:],
    "brightness +2 levels": lambda im: np.clip(im.astype(np.int16) + 2, 0, 255).astype(np.uint8),
}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", default="512,1024")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--reference", action="store_true")
  args = p.parse_args()
  ref = reference_fn() if args.reference else None
  rng = np.random.default_rng(0)
  rows, edits = [], {}
  for size in map(int, args.sizes.split(",")):
    u = photo(rng, args.batch, size)
    watermark.apply(u[:1])  # warm-up
    apply_s = median_time(lambda: watermark.apply(u), args.reps)[0] / args.batch
    marked = watermark.apply(u)
    detect_s = median_time(lambda: watermark.detect(marked[0]), args.reps)[0]
    errors = [watermark.detect(m).errors for m in marked]
    row = {"size": size, "apply_ms": 1e3 * apply_s, "detect_ms": 1e3 * detect_s, "errors": errors,
           "mpix_s": size * size / apply_s / 1e6}
    if ref is not None:
      row["ref_ms"] = 1e3 * median_time(lambda: ref(u), args.reps)[0] / args.batch
      row["identical"] = bool(np.array_equal(ref(u), marked))
    rows.append(row)
    for name, edit in EDITS.items():
      edited = [edit(m) for m in marked]
      if edited[0].shape[0] * edited[0].shape[1] >= watermark.MIN_PIXELS:  # else too small to read
        edits[(name, size)] = [watermark.detect(e).errors for e in edited]
  print(f"numpy {np.__version__}, batch {args.batch}, median of {args.reps}")
  head = "| image | apply ms/image | Mpixel/s | detect ms/image | bits wrong (detect) |"
  sep = "|---|---|---|---|---|"
  if ref is not None:
    head += " diffusers + invisible-watermark ms/image | identical |"
    sep += "---|---|"
  print(head)
  print(sep)
  for r in rows:
    line = (f"| {r['size']}x{r['size']} | {r['apply_ms']:.0f} | {r['mpix_s']:.1f} | {r['detect_ms']:.0f} | "
            f"{', '.join(map(str, r['errors']))} |")
    if ref is not None:
      line += f" {r['ref_ms']:.0f} | {'yes' if r['identical'] else 'NO'} |"
    print(line)
  sizes = [r["size"] for r in rows]
  print()
  print("| edit | " + " | ".join(f"{s} px: bits wrong / matches" for s in sizes) + " |")
  print("|---|" + "---|" * len(sizes))
  for name in EDITS:
    cells = [f"{', '.join(map(str, e))} / {sum(x <= watermark.MAX_ERRORS for x in e)} of {len(e)}" if e else "—"
             for e in (edits.get((name, s)) for s in sizes)]
    print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
