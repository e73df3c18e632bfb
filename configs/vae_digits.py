"""Stage 1 of "Stable Diffusion from scratch": an AutoencoderKL on the coloured, captioned digits
(sdjax.data.colored_digits, 32x32 RGB) -> 8x8x4 latents (f = 4).

  python train.py --config configs/vae_digits.py --workdir runs/vae_digits        # ~5 minutes on a 2-core CPU
  python train.py --config configs/vae_digits.py:tiny --workdir runs/vae_digits_tiny  # seconds, for tests

Exports runs/vae_digits/vae (diffusers AutoencoderKL folder, scaling_factor = 1 / std of its latents), the
frozen VAE of configs/ldm_digits.py and configs/upscale_digits.py. bench/digits_demo.py measures its
reconstruction PSNR and the digit/colour accuracy of reconstructions.
"""
import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = "vae"
  c.data = common.data(source="colored_digits", name="", resolution=32)  # captions and labels are not read
  c.vae = common.vae(in_channels=3, out_channels=3, block_out_channels=(16, 32, 64), norm_num_groups=8)
  c.loss = common.vae_loss()
  c.gan = common.gan()        # off: the digits reconstruct sharply without it
  c.optim = common.optim(adafactor=False, lr=1e-3)
  c.train = common.train(denoiser=False, batch_size=32, num_steps=2000, ema_decay=0.999, checkpoint_every=500,
                         sample_every=500)
  c.sample = common.sample_reconstructions()
  c.export = common.export()
  c.mesh = common.mesh()

  if arg == "tiny":
    common.tiny_run(c)
    c.vae.block_out_channels = (8, 8, 8)
    c.vae.norm_num_groups = 4
    c.vae.mid_block_add_attention = False
    c.sample.num_images = 4
    c.export.scaling_batches = 1
  elif arg:
    raise ValueError(f"configs/vae_digits.py: unknown variant {arg!r}; expected 'tiny' or nothing")
  return c.lock()
