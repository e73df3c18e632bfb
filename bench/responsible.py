"""Per-image cost of the safety checker and of C2PA signing, on this CPU (the watermark: bench/watermark.py).

  python bench/responsible.py                 # 512 and 1024 px
  python bench/responsible.py --sizes 512 --reps 2

Rows:
- safety checker: a full-size `StableDiffusionSafetyChecker` (SD 1.x's: CLIP ViT-L/14 vision tower, 224 px,
  projection 768; random weights, the cost does not depend on them) on --batch images in [-1, 1] of each size,
  as `pipelines.check_images` runs it (the jittable preprocessing, resize and crop to 224, then the tower), jitted;
  compile, then the median of --reps calls, per image. In a job it runs inside the render's jit.
- C2PA: `sdjax.provenance.save_png` of one uint8 image with a throwaway certificate chain against
  `sdjax.io.save_png` alone (the extra is signing: hashing the file and an ES256 signature), and `provenance.read`.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sdjax import io, pipelines, provenance  # noqa: E402
from sdjax.models import safety_checker as sc  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import median_time  # noqa: E402  bench/models.py: median of timed calls after a warm-up

VIT_L14 = {"model_type": "clip", "projection_dim": 768,
           "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                             "num_hidden_layers": 24, "patch_size": 14, "image_size": 224, "hidden_act": "quick_gelu"}}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes", default="512,1024")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--reps", type=int, default=3)
  args = p.parse_args()
  sizes = [int(s) for s in args.sizes.split(",")]
  print(f"jax {jax.__version__}, {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f}\n")
  print("| what | image | first call s (compile) | ms/image |\n|---|---|---|---|")

  config = sc.config_from_dict(VIT_L14)
  module = sc.StableDiffusionSafetyChecker(config)
  params = jax.jit(lambda r: module.init(r, *sc.init_args(config))["params"])(jax.random.key(0))
  fe = sc.FeatureExtractorConfig()  # what pipelines.check_images runs, without a whole pipeline around it
  check = jax.jit(lambda p, x: module.apply({"params": p["safety_checker"]},
                                            pipelines.safety_checker_input(x, fe)).has_nsfw_concept)
  rng = np.random.default_rng(0)
  for size in sizes:
    images = jnp.asarray(rng.uniform(-1, 1, (args.batch, size, size, 3)), jnp.float32)
    t0 = time.perf_counter()
    jax.block_until_ready(check({"safety_checker": params}, images))
    first = time.perf_counter() - t0
    s = median_time(lambda: jax.block_until_ready(check({"safety_checker": params}, images)), args.reps)[0]
    print(f"| safety checker (ViT-L/14), batch {args.batch} | {size} px | {first:.1f} | {1e3 * s / args.batch:.0f} |",
          flush=True)

  with tempfile.TemporaryDirectory() as tmp:
    chain = provenance.throwaway_chain(tmp)
    signer = provenance.load_signer(chain["key"], chain["chain"])
    record = {"prompt": "a photograph of a fox", "seed": 1, "sampler": "ddim", "steps": 25, "model_hash": "0" * 16}
    text = {k: str(v) for k, v in record.items()}
    for size in sizes:
      img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
      path = os.path.join(tmp, f"{size}.png")
      plain = median_time(lambda: io.save_png(path, img, text), args.reps)[0]
      signed = median_time(lambda: provenance.save_png(path, img, text, signer, record), args.reps)[0]
      read = median_time(lambda: provenance.read(path), args.reps)[0]
      print(f"| PNG write, unsigned | {size} px | — | {1e3 * plain:.0f} |")
      print(f"| PNG write + C2PA signature (extra: {1e3 * (signed - plain):.0f} ms) | {size} px | — | "
            f"{1e3 * signed:.0f} |")
      print(f"| C2PA read + validate | {size} px | — | {1e3 * read:.0f} |", flush=True)


if __name__ == "__main__":
  main()
