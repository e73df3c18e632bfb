"""An AutoencoderKL on the procedural shapes dataset (RGB 32x32 -> 8x8x4 latents): the frozen VAE of
configs/ldm_shapes.py.

  python train.py --config configs/vae_shapes.py --workdir runs/vae_shapes        # exports runs/vae_shapes/vae
  python train.py --config configs/vae_shapes.py:tiny --workdir runs/vae_shapes_tiny
"""
import ml_collections

from configs import common, vae_mnist


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", "tiny"):
    raise ValueError(f"configs/vae_shapes.py: unknown variant {arg!r}; expected 'tiny' or nothing")
  c = vae_mnist.get_config(arg or None).unlock()  # the MNIST VAE's recipe, on RGB shapes
  c.data = common.shapes_data()
  c.vae.in_channels = 3
  c.vae.out_channels = 3
  if not arg:
    c.train.num_steps = 1500
  return c.lock()
